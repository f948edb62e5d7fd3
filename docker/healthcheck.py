"""Container health check of a GradAlign service (the images' HEALTHCHECK; Kubernetes uses native probes).

Which service runs in this container: $GRADALIGN_SERVICE if set, else the `gradalign serve NAME`
command line of PID 1, else the scheduler. Then:
- scheduler: GET http://127.0.0.1:$GRADALIGN_SCHEDULER_PORT/healthz must answer 200 (liveness only:
  readiness also needs the workers, and a container that waits for them is not unhealthy);
- rollout/scoring/trainer: the grpc.health.v1 service on 127.0.0.1:$GRADALIGN_<NAME>_PORT must be SERVING.
Exit 0 when healthy, 1 otherwise (with the reason on stderr).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"scheduler": 8000, "rollout": 50051, "scoring": 50052, "trainer": 50053}
TIMEOUT_S = float(os.environ.get("GRADALIGN_HEALTHCHECK_TIMEOUT_S", "4"))


def service_name() -> str:
    name = os.environ.get("GRADALIGN_SERVICE", "").strip().lower()
    if name:
        return name
    try:
        argv = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    words = [a.decode(errors="replace") for a in argv if a]
    for i, word in enumerate(words[:-1]):
        if word == "serve" and words[i + 1] in DEFAULT_PORTS:
            return words[i + 1]
    # `sh -c "gradalign db upgrade && exec gradalign serve scheduler"` before the exec
    joined = " ".join(words)
    for name in DEFAULT_PORTS:
        if f"serve {name}" in joined:
            return name
    return "scheduler"


def port_of(name: str) -> int:
    raw = os.environ.get(f"GRADALIGN_{name.upper()}_PORT", "")
    return int(raw) if raw.strip() else DEFAULT_PORTS[name]


def check_http(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT_S) as response:  # noqa: S310 - fixed local URL
            return None if response.status == 200 else f"/healthz answered {response.status}"
    except OSError as exc:
        return f"/healthz on port {port}: {exc}"


def check_grpc(port: int) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return f"gRPC health on port {port}: {exc.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"gRPC health on port {port}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main() -> int:
    name = service_name()
    if name not in DEFAULT_PORTS:
        print(f"unknown service {name!r}", file=sys.stderr)
        return 1
    port = port_of(name)
    error = check_http(port) if name == "scheduler" else check_grpc(port)
    if error:
        print(f"{name} unhealthy: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
