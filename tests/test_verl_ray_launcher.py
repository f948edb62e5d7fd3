"""The verl backend's `ray` launcher (services/trainer/backends/verl/ray_launcher.py) against a real local Ray head.

A module-scoped Ray head (tests/ray_head.py: one CPU, loopback, its own ports and temp dir)
runs the trainer's verl command as a Ray job; `verl` is the stand-in in tests/stand_in_verl
(on PYTHONPATH), which reads the dataset and reward file the command names, prints verl's
console metric lines and writes a verl-shaped actor checkpoint; the model merger (the
stand-in's) runs in the trainer. The stand-in's behaviour comes from the Ray job's
environment (settings.ray_env_vars): fail, or wait at step 1 until a gate file exists.
Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest

from gradalign_common.errors import RequestConflictError
from gradalign_common.grpc_utils import wait_healthy
from gradalign_common.modeling import load_model
from gradalign_common.pb import common_pb2, training_pb2, training_pb2_grpc
from gradalign_common.records import write_problems
from gradalign_tools.stack import free_port, service_command, start_process
from ray_head import start_ray_head
from services.trainer.backends.verl.command import REWARD_FILE
from services.trainer.backends.verl.launcher import RunIdentity
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.backends.verl.ray_launcher import RayLauncher
from services.trainer.backends.verl.ray_submission import (
    FINGERPRINT_KEY,
    REQUEST_ID_KEY,
    ray_entrypoint,
    ray_runtime_env,
    submission_id_for,
)
from services.trainer.marker import MARKER_NAME
from services.trainer.server import create_server
from services.trainer.settings import TrainerSettings
from trainer_fixtures import constant_answer_problems
from verl_fixtures import TINY_REQUEST, prepare_test_job

# ray 2.60's tail_job_logs passes aiohttp ssl=None for plain http: aiohttp's deprecation, not ours
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

STAND_IN_VERL = Path(__file__).resolve().parent / "stand_in_verl"
CANCEL_LIMIT_S = 10.0  # "returns within a few seconds"


# --- without a Ray head ------------------------------------------------------------------------------


def test_submission_ids_are_deterministic_and_safe():
    key = "exp-3f2a/round-00004/train"
    sid = submission_id_for(key)
    assert sid == submission_id_for(key) and sid.startswith("gradalign-train-exp-3f2a-round-00004-train-")
    assert submission_id_for(key, 2) == f"{sid}-r2"
    odd = submission_id_for("a b/c?d=é" + "x" * 200)
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in odd) and len(odd) <= 16 + 48 + 1 + 12
    assert submission_id_for("a/b") != submission_id_for("a b")  # keys that reduce alike still differ
    assert submission_id_for("???").startswith("gradalign-train-")
    with pytest.raises(ValueError):
        submission_id_for("")


def test_the_ray_entrypoint_is_the_local_command(tmp_path, random_tiny_checkpoint):
    job = prepare_test_job(
        TINY_REQUEST, random_tiny_checkpoint, tmp_path,
        work_dir="a dir, with spaces", options=VerlOptions(python="/opt/trainer/bin/python"), experiment_name="it's round 4",
    )
    entrypoint = ray_entrypoint(job, "/opt/ray/bin/python3")
    assert shlex.split(entrypoint) == ["/opt/ray/bin/python3", *job.train_command[1:]]  # one builder
    assert job.train_command[1:3] == ["-m", "verl.trainer.main_ppo"]
    env = ray_runtime_env(job, {"NCCL_DEBUG": "WARN", "HYDRA_FULL_ERROR": "0"}, None)
    assert env == {"env_vars": {**job.env, "NCCL_DEBUG": "WARN", "HYDRA_FULL_ERROR": "0"}}
    assert ray_runtime_env(job, {}, "s3://bucket/pkg.zip")["working_dir"] == "s3://bucket/pkg.zip"


def test_ray_settings_are_checked_at_start_up(monkeypatch):
    with pytest.raises(ValueError, match="needs GRADALIGN_TRAINER_RAY_ADDRESS"):
        TrainerSettings(backend="verl", verl_launcher="ray")
    with pytest.raises(ValueError, match="http"):
        TrainerSettings(backend="verl", verl_launcher="ray", ray_address="raycluster-head-svc:6379")
    with pytest.raises(ValueError, match="GRADALIGN_TRAINER_BACKEND=verl"):
        TrainerSettings(verl_launcher="ray", ray_address="http://head:8265")
    monkeypatch.setenv("GRADALIGN_TRAINER_BACKEND", "verl")
    monkeypatch.setenv("GRADALIGN_TRAINER_VERL_LAUNCHER", "ray")
    monkeypatch.setenv("GRADALIGN_TRAINER_RAY_ADDRESS", "http://head:8265")
    monkeypatch.setenv("GRADALIGN_TRAINER_RAY_ENV_VARS", '{"NCCL_DEBUG": "WARN"}')
    settings = TrainerSettings()
    launcher = RayLauncher.from_settings(settings)
    assert launcher.address == "http://head:8265" and launcher.env_vars == {"NCCL_DEBUG": "WARN"}
    assert TrainerSettings(backend="verl").verl_launcher == "ray"  # from the environment
    monkeypatch.delenv("GRADALIGN_TRAINER_VERL_LAUNCHER")
    assert TrainerSettings(backend="verl").verl_launcher == "local"


class _DroppingTailClient:
    """A JobSubmissionClient whose log websocket drops in the middle of its first connection; a new one
    starts again from the log's first character; the job's last line reaches only get_job_logs."""

    LOG = "a\nb\nstep:1\nhalf"
    FINAL = LOG + " done\nlast\n"

    def __init__(self):
        self.connections = 0
        self.status_reads = 0

    async def tail_job_logs(self, submission_id):
        self.connections += 1
        if self.connections == 1:
            yield "a\nb\nst"
            raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
        yield self.LOG[:5]
        yield self.LOG[5:]

    def get_job_status(self, submission_id):
        from ray.job_submission import JobStatus

        self.status_reads += 1
        return JobStatus.RUNNING if self.status_reads == 1 else JobStatus.SUCCEEDED

    def get_job_logs(self, submission_id):
        return self.FINAL


def test_the_log_follower_delivers_every_line_once_across_a_dropped_connection():
    from services.trainer.backends.verl.ray_logs import RayLogFollower

    client = _DroppingTailClient()
    follower = RayLogFollower(client, "gradalign-train-x").start()
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = follower.lines.get(timeout=30)
        if line is None:
            break
        lines.append(line)
    follower.close()
    assert lines == ["a", "b", "step:1", "half done", "last"] and follower.error is None
    assert client.connections == 2


def test_an_unreachable_ray_head_fails_the_request_and_keeps_the_scratch(tmp_path, random_tiny_checkpoint):
    """Nothing listens at the address: the request fails naming it, and the request's scratch directory
    stays (a job submitted by an earlier trainer may still be using it; the retry attaches and removes it)."""
    settings = TrainerSettings(
        host="127.0.0.1",
        port=0,
        artifact_root=tmp_path / "artifacts",
        backend="verl",
        verl_launcher="ray",
        ray_address=f"http://127.0.0.1:{free_port()}",
    )
    server, _, port = create_server(settings)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            problems, output = _inputs(tmp_path)
            request = _request("exp-0/round-00001/train", random_tiny_checkpoint, problems, output)
            with pytest.raises(grpc.RpcError) as info:
                list(training_pb2_grpc.TrainerServiceStub(channel).Train(request, timeout=60))
    finally:
        server.stop(None)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert f"cannot reach the Ray head at {settings.ray_address}" in info.value.details()
    [kept] = output.parent.iterdir()
    assert kept.name.startswith(".round-00001-verl-ray-") and (kept / "train.parquet").is_file()


# --- with a local Ray head -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    head = start_ray_head(tmp_path_factory.mktemp("ray-head") / "ray-start.log")
    yield head
    head.stop()


@pytest.fixture
def stand_in_verl(monkeypatch):
    """The stand-in verl on PYTHONPATH: the trainer puts its PYTHONPATH in the Ray job's environment
    (job.env) and runs the merger stand-in here."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(STAND_IN_VERL), os.environ.get("PYTHONPATH")) if p))
    return STAND_IN_VERL


