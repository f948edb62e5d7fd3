"""The request gate: how many requests a worker takes at once, the rest refused at once.

A worker's streaming handlers run on the gRPC server's thread pool and serialise on the
worker's model lock. Without a limit, requests beyond the first queue on that lock, each
holding a pool thread; once every thread is held, the health service cannot answer and a
liveness probe kills a worker that is merely busy. The gate admits up to `capacity` requests
(running or waiting for the lock) and refuses any more immediately with WorkerBusyError,
which `grpc_utils.rpc_errors` sends as RESOURCE_EXHAUSTED (the scheduler retries it later).
`grpc_utils.build_server` sizes the pool to capacity + spare threads, so health checks always
find a thread.

A slot is released when the handler's generator ends for any reason: it returns, raises, or
is closed because the client cancelled (GeneratorExit at its yield).

Prometheus: gradalign_worker_requests_in_flight{service} (gauge) and
gradalign_worker_requests_refused_total{service} (counter).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from prometheus_client import Counter, Gauge

from gradalign_common.errors import WorkerBusyError
from gradalign_common.logging_setup import get_logger

IN_FLIGHT = Gauge("gradalign_worker_requests_in_flight", "Requests a worker has admitted and not finished", ["service"])
REFUSED = Counter(
    "gradalign_worker_requests_refused_total", "Requests refused because every request slot was in use", ["service"]
)

log = get_logger("gradalign.gate")


class RequestGate:
    """At most `capacity` requests of one service in flight; `slot()` admits one or raises WorkerBusyError."""

    def __init__(self, service: str, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.service = service
        self.capacity = capacity
        self._in_flight = 0
        self._lock = threading.Lock()

    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        with self._lock:
            return self._in_flight

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one request slot for the body of the `with`; raise WorkerBusyError when none is free."""
        with self._lock:
            if self._in_flight >= self.capacity:
                busy = self._in_flight
                admitted = False
            else:
                self._in_flight += 1
                admitted = True
        if not admitted:
            REFUSED.labels(self.service).inc()
            log.info("request_refused", service=self.service, in_flight=busy, capacity=self.capacity)
            raise WorkerBusyError(
                f"{self.service} service busy: {busy} of {self.capacity} request slots in use; retry later"
            )
        IN_FLIGHT.labels(self.service).inc()
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
            IN_FLIGHT.labels(self.service).dec()
