"""Worker capacity: how many requests each worker replica serves at once, and who goes next.

Each replica (a worker address) has `slots` places, from the scheduler's settings per
service. A request takes a place before it is sent and gives it back when the call ends,
so work beyond capacity waits here, in the scheduler, never inside a worker; the queue
depth per service is exported for an autoscaler.

When experiments compete for a replica, the freed place goes to the waiting request whose
experiment has had the least service so far, weighted by its priority (weighted fair
queueing by service time: an experiment of priority 2 gets about twice the worker time of
one of priority 1). An experiment that joins starts level with the least-served experiment
known (finished ones are forgotten), so a newcomer does not starve one that has already run
for hours.
Ties go to the request that waited longest.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from prometheus_client import Gauge

QUEUE_DEPTH = Gauge("gradalign_worker_queue_depth", "Requests waiting at the scheduler for a worker slot", ["service"])
SLOTS_BUSY = Gauge("gradalign_worker_slots_busy", "Worker slots in use", ["service"])


class SlotWaitCancelled(Exception):
    """The request stopped waiting for a slot because its experiment was cancelled or the scheduler stops."""


@dataclass(frozen=True)
class _Waiter:
    seq: int
    experiment_id: int
    address: str


class WorkerCapacity:
    def __init__(self, slots: dict[str, int], poll_s: float = 0.2):
        if any(n < 1 for n in slots.values()):
            raise ValueError(f"every service needs at least one slot per replica: {slots}")
        self.slots = dict(slots)
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._busy: dict[str, int] = defaultdict(int)  # address -> places in use
        self._waiting: list[_Waiter] = []
        self._service: dict[int, float] = defaultdict(float)  # experiment -> weighted seconds held
        self._seq = itertools.count()

    def queue_depth(self, service: str | None = None) -> int:
        with self._cond:
            return len(self._waiting) if service is None else sum(1 for w in self._waiting if w.address.startswith(f"{service}@"))

    def busy(self, role: str, address: str) -> int:
        with self._cond:
            return self._busy[_key(role, address)]

    @contextmanager
    def slot(
        self,
        role: str,
        address: str,
        experiment_id: int,
        priority: float = 1.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[float]:
        """Hold one place on `address` (a replica of service `role`) for the block; yields the seconds
        waited. Raises SlotWaitCancelled if should_stop() turns true while waiting."""
        if priority <= 0:
            raise ValueError(f"priority must be > 0, got {priority}")
        key = _key(role, address)
        capacity = self.slots[role]
        started = time.monotonic()
        with self._cond:
            if experiment_id not in self._service:  # a newcomer starts level with the least served
                self._service[experiment_id] = min(self._service.values(), default=0.0)
            me = _Waiter(next(self._seq), experiment_id, key)
            self._waiting.append(me)
            QUEUE_DEPTH.labels(role).inc()
            try:
                while not (self._busy[key] < capacity and self._first_for(key) is me):
                    if should_stop is not None and should_stop():
                        raise SlotWaitCancelled(f"stopped waiting for a {role} slot at {address}")
                    self._cond.wait(self.poll_s)
            finally:
                self._waiting.remove(me)
                QUEUE_DEPTH.labels(role).dec()
                self._cond.notify_all()
            self._busy[key] += 1
            SLOTS_BUSY.labels(role).inc()
        waited = time.monotonic() - started
        held_from = time.monotonic()
        try:
            yield waited
        finally:
            with self._cond:
                self._busy[key] -= 1
                self._service[experiment_id] += (time.monotonic() - held_from) / priority
                SLOTS_BUSY.labels(role).dec()
                self._cond.notify_all()

    def forget(self, experiment_id: int) -> None:
        """Drop an experiment's service account (it finished, failed or was cancelled)."""
        with self._cond:
            if not any(w.experiment_id == experiment_id for w in self._waiting):
                self._service.pop(experiment_id, None)

    def _first_for(self, key: str) -> _Waiter | None:
        """Next in line for a replica: least weighted service so far, then longest waiting."""
        return min(
            (w for w in self._waiting if w.address == key), key=lambda w: (self._service[w.experiment_id], w.seq), default=None
        )


def _key(role: str, address: str) -> str:
    return f"{role}@{address}"