@pytest.fixture
def ray_trainer(tmp_path, ray_head, stand_in_verl):
    """start(env_vars) -> a stub of an in-process trainer service whose verl runs as Ray jobs on ray_head."""
    servers, channels = [], []

    def start(env_vars: dict[str, str] | None = None):
        settings = TrainerSettings(
            host="127.0.0.1",
            port=0,
            artifact_root=tmp_path / "artifacts",
            backend="verl",
            verl_python=sys.executable,
            verl_launcher="ray",
            ray_address=ray_head.address,
            ray_entrypoint_python=sys.executable,
            ray_env_vars=env_vars or {},
        )
        server, _, port = create_server(settings)
        server.start()
        servers.append(server)
        channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return training_pb2_grpc.TrainerServiceStub(channels[-1])

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(None)


def _request(request_id: str, checkpoint: Path, problems: Path, output: Path, steps: int = 3) -> training_pb2.TrainRequest:
    return training_pb2.TrainRequest(
        request_id=request_id,
        checkpoint=str(checkpoint),
        problems_path=str(problems),
        output_checkpoint=str(output),
        hyperparams=training_pb2.TrainHyperparams(
            steps=steps,
            batch_size=2,
            learning_rate=1e-6,
            kl_coef=0.01,
            sampling=common_pb2.SamplingParams(n=4, max_tokens=8, temperature=1.0),
            seed=5,
        ),
    )


