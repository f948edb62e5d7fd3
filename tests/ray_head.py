"""A local Ray head for the tests (tests/test_verl_ray_launcher.py): `ray start --head --block` on loopback.

Bounded: one CPU, no GPU, an 80 MB object store, no log monitor. Every port it opens is a free
one picked here and its temp dir is its own (short: Ray's unix sockets live under it), so it
does not collide with another Ray on the machine. `--block` keeps `ray start` in the foreground
as the parent of the head's processes, in a session of their own: stopping it (SIGTERM) shuts
them down, and whatever is left of that process group, or still names our temp dir, is then
killed by its pid. Never `ray stop`: it would end every Ray on the machine. Ready means the Job
Submission API ran a first job to the end (the dashboard, the job agent and a worker are up).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gradalign_tools.stack import free_port

READY_JOB = "gradalign-test-ray-head-ready"


@dataclass
class LocalRayHead:
    proc: subprocess.Popen
    temp_dir: Path
    dashboard_port: int
    log_path: Path

    @property
    def address(self) -> str:
        """The Job Submission API's address (what GRADALIGN_TRAINER_RAY_ADDRESS names)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the head and every process it started; remove its temp dir."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session's process group: ours alone
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        for pid in _pids_naming(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line contains text (the head's temp dir: only its processes name it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _ray_cli() -> str:
    cli = Path(sys.executable).with_name("ray")
    if not cli.exists():
        raise RuntimeError(f"no `ray` command beside {sys.executable}: install ray[default] (pyproject's dev extra)")
    return str(cli)


def start_ray_head(log_path: Path, timeout_s: float = 180.0) -> LocalRayHead:
    """Start a local Ray head and wait until a first job has run through its Job Submission API."""
    temp_dir = Path(tempfile.mkdtemp(prefix="gr-ray-", dir="/tmp"))
    dashboard_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard_port,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    command = [
        _ray_cli(),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=80000000",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--include-log-monitor=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    head = LocalRayHead(proc, temp_dir, dashboard_port, log_path)
    try:
        _wait_ready(head, timeout_s)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_ready(head: LocalRayHead, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = None
    while client is None:
        if head.proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.proc.returncode}:\n{head.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head's dashboard did not answer in {timeout_s:.0f} s:\n{head.log_tail()}")
        try:
            client = head.client()
        except Exception:
            time.sleep(1.0)
    client.submit_job(entrypoint="echo ready", submission_id=READY_JOB)
    while True:
        status = client.get_job_status(READY_JOB)
        if status.is_terminal():
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray head ran no job in {timeout_s:.0f} s (status {status}):\n{head.log_tail()}")
        time.sleep(0.5)
    if str(status) != "SUCCEEDED":
        raise RuntimeError(f"the Ray head's first job ended {status}:\n{client.get_job_logs(READY_JOB)}")
