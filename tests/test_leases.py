"""Two scheduler replicas never hold the same experiment's lease; an expired lease moves on."""

from __future__ import annotations

import time

import pytest

from services.scheduler.db import Experiment, make_engine, make_session_factory
from services.scheduler.leases import DatabaseLease, RedisLease
from services.scheduler.migrate import upgrade


@pytest.fixture
def sessions(database_url):
    engine = make_engine(database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    with factory() as s:
        for i in (1, 2):
            s.add(Experiment(id=i, name=f"e{i}", status="running", config={}, checkpoint="/x", pool_size=1))
        s.commit()
    yield factory
    engine.dispose()


def _exclusive(a, b, ttl_s):
    assert a.acquire(1) and not b.acquire(1)
    assert b.acquire(2) and not a.acquire(2)
    assert a.acquire(1) and a.renew(1)  # the owner re-acquires and renews
    assert not b.renew(1)
    a.release(1)
    assert b.acquire(1) and not a.acquire(1)
    b.release_all()
    assert a.acquire(2)
    time.sleep(ttl_s + 0.2)  # a dies without releasing: its leases expire
    assert b.acquire(1) and b.acquire(2)


def test_database_lease(sessions):
    _exclusive(DatabaseLease(sessions, "replica-a", ttl_s=0.5), DatabaseLease(sessions, "replica-b", ttl_s=0.5), 0.5)


def test_database_lease_skips_ended_experiments(sessions):
    with sessions() as s:
        s.get(Experiment, 1).status = "completed"
        s.commit()
    assert not DatabaseLease(sessions, "a").acquire(1)


def test_redis_lease(redis_url):
    import redis

    prefix = f"gradalign:test-lease:{time.time_ns()}:"
    a = RedisLease(redis_url, "replica-a", ttl_s=0.5, prefix=prefix)
    b = RedisLease(redis_url, "replica-b", ttl_s=0.5, prefix=prefix)
    _exclusive(a, b, 0.5)
    r = redis.Redis.from_url(redis_url)
    for key in r.keys(prefix + "*"):
        r.delete(key)