def _inputs(tmp_path: Path, name: str = "round-00001") -> tuple[Path, Path]:
    problems = write_problems(tmp_path / "artifacts" / "selection.parquet", constant_answer_problems(5))
    return problems, tmp_path / "artifacts" / "checkpoints" / name


def _jobs_of(client, request_id: str) -> list:
    base = submission_id_for(request_id)
    return sorted((j for j in client.list_jobs() if (j.submission_id or "").startswith(base)), key=lambda j: j.submission_id)


def _wait_status(client, submission_id: str, wanted: set[str], timeout_s: float) -> tuple[str, float]:
    started = time.monotonic()
    status = str(client.get_job_status(submission_id))
    while status not in wanted and time.monotonic() - started < timeout_s:
        time.sleep(0.1)
        status = str(client.get_job_status(submission_id))
    return status, time.monotonic() - started


def _wait_gone(paths, timeout_s: float) -> float:
    started = time.monotonic()
    while any(p.exists() for p in paths) and time.monotonic() - started < timeout_s:
        time.sleep(0.05)
    return time.monotonic() - started


def _steps(events) -> list:
    return [e.step for e in events if e.WhichOneof("event") == "step"]


@pytest.mark.slow
def test_a_ray_job_trains_then_the_merger_runs_here(ray_trainer, ray_head, random_tiny_checkpoint, tmp_path):
    stub = ray_trainer()
    problems, output = _inputs(tmp_path)
    request = _request("exp-1/round-00001/train", random_tiny_checkpoint, problems, output)
    events = list(stub.Train(request, timeout=180))
    steps, result = _steps(events), events[-1].result
    assert [s.step for s in steps] == [1, 2, 3] and all(s.mean_reward == 1.0 for s in steps)
    assert steps[0].loss == pytest.approx(0.1) and steps[0].tokens_per_second == pytest.approx(3.0 * 8 / 0.5)
    assert result.checkpoint == str(output) and result.steps == 3
    load_model(output)  # the merged directory is a loadable HF checkpoint
    marker = json.loads((output / MARKER_NAME).read_text())
    assert marker["backend"] == "verl" and [m["step"] for m in marker["metrics"]] == [1, 2, 3]
    # it ran as our Ray job, with the same command as the local launcher, on absolute artifact-store paths
    client = ray_head.client()
    [job] = _jobs_of(client, request.request_id)
    assert job.submission_id == submission_id_for(request.request_id) and str(job.status) == "SUCCEEDED"
    assert job.metadata[REQUEST_ID_KEY] == request.request_id and len(job.metadata[FINGERPRINT_KEY]) == 64
    assert shlex.split(job.entrypoint)[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    ran = json.loads((output / "stand-in-run.json").read_text())
    assert ran["ray_job_config"]["metadata"][REQUEST_ID_KEY] == request.request_id
    args = ran["args"]
    assert args["actor_rollout_ref.model.path"] == str(random_tiny_checkpoint)
    assert args["reward.custom_reward_function.path"] == str(REWARD_FILE)
    artifacts = (tmp_path / "artifacts").resolve()
    for key in ("data.train_files", "trainer.default_local_dir"):
        assert Path(args[key]).is_absolute() and Path(args[key]).is_relative_to(artifacts)
    # atomically in place; the request's scratch directory is gone
    assert sorted(p.name for p in output.parent.iterdir()) == ["round-00001"]
    # the same request again is answered from the checkpoint's marker: no second Ray job
    again = list(stub.Train(request, timeout=60))
    assert [s.step for s in _steps(again)] == [1, 2, 3] and len(_jobs_of(client, request.request_id)) == 1


@pytest.mark.slow
def test_cancelling_the_call_stops_the_ray_job(ray_trainer, ray_head, random_tiny_checkpoint, tmp_path):
    gate, pid_file = tmp_path / "gate-never-opens", tmp_path / "verl.pid"
    stub = ray_trainer({"STAND_IN_VERL_GATE": str(gate), "STAND_IN_VERL_PID_FILE": str(pid_file)})
    problems, output = _inputs(tmp_path)
    request = _request("exp-2/round-00001/train", random_tiny_checkpoint, problems, output)
    sid = submission_id_for(request.request_id)
    stream = stub.Train(request, timeout=180)
    first = next(stream)
    assert first.step.step == 1  # verl is running, held at step 1
    work_dirs = list(output.parent.glob(".round-00001-verl-ray-*"))
    assert len(work_dirs) == 1 and str(ray_head.client().get_job_status(sid)) == "RUNNING"
    cancelled_at = time.monotonic()
    stream.cancel()
    status, stop_s = _wait_status(ray_head.client(), sid, {"STOPPED"}, timeout_s=30)
    _wait_gone(work_dirs, timeout_s=30)  # the backend removes it once the launcher has returned
    returned_s = time.monotonic() - cancelled_at
    print(f"cancel: Ray job {status} {stop_s:.2f} s after the call was cancelled; the handler returned within {returned_s:.2f} s")
    assert status == "STOPPED" and stop_s < CANCEL_LIMIT_S
    assert not work_dirs[0].exists() and returned_s < CANCEL_LIMIT_S  # the request's handler has returned
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not output.exists() and list(output.parent.iterdir()) == []


@pytest.mark.slow
def test_a_failed_ray_job_fails_the_request_with_its_last_lines(ray_trainer, ray_head, random_tiny_checkpoint, tmp_path):
    stub = ray_trainer({"STAND_IN_VERL_FAIL": "1"})
    problems, output = _inputs(tmp_path)
    request = _request("exp-3/round-00001/train", random_tiny_checkpoint, problems, output)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(request, timeout=180))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert f"Ray job {submission_id_for(request.request_id)} FAILED" in details
    assert "CUDA out of memory (stand-in)" in details and "Error executing job with overrides" in details
    assert not output.exists() and list(output.parent.iterdir()) == []
    # a retry after a failure trains again (a new attempt), it does not re-read the failed job
    with pytest.raises(grpc.RpcError):
        list(stub.Train(request, timeout=180))
    client = ray_head.client()
    assert [j.submission_id for j in _jobs_of(client, request.request_id)] == [
        submission_id_for(request.request_id),
        submission_id_for(request.request_id, 2),
    ]
    # the same request id with another body is refused, not attached to the earlier jobs
    changed = _request(request.request_id, random_tiny_checkpoint, problems, output, steps=2)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(changed, timeout=60))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    launcher = RayLauncher(ray_head.address)
    with pytest.raises(RequestConflictError):
        launcher.submit_or_attach(client, None, RunIdentity(request.request_id, "another-body"))


