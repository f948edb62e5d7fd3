"""docker-compose.yml: valid against the compose specification (check-jsonschema, from the dev extra
via tests/deploy_tools.py: a missing tool fails the test), and the services it defines (PostgreSQL,
Redis, the scheduler, and each worker on CPU and, in the `gpu` profile, on CUDA).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

import deploy_tools
from deploy_fixtures import ROOT, WORKERS, require_tool

COMPOSE = ROOT / "docker-compose.yml"


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    tool = require_tool(deploy_tools.check_jsonschema)
    return subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_spec():
    proc = _check_compose(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_validation_catches_mistakes(tmp_path):
    """The validator is strict: a misspelt service key fails (so the check above means something)."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace('command: ["gradalign", "serve", "trainer"]', 'comand: ["gradalign", "serve", "trainer"]', 1))
    proc = _check_compose(bad)
    assert proc.returncode != 0 and "comand" in proc.stdout + proc.stderr


def test_compose_services():
    compose = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the << merge keys like compose does
    services = compose["services"]
    assert {"postgres", "redis", "scheduler", *WORKERS, *(f"{w}-gpu" for w in WORKERS)} == set(services)
    for name in ("postgres", "redis"):
        assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", services[name]["image"]), name
    scheduler = services["scheduler"]
    assert re.search(r"gradalign db upgrade && exec gradalign serve scheduler", " ".join(scheduler["command"]))
    assert scheduler["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert scheduler["environment"]["GRADALIGN_SCHEDULER_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert scheduler["environment"]["GRADALIGN_SCHEDULER_MODELS_ROOT"] == "/data/artifacts/models"
    assert "artifacts" in compose["volumes"]
    for name in ("scheduler", *WORKERS, *(f"{w}-gpu" for w in WORKERS)):
        svc = services[name]
        assert "artifacts:/data/artifacts" in svc["volumes"], name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
    for role in WORKERS:
        cpu, gpu = services[role], services[f"{role}-gpu"]
        assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu" and "profiles" not in cpu
        assert cpu["command"] == gpu["command"] == ["gradalign", "serve", role]
        assert cpu["environment"][f"GRADALIGN_{role.upper()}_DEVICE"] == "cpu"
        assert gpu["profiles"] == ["gpu"]
        assert gpu["build"]["dockerfile"] == "docker/Dockerfile.cuda"
        assert gpu["environment"][f"GRADALIGN_{role.upper()}_DEVICE"] == "cuda"
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert gpu["networks"]["default"]["aliases"] == [role]  # the scheduler's addresses name either set


def _interpolated(value, env: dict[str, str]):
    """A compose value as compose would run it: ${VAR:-default} substituted, $$ made $."""

    def one(text: str) -> str:
        text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), text)
        return text.replace("$$", "$")

    if isinstance(value, list):
        return [one(v) for v in value]
    if isinstance(value, dict):
        return {k: one(v) for k, v in value.items()}
    return one(value)


def test_the_bundled_redis_needs_the_password_the_scheduler_is_given(tmp_path):
    """Run the compose file's own Redis command (this machine's redis-server, on a free port): a client without
    the password is refused, the scheduler's URL from the compose file gets in, and the health check passes."""
    import shutil
    import socket
    import time

    import redis

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    env = {"REDIS_PASSWORD": "s3cret-from-env"}
    redis_env = _interpolated(services["redis"]["environment"], env)
    command = _interpolated(services["redis"]["command"], env)
    url = _interpolated(services["scheduler"]["environment"]["GRADALIGN_SCHEDULER_REDIS_URL"], env)
    assert "s3cret-from-env" not in " ".join(command)  # from the environment, not the command line
    assert url == "redis://:s3cret-from-env@redis:6379/0"
    server = shutil.which("redis-server")
    assert server, "redis-server is needed (it runs on every developer and CI machine)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command[-1] += f" --port {port} --bind 127.0.0.1 --dir {tmp_path}"
    proc = subprocess.Popen(command, env={"PATH": "/usr/bin:/bin:/usr/local/bin", **redis_env})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
                time.sleep(0.1)
        try:
            redis.Redis(host="127.0.0.1", port=port).ping()
            raise AssertionError("a client without the password was let in")
        except redis.AuthenticationError:
            pass
        assert redis.Redis.from_url(url.replace("@redis:6379", f"@127.0.0.1:{port}")).ping()
        health = [arg for arg in services["redis"]["healthcheck"]["test"] if arg != "CMD"]
        check = subprocess.run([health[0], "-p", str(port), *health[1:]], env={"PATH": "/usr/bin:/bin", **redis_env}, capture_output=True, text=True, timeout=10)
        assert check.stdout.strip() == "PONG", check.stdout + check.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=10)
