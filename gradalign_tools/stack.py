"""Running the four services as local processes on loopback ports (`gradalign up`, the demo, tests).

Each service is its own process (`python -m services.<name>.server` or the scheduler's
app), configured through its settings' environment variables, with this process's
interpreter unless `StackConfig.python` names another for it (e.g. the rollout service from
`.venv-vllm`, where vLLM's CPU build lives). `LocalStack.start` waits until every service is
healthy; `LocalStack.dead` returns the name of the first that died.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gradalign_common.grpc_utils import check_health

WORKERS = ("rollout", "scoring", "trainer")
SERVICES = ("rollout", "scoring", "trainer", "scheduler")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StackConfig:
    home: Path
    api_port: int = 8000
    rollout_port: int = 50051
    scoring_port: int = 50052
    trainer_port: int = 50053
    database_url: str | None = None  # default: SQLite under home
    redis_url: str | None = None
    models_root: Path | None = None  # where experiments' models must lie; None: the scheduler's own setting
    torch_threads: int = 0
    api_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # made valid at the scheduler's start
    extra_env: dict[str, str] = field(default_factory=dict)
    python: dict[str, str] = field(default_factory=dict)  # service -> interpreter; default sys.executable

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_token}"}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def address(self, name: str) -> str:
        return f"127.0.0.1:{getattr(self, f'{name}_port')}"

    def env(self, name: str) -> dict[str, str]:
        home = self.home.resolve()
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        artifacts = str(home / "artifacts")
        if name in WORKERS:
            prefix = f"GRADALIGN_{name.upper()}_"
            env[prefix + "PORT"] = str(getattr(self, f"{name}_port"))
            env[prefix + "ARTIFACT_ROOT"] = artifacts
            env[prefix + "TORCH_THREADS"] = str(self.torch_threads)
        else:
            p = "GRADALIGN_SCHEDULER_"
            env[p + "PORT"] = str(self.api_port)
            env[p + "ARTIFACT_ROOT"] = artifacts
            env[p + "DATABASE_URL"] = self.database_url or f"sqlite:///{home / 'scheduler.db'}"
            env[p + "BOOTSTRAP_TOKEN"] = self.api_token
            if self.redis_url:
                env[p + "REDIS_URL"] = self.redis_url
            if self.models_root is not None:
                env[p + "MODELS_ROOT"] = str(self.models_root.resolve())
            env[p + "ROLLOUT_ADDRESSES"] = f'["{self.address("rollout")}"]'
            env[p + "SCORING_ADDRESSES"] = f'["{self.address("scoring")}"]'
            env[p + "TRAINER_ADDRESS"] = self.address("trainer")
        return env


def service_command(name: str, python: str | None = None) -> list[str]:
    module = "services.scheduler.app" if name == "scheduler" else f"services.{name}.server"
    return [python or sys.executable, "-m", module]


def start_process(command: list[str], env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """Start one service process in its own session (a signal to us does not reach it), its output appended to
    log_path (or discarded)."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


def stop_processes(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM every process still running (each drains its work), then SIGKILL what is left after `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalStack:
    def __init__(self, config: StackConfig, log_dir: Path | None = None):
        self.config = config
        self.log_dir = log_dir or config.home / "logs"
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, names: tuple[str, ...] = SERVICES, timeout: float = 180.0) -> None:
        self.config.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            self.start_one(name)
        deadline = time.monotonic() + timeout
        for name in names:
            while not self.healthy(name):
                dead = self.dead()
                if dead:
                    raise RuntimeError(f"the {dead} service exited during start-up; see {self.log_path(dead)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {name} service was not healthy within {timeout:.0f}s; see {self.log_path(name)}")
                time.sleep(0.2)

    def start_one(self, name: str) -> subprocess.Popen:
        proc = start_process(service_command(name, self.config.python.get(name)), self.config.env(name), self.log_path(name))
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def healthy(self, name: str) -> bool:
        if name == "scheduler":
            try:
                return httpx.get(f"{self.config.api_url}/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False
        return check_health(self.config.address(name), timeout=1.0)

    def dead(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name
        return None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> None:
        stop_processes(list(self.procs.values()), timeout)
        self.procs.clear()

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