@pytest.mark.slow
def test_a_ray_job_stopped_from_outside_fails_the_request(ray_trainer, ray_head, random_tiny_checkpoint, tmp_path):
    gate = tmp_path / "gate-never-opens"
    stub = ray_trainer({"STAND_IN_VERL_GATE": str(gate)})
    problems, output = _inputs(tmp_path)
    request = _request("exp-4/round-00001/train", random_tiny_checkpoint, problems, output)
    stream = stub.Train(request, timeout=180)
    assert next(stream).step.step == 1
    # meanwhile the same request id with another body, on another trainer: refused, the running job untouched
    [work_dir] = output.parent.glob(".round-00001-verl-ray-*")
    changed = _request(request.request_id, random_tiny_checkpoint, problems, output, steps=2)
    with pytest.raises(grpc.RpcError) as refused:
        list(ray_trainer({"STAND_IN_VERL_GATE": str(gate)}).Train(changed, timeout=60))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert list(output.parent.glob(".round-00001-verl-ray-*")) == [work_dir] and (work_dir / "train.parquet").is_file()
    assert str(ray_head.client().get_job_status(submission_id_for(request.request_id))) == "RUNNING"
    ray_head.client().stop_job(submission_id_for(request.request_id))  # e.g. an operator, or the cluster
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    details = info.value.details()
    assert "STOPPED" in details and "step:1 - actor/pg_loss" in details  # Ray's verdict and the last lines
    assert not output.exists()


