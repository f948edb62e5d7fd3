"""gRPC helpers shared by the worker services and their clients.

- `build_server` creates a server with the standard health service (grpc.health.v1);
  `run_until_signalled` serves it, with a Prometheus metrics endpoint, until SIGTERM/SIGINT, then
  drains it (below).
- `rpc_errors` maps InvalidInputError -> INVALID_ARGUMENT, NotFoundError -> NOT_FOUND,
  RequestConflictError -> ALREADY_EXISTS, WorkerBusyError -> RESOURCE_EXHAUSTED,
  ZeroValidationGradientError -> FAILED_PRECONDITION, anything
  else -> INTERNAL, with the message as detail, for streaming handlers; a cancelled call
  (RequestCancelled raised by the handler, or the stream closed by grpc because the client
  went away) ends quietly with a `<service>_cancelled` log event; `stop_if_cancelled` raises it.
  A call handed back by the drain (below) reads as cancelled too, but ends with UNAVAILABLE.
  `build_server` sizes its thread pool to the worker's request capacity plus spare threads
  (gradalign_common.request_gate), so the health service always has a thread.
- `wait_healthy` polls a server's health service (used by `gradalign up` and tests).

Graceful shutdown (scale-down never kills a running shard): `build_server` puts a `Drain` in front
of every server-streaming handler (every worker RPC; the health service is left alone). On the
first SIGTERM/SIGINT, `run_until_signalled`
1. stops admitting: a new call is refused at once with UNAVAILABLE (the scheduler retries it,
   on another replica), and the health service answers NOT_SERVING for every service (readiness
   probes fail, the scheduler's /readyz reports the worker down; Kubernetes also marks a terminating
   pod's endpoint not ready, so the scheduler's discovery drops it);
2. lets the calls in flight finish, for up to `shutdown_grace_s` (WorkerSettings.shutdown_grace_s);
3. when they have finished, stops the server and returns (the process exits); when the drain time
   runs out first (or a second signal arrives), hands the calls still in flight back: their
   handlers see the call as cancelled at their next check (`stop_if_cancelled`, or their next
   event), write nothing (outputs are written atomically at the end), and the call ends with
   UNAVAILABLE ("handed back"), which the scheduler retries like an unreachable worker. Handlers
   get HANDBACK_WAIT_S to stop; then the server stops, cancelling what is left (also UNAVAILABLE).
Logs: drain_started, drain_finished, drain_timeout, drain_handed_back, request_refused_draining.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
import weakref
from concurrent import futures
from typing import Any, Callable, Iterator

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
                if getattr(context, "handed_back", False):  # the drain ran out, not the caller: retry elsewhere
                    code = grpc.StatusCode.UNAVAILABLE
                    _log_cancelled(service, method, request, start, f"handed back: {exc}")
                    context.abort(code, HANDBACK_DETAIL)
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


# the first signal's drain time when a server passes none (WorkerSettings.shutdown_grace_s is the setting)
DEFAULT_SHUTDOWN_GRACE_S = 5.0
# after the drain time ran out: how long the handed-back handlers get to stop at their next check
HANDBACK_WAIT_S = 10.0
# server.stop's grace once the drain is over, so that the last statuses reach their callers
STOP_GRACE_S = 2.0
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
REFUSED_DETAIL = "worker is shutting down (draining): not taking new requests; retry on another replica"
HANDBACK_DETAIL = "worker is shutting down and its drain time ran out: request handed back; retry on another replica"

DRAIN_REFUSED = Counter("gradalign_worker_drain_refused_total", "Calls refused because the worker was draining", ["method"])
HANDED_BACK = Counter("gradalign_worker_handed_back_total", "Calls handed back when the drain time ran out", ["method"])

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
    drain = Drain()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads), options=CHANNEL_OPTIONS, interceptors=[_DrainInterceptor(drain)]
    )
    _DRAINS[server] = drain
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer, bound


def build_service_server(settings, service_name: str, add_to_server: Callable[[Any, grpc.Server], None], servicer):
    """build_server for a worker service from its settings (host, port, max_concurrent_requests), with
    `servicer` added by the generated `add_*Servicer_to_server`; not started. Returns (server, health, port)."""
    server, health_servicer, port = build_server(
        settings.host, settings.port, [service_name], capacity=settings.max_concurrent_requests
    )
    add_to_server(servicer, server)
    return server, health_servicer, port


def serve_until_signalled(settings, service_name: str, server: grpc.Server, health_servicer, port: int, **log_fields) -> None:
    """Start a server from build_service_server, mark it serving and run it until SIGTERM/SIGINT (then drain);
    `settings` gives the metrics endpoint and the shutdown grace."""
    server.start()
    mark_serving(health_servicer, [service_name])
    log.info("serving", service=service_name, address=f"{settings.host}:{port}", **log_fields)
    run_until_signalled(server, health_servicer, settings.metrics_host, settings.metrics_port, shutdown_grace_s=settings.shutdown_grace_s)


def mark_serving(health_servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def run_until_signalled(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    metrics_host: str,
    metrics_port: int,
    *,
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain (module docstring): refuse new calls, let the calls in flight
    finish for up to `shutdown_grace_s` seconds, hand back what is left, stop. A second signal cuts the
    drain short. metrics_port 0: no metrics endpoint."""
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)
    stop, hurry = threading.Event(), threading.Event()

    def _stop(signum, frame):  # noqa: ARG001
        (hurry if stop.is_set() else stop).set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    drain_and_stop(server, health_servicer, shutdown_grace_s, hurry)


