"""gRPC helpers shared by the worker services and their clients.

- `build_server` creates a server with the standard health service (grpc.health.v1);
  `run_until_signalled` serves it, with a Prometheus metrics endpoint, until SIGTERM/SIGINT.
- `rpc_errors` maps InvalidInputError -> INVALID_ARGUMENT, NotFoundError -> NOT_FOUND,
  RequestConflictError -> ALREADY_EXISTS, WorkerBusyError -> RESOURCE_EXHAUSTED,
  ZeroValidationGradientError -> FAILED_PRECONDITION, anything
  else -> INTERNAL, with the message as detail, for streaming handlers; a cancelled call
  (RequestCancelled raised by the handler, or the stream closed by grpc because the client
  went away) ends quietly with a `<service>_cancelled` log event; `stop_if_cancelled` raises it.
  `build_server` sizes its thread pool to the worker's request capacity plus spare threads
  (gradalign_common.request_gate), so the health service always has a thread.
- `wait_healthy` polls a server's health service (used by `gradalign up` and tests).
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, Histogram, start_http_server

from gradalign_common.errors import (
    InvalidInputError,
    NotFoundError,
    RequestCancelled,
    RequestConflictError,
    WorkerBusyError,
    ZeroValidationGradientError,
)
from gradalign_common.logging_setup import get_logger

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

RPC_SECONDS = Histogram("gradalign_rpc_seconds", "Duration of gRPC handler calls", ["service", "method", "code"])
RPC_ERRORS = Counter("gradalign_rpc_errors_total", "gRPC handler calls that ended with an error", ["service", "method", "code"])

log = get_logger("gradalign.grpc")


# our errors -> the status the caller sees; subclasses before their base classes (the first match wins)
ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (WorkerBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestConflictError, grpc.StatusCode.ALREADY_EXISTS),
    (ZeroValidationGradientError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
)
ERROR_CODES_CAUGHT = tuple(cls for cls, _ in ERROR_CODES)


def status_code_of(exc: Exception) -> grpc.StatusCode:
    return next(code for cls, code in ERROR_CODES if isinstance(exc, cls))


def rpc_errors(service: str) -> Callable:
    """Decorate a server-streaming handler(self, request, context) so errors become gRPC status codes."""

    def decorator(handler: Callable[..., Iterator]) -> Callable[..., Iterator]:
        method = handler.__name__

        @functools.wraps(handler)
        def wrapper(self, request, context: grpc.ServicerContext):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                yield from handler(self, request, context)
            except GeneratorExit:  # grpc closed the stream at a yield: the client cancelled or went away
                code = grpc.StatusCode.CANCELLED
                _log_cancelled(service, method, request, start, "stream closed")
                raise
            except RequestCancelled as exc:  # the handler noticed the cancel itself and stopped its work
                code = grpc.StatusCode.CANCELLED
                _log_cancelled(service, method, request, start, str(exc))
                return
            except ERROR_CODES_CAUGHT as exc:
                code = status_code_of(exc)
                context.abort(code, str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the caller, the server keeps serving
                if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortionError":
                    raise
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_failed", service=service, method=method)
                context.abort(code, f"{type(exc).__name__}: {exc}")
            finally:
                RPC_SECONDS.labels(service, method, code.name).observe(time.perf_counter() - start)
                if code != grpc.StatusCode.OK:
                    RPC_ERRORS.labels(service, method, code.name).inc()

        return wrapper

    return decorator


def stop_if_cancelled(context: grpc.ServicerContext | None, where: str) -> None:
    """Raise RequestCancelled (ended quietly by rpc_errors) when the caller has cancelled the call.

    Long work calls it between units (slices, batches, steps): grpc itself only notices a cancel
    when the handler next yields. `where` says how far the work got, for the log. A None context
    (a servicer called directly, not over gRPC) is never cancelled.
    """
    if context is not None and not context.is_active():
        raise RequestCancelled(where)


def _log_cancelled(service: str, method: str, request, start: float, detail: str) -> None:
    log.info(
        f"{service}_cancelled", method=method, request_id=getattr(request, "request_id", ""),
        seconds=round(time.perf_counter() - start, 3), detail=detail,
    )


# threads beyond a worker's request capacity: health checks, and refusing the requests over capacity
SPARE_THREADS = 4


def build_server(
    host: str, port: int, service_names: list[str], max_workers: int | None = None, *, capacity: int = 1
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """Create a server with the health service registered; returns (server, health, bound port).

    The thread pool has `max_workers` threads when given, else `capacity + SPARE_THREADS`: a
    worker whose RequestGate admits at most `capacity` requests keeps SPARE_THREADS threads free
    for the health service and for answering RESOURCE_EXHAUSTED to the requests beyond capacity.
    """
    threads = max_workers if max_workers is not None else capacity + SPARE_THREADS
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=CHANNEL_OPTIONS)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer, bound


def mark_serving(health_servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def run_until_signalled(
    server: grpc.Server, health_servicer: health.HealthServicer, metrics_host: str, metrics_port: int
) -> None:
    """Serve until SIGTERM/SIGINT, then drain for a grace period. metrics_port 0: no metrics endpoint."""
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)
    stop = threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def check_health(address: str, timeout: float = 2.0, service: str = "") -> bool:
    try:
        with channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def wait_healthy(address: str, timeout: float = 120.0, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check_health(address):
            return True
        time.sleep(interval)
    return False
