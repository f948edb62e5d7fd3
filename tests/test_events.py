"""Event buses: in-process and Redis deliver what is published to every subscriber."""

import pytest

from services.scheduler.events import InProcessEventBus, RedisEventBus


def _roundtrip(bus):
    a, b = bus.subscribe(), bus.subscribe()
    bus.publish({"type": "stage_started", "experiment_id": 1, "stage": "score"})
    for sub in (a, b):
        ev = None
        for _ in range(20):
            ev = sub.get(timeout=0.25)
            if ev is not None:
                break
        assert ev == {"type": "stage_started", "experiment_id": 1, "stage": "score"}
        sub.close()
    bus.close()


def test_in_process_bus():
    _roundtrip(InProcessEventBus())


def test_redis_bus(redis_url):
    _roundtrip(RedisEventBus(redis_url, channel="gradalign:test-events"))


def test_redis_bus_unreachable_fails_loudly():
    import redis

    with pytest.raises(redis.exceptions.ConnectionError):
        RedisEventBus("redis://127.0.0.1:1/0")
