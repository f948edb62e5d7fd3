"""The container images, without a Docker engine (users and CI build them elsewhere): the Dockerfiles
pass hadolint (from the dev extra via tests/deploy_tools.py: a missing tool fails the test) and the
project's policies, .dockerignore admits exactly what they copy, the wheel they install holds every
source file, and the images' health check script answers for a gRPC worker and for the scheduler.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import deploy_tools
from deploy_fixtures import ROOT, require_tool

DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"


# --- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    tool = require_tool(deploy_tools.hadolint)
    proc = subprocess.run([str(tool), "--failure-threshold", "error", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_policies(dockerfile):
    text = dockerfile.read_text()
    # base images pinned by tag and digest (through the ARG the FROM lines use)
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M)
    assert bases and all(re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", b) for b in bases), bases
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    assert re.search(r"^FROM \$\{\w+_IMAGE\} AS runtime$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] == "10001:10001", "the final stage runs as a fixed non-root UID"
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", \"/opt/gradalign/share/healthcheck.py\"\]", text, re.M)
    # no secrets baked in: no ENV/ARG named like a credential
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|API_KEY)", text, re.M | re.I)
    assert "check_install.py /src" in text
    if dockerfile.name == "Dockerfile.cpu":
        torch = text.index('"torch==${TORCH_VERSION}"')
        assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
        assert torch < text.index("pip install --no-cache-dir --no-deps /src"), "torch before the project"
    else:
        # the pinned stack as locked, checked where it is built and where it runs
        assert "RUN pip install --no-cache-dir -r /src/requirements/gpu.lock" in text
        assert "check_gpu_stack.py --lock /src/requirements/gpu.lock" in text
        runtime = text[text.index("AS runtime"):]
        assert "check_gpu_stack.py --lock /opt/gradalign/share/gpu.lock --compiler" in runtime
        # Triton compiles its launcher at the first kernel: a C compiler and Python's headers at run time
        apt = re.search(r"apt-get install[^\n]*", runtime).group(0)
        assert {"gcc", "libc6-dev", "python3.12-dev"} <= set(apt.split()), apt


def test_dockerignore_is_an_allow_list():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml", "README.md", "gradalign_common", "gradalign_tools", "services", "protos",
        "docker/check_install.py", "docker/check_gpu_stack.py", "docker/healthcheck.py", "requirements/gpu.lock",
    }
    # everything the Dockerfiles COPY from the context is allowed in
    for dockerfile in DOCKERFILES:
        for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), re.M):
            for source in sources.split():
                assert source.rstrip("/") in allowed, (dockerfile.name, source)


def test_wheel_packs_every_source_file(tmp_path):
    """The images install the project non-editable: every file of the packages must be in the wheel.

    Data files (Alembic migrations, the dashboard's static files) need package-data in
    pyproject.toml; without it the image build fails (docker/check_install.py) or a service breaks
    at run time. Built from a copy of the sources, so the work tree gets no build/ folder.
    """
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("gradalign_common", "gradalign_tools", "services", "protos"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    try:
        import setuptools  # noqa: F401 - the build backend, when the venv has it
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []  # pip fetches setuptools from the package index
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("gradalign-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(
        str(path.relative_to(src))
        for package in ("gradalign_common", "gradalign_tools", "services")
        for path in (src / package).rglob("*")
        if path.is_file() and str(path.relative_to(src)) not in packed
    )
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data] in pyproject.toml): {missing}"


# --- the images' health check script -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("GRADALIGN_")}
    full.update(env)
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, env=full, timeout=60)


def test_healthcheck_of_a_grpc_worker():
    from grpc_health.v1 import health_pb2

    from gradalign_common.grpc_utils import build_server

    server, health, port = build_server("127.0.0.1", 0, ["gradalign.v1.ScoringService"])
    server.start()
    try:
        env = {"GRADALIGN_SERVICE": "scoring", "GRADALIGN_SCORING_PORT": str(port)}
        health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        proc = _healthcheck(env)
        assert proc.returncode == 1 and "NOT_SERVING" in proc.stderr, proc.stderr
        health.set("", health_pb2.HealthCheckResponse.SERVING)
        proc = _healthcheck(env)
        assert proc.returncode == 0, proc.stderr
    finally:
        server.stop(0)
    proc = _healthcheck({"GRADALIGN_SERVICE": "scoring", "GRADALIGN_SCORING_PORT": str(_free_port())})
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr


class _Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = type(self).status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_healthcheck_of_the_scheduler():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"GRADALIGN_SERVICE": "scheduler", "GRADALIGN_SCHEDULER_PORT": str(server.server_address[1])}
        _Healthz.status = 200
        assert _healthcheck(env).returncode == 0
        _Healthz.status = 503
        proc = _healthcheck(env)
        assert proc.returncode == 1 and "503" in proc.stderr, proc.stderr
    finally:
        server.shutdown()
        server.server_close()
