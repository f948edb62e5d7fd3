"""Worker capacity at the scheduler (services/scheduler/capacity.py): slots per replica, fair queueing
between experiments by priority, queue depth, and giving up a wait on cancellation."""

from __future__ import annotations

import threading
import time

import pytest

from services.scheduler.capacity import SlotWaitCancelled, WorkerCapacity


def _hold(capacity, role, address, exp, seconds, log, priority=1.0, started=None):
    with capacity.slot(role, address, exp, priority) as waited:
        log.append((exp, time.monotonic(), waited))
        if started is not None:
            started.set()
        time.sleep(seconds)


def test_a_replica_serves_at_most_its_slots_and_the_rest_wait():
    capacity = WorkerCapacity({"rollout": 2})
    inside, peak, lock = [0], [0], threading.Lock()

    def work(exp):
        with capacity.slot("rollout", "a:1", exp):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.1)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(i % 3,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    assert capacity.queue_depth("rollout") == 4 and capacity.busy("rollout", "a:1") == 2
    for t in threads:
        t.join()
    assert peak[0] == 2 and capacity.queue_depth() == 0 and capacity.busy("rollout", "a:1") == 0


def test_replicas_and_services_have_separate_slots():
    capacity = WorkerCapacity({"rollout": 1, "trainer": 1})
    with capacity.slot("rollout", "a:1", 1), capacity.slot("rollout", "b:1", 2), capacity.slot("trainer", "a:1", 3) as waited:
        assert waited < 0.1  # none of the three waited for another


def test_a_freed_slot_goes_to_the_least_served_experiment():
    """Experiment 1 held the replica longer than experiment 2; of the two waiting, experiment 2 goes
    first even though experiment 1 asked earlier."""
    capacity = WorkerCapacity({"scoring": 1}, poll_s=0.01)
    order: list = []
    _hold(capacity, "scoring", "s:1", 2, 0.05, [])  # experiment 2 has 0.05 s of service
    _hold(capacity, "scoring", "s:1", 1, 0.2, [])  # experiment 1 starts level (0.05) and adds 0.2 s
    gate = threading.Event()
    blocker = threading.Thread(target=_hold, args=(capacity, "scoring", "s:1", 3, 0.2, [], 1.0, gate))
    blocker.start()
    gate.wait()
    first = threading.Thread(target=_hold, args=(capacity, "scoring", "s:1", 1, 0.0, order))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=_hold, args=(capacity, "scoring", "s:1", 2, 0.0, order))
    second.start()
    for t in (blocker, first, second):
        t.join()
    assert [exp for exp, _, _ in order] == [2, 1]


def test_priority_shares_a_contended_replica():
    """Two experiments keep one slot busy; the one with priority 3 gets about three times the slot time."""
    capacity = WorkerCapacity({"trainer": 1}, poll_s=0.005)
    held = {1: 0.0, 2: 0.0}
    deadline = time.monotonic() + 2.0

    def loop(exp, priority):
        while time.monotonic() < deadline:
            with capacity.slot("trainer", "t:1", exp, priority):
                held[exp] += 0.02
                time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(1, 1.0)), threading.Thread(target=loop, args=(2, 3.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ratio = held[2] / held[1]
    assert 2.0 < ratio < 4.5, held


def test_a_newcomer_starts_level_with_the_experiments_waiting():  # and then they share
    """An experiment that joins after another ran alone for long does not take every slot until it
    has caught up: they alternate."""
    capacity = WorkerCapacity({"rollout": 1}, poll_s=0.005)
    for _ in range(10):
        with capacity.slot("rollout", "r:1", 1):
            time.sleep(0.01)  # experiment 1 has ~0.1 s of service
    order: list = []
    stop = time.monotonic() + 0.6

    def loop(exp):
        while time.monotonic() < stop:
            with capacity.slot("rollout", "r:1", exp):
                order.append(exp)
                time.sleep(0.02)

    threads = [threading.Thread(target=loop, args=(e,)) for e in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order.count(1) >= len(order) // 4, order  # experiment 1 is not starved


def test_waiting_stops_when_the_experiment_is_cancelled():
    capacity = WorkerCapacity({"rollout": 1}, poll_s=0.01)
    cancelled = threading.Event()
    outcome: list = []

    def waiter():
        try:
            with capacity.slot("rollout", "r:1", 2, should_stop=cancelled.is_set):
                outcome.append("ran")
        except SlotWaitCancelled as exc:
            outcome.append(str(exc))

    with capacity.slot("rollout", "r:1", 1):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.05)
        assert capacity.queue_depth("rollout") == 1
        cancelled.set()
        t.join(2)
    assert outcome == ["stopped waiting for a rollout slot at r:1"]
    assert capacity.queue_depth() == 0 and capacity.busy("rollout", "r:1") == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one slot"):
        WorkerCapacity({"rollout": 0})
    with pytest.raises(ValueError, match="priority"):
        with WorkerCapacity({"rollout": 1}).slot("rollout", "r:1", 1, priority=0):
            pass