@pytest.mark.slow
def test_a_killed_trainer_reattaches_to_its_ray_job(ray_head, stand_in_verl, random_tiny_checkpoint, tmp_path):
    """kill -9 the trainer service mid-job, restart it, send the same request: one Ray job, and it completes."""
    gate = tmp_path / "gate"
    problems, output = _inputs(tmp_path)
    request = _request("exp-5/round-00001/train", random_tiny_checkpoint, problems, output)
    sid = submission_id_for(request.request_id)
    port = free_port()
    env = {
        **os.environ,
        "GRADALIGN_TRAINER_PORT": str(port),
        "GRADALIGN_TRAINER_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "GRADALIGN_TRAINER_TORCH_THREADS": "1",
        "GRADALIGN_TRAINER_BACKEND": "verl",
        "GRADALIGN_TRAINER_VERL_PYTHON": sys.executable,
        "GRADALIGN_TRAINER_VERL_LAUNCHER": "ray",
        "GRADALIGN_TRAINER_RAY_ADDRESS": ray_head.address,
        "GRADALIGN_TRAINER_RAY_ENTRYPOINT_PYTHON": sys.executable,
        "GRADALIGN_TRAINER_RAY_ENV_VARS": json.dumps({"STAND_IN_VERL_GATE": str(gate)}),
    }
    client = ray_head.client()
    procs = []

    def start_trainer(n: int):
        procs.append(start_process(service_command("trainer"), env, tmp_path / f"trainer-{n}.log"))
        assert wait_healthy(f"127.0.0.1:{port}", timeout=120), (tmp_path / f"trainer-{n}.log").read_text()[-3000:]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        return channel, training_pb2_grpc.TrainerServiceStub(channel)

    try:
        channel, stub = start_trainer(1)
        stream = stub.Train(request, timeout=180)
        assert next(stream).step.step == 1  # the job runs, held at step 1
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait(timeout=30)
        channel.close()
        assert str(client.get_job_status(sid)) == "RUNNING"  # the job outlives its trainer

        channel, stub = start_trainer(2)
        stream = stub.Train(request, timeout=180)
        assert next(stream).step.step == 1  # re-attached: the log is read again from its start
        gate.touch()
        events = [e for e in stream]
        channel.close()
        assert [s.step for s in _steps(events)] == [2, 3] and events[-1].result.steps == 3
        jobs = _jobs_of(client, request.request_id)
        assert [(j.submission_id, str(j.status)) for j in jobs] == [(sid, "SUCCEEDED")]  # one job, never resubmitted
        load_model(output)
        assert [m["step"] for m in json.loads((output / MARKER_NAME).read_text())["metrics"]] == [1, 2, 3]
        assert sorted(p.name for p in output.parent.iterdir()) == ["round-00001"]
        assert "ray_job_attached" in (tmp_path / "trainer-2.log").read_text()
    finally:
        gate.touch()  # a stand-in still held at step 1 finishes
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