def drain_and_stop(
    server: grpc.Server, health_servicer: health.HealthServicer, grace_s: float, hurry: threading.Event | None = None
) -> None:
    """Steps 1-3 of the module docstring for a server made by `build_server`; returns once it has stopped."""
    drain = _DRAINS.get(server)
    if drain is None:
        raise ValueError("drain_and_stop needs a server made by build_server")
    started = time.monotonic()
    drain.begin()
    health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING from now on
    log.info("drain_started", in_flight=drain.in_flight(), shutdown_grace_s=grace_s)
    if drain.wait_idle(grace_s, hurry):
        log.info("drain_finished", seconds=round(time.monotonic() - started, 3))
    else:
        log.warning("drain_timeout", in_flight=drain.in_flight(), shutdown_grace_s=grace_s,
                    cut_short=bool(hurry is not None and hurry.is_set()))
        handed_back = drain.expire()
        stopped = drain.wait_idle(HANDBACK_WAIT_S)
        log.warning("drain_handed_back", handed_back=handed_back, still_running=drain.in_flight(),
                    seconds=round(time.monotonic() - started, 3), stopped=stopped)
    server.stop(grace=STOP_GRACE_S).wait()


# --- the drain ----------------------------------------------------------------------------------

_DRAINS: "weakref.WeakKeyDictionary[grpc.Server, Drain]" = weakref.WeakKeyDictionary()


class Drain:
    """The calls in flight on one server, and whether it is draining (refusing new calls) or expired
    (the calls in flight are handed back: their contexts read as cancelled)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls: dict[int, str] = {}  # call id -> method, while in flight
        self._ids = iter(range(1, 1 << 62))
        self.draining = False
        self.expired = False

    def in_flight(self) -> int:
        with self._cond:
            return len(self._calls)

    def begin(self) -> None:
        with self._cond:
            self.draining = True

    def expire(self) -> int:
        """Hand back the calls in flight; returns how many."""
        with self._cond:
            self.draining = self.expired = True
            for method in self._calls.values():
                HANDED_BACK.labels(method).inc()
            return len(self._calls)

    def wait_idle(self, timeout: float, hurry: threading.Event | None = None) -> bool:
        """Whether no call is in flight within `timeout` seconds (False at once when `hurry` is set)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._calls:
                left = deadline - time.monotonic()
                if left <= 0 or (hurry is not None and hurry.is_set()):
                    return False
                self._cond.wait(min(left, 0.2))
            return True

    def admit(self, method: str) -> int | None:
        """A call id for a new call, or None while draining."""
        with self._cond:
            if self.draining:
                return None
            call = next(self._ids)
            self._calls[call] = method
            return call

    def done(self, call: int) -> None:
        with self._cond:
            self._calls.pop(call, None)
            self._cond.notify_all()

    def wrap(self, behavior: Callable[..., Iterator], method: str) -> Callable[..., Iterator]:
        """A server-streaming behavior counted while in flight, refused while draining, and handed back
        (closed, UNAVAILABLE) at its next event once the drain time ran out."""

        def drained(request, context: grpc.ServicerContext) -> Iterator:
            call = self.admit(method)
            if call is None:
                DRAIN_REFUSED.labels(method).inc()
                log.info("request_refused_draining", method=method, request_id=getattr(request, "request_id", ""))
                context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED_DETAIL)
            try:
                events = iter(behavior(request, _DrainContext(context, self)))
                handed_back = False
                try:
                    for event in events:
                        if self.expired:  # not even a last event: the caller retries the whole request
                            handed_back = True
                            break
                        yield event
                finally:
                    close = getattr(events, "close", None)
                    if close is not None:
                        close()  # the handler's own cleanup (request slot, model lock) runs now
                if handed_back:
                    context.abort(grpc.StatusCode.UNAVAILABLE, HANDBACK_DETAIL)
            finally:
                self.done(call)

        return drained


class _DrainContext:
    """The handler's view of its grpc context: inactive (cancelled) once the drain hands the call back."""

    def __init__(self, context: grpc.ServicerContext, drain: Drain):
        self._context = context
        self._drain = drain

    @property
    def handed_back(self) -> bool:
        return self._drain.expired

    def is_active(self) -> bool:
        return not self._drain.expired and self._context.is_active()

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class _DrainInterceptor(grpc.ServerInterceptor):
    """Puts the server's Drain in front of every server-streaming method but the health service's."""

    def __init__(self, drain: Drain):
        self._drain = drain

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_METHOD_PREFIX) or handler.unary_stream is None:
            return handler
        return handler._replace(unary_stream=self._drain.wrap(handler.unary_stream, method))


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
