"""Leases: exactly one scheduler replica drives a given experiment at a time.

`DatabaseLease` keeps (owner, expiry) on the experiment row and takes it with one atomic
UPDATE; it serves one machine (SQLite) and any shared PostgreSQL. `RedisLease` keeps a
key per experiment (SET NX PX; renew and release only by the owner, atomically in Lua)
and is used when Redis is configured. A lease expires unless renewed, so a replica that
died hands its experiments over after `ttl_s`.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from sqlalchemy import or_, update
from sqlalchemy.orm import sessionmaker

from services.scheduler.db import Experiment, utcnow
from services.scheduler.status import ACTIVE


class Lease(Protocol):
    owner: str

    def acquire(self, exp_id: int) -> bool: ...

    def renew(self, exp_id: int) -> bool: ...

    def release(self, exp_id: int) -> None: ...

    def release_all(self) -> None: ...


class DatabaseLease:
    def __init__(self, sessions: sessionmaker, owner: str, ttl_s: float = 60.0):
        self.sessions, self.owner, self.ttl_s = sessions, owner, ttl_s

    def acquire(self, exp_id: int) -> bool:
        now = utcnow()
        with self.sessions() as s:
            res = s.execute(
                update(Experiment)
                .where(
                    Experiment.id == exp_id,
                    Experiment.status.in_(ACTIVE),
                    or_(
                        Experiment.lease_owner.is_(None),
                        Experiment.lease_owner == self.owner,
                        Experiment.lease_expires_at < now,
                    ),
                )
                .values(lease_owner=self.owner, lease_expires_at=now + dt.timedelta(seconds=self.ttl_s))
                .execution_options(synchronize_session=False)
            )
            s.commit()
            return res.rowcount == 1

    def renew(self, exp_id: int) -> bool:
        with self.sessions() as s:
            res = s.execute(
                update(Experiment)
                .where(Experiment.id == exp_id, Experiment.lease_owner == self.owner)
                .values(lease_expires_at=utcnow() + dt.timedelta(seconds=self.ttl_s))
                .execution_options(synchronize_session=False)
            )
            s.commit()
            return res.rowcount == 1

    def release(self, exp_id: int) -> None:
        self._clear(Experiment.id == exp_id)

    def release_all(self) -> None:
        self._clear(None)

    def _clear(self, condition) -> None:
        stmt = update(Experiment).where(Experiment.lease_owner == self.owner)
        if condition is not None:
            stmt = stmt.where(condition)
        with self.sessions() as s:
            s.execute(stmt.values(lease_owner=None, lease_expires_at=None).execution_options(synchronize_session=False))
            s.commit()


_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RedisLease:
    def __init__(self, url: str, owner: str, ttl_s: float = 60.0, prefix: str = "gradalign:lease:"):
        import redis

        self._redis = redis.Redis.from_url(url)
        self._redis.ping()
        self.owner, self.ttl_ms, self.prefix = owner, int(ttl_s * 1000), prefix
        self._held: set[int] = set()

    def _key(self, exp_id: int) -> str:
        return f"{self.prefix}{exp_id}"

    def acquire(self, exp_id: int) -> bool:
        if self._redis.set(self._key(exp_id), self.owner, nx=True, px=self.ttl_ms):
            self._held.add(exp_id)
            return True
        return self.renew(exp_id)

    def renew(self, exp_id: int) -> bool:
        ok = bool(self._redis.eval(_RENEW, 1, self._key(exp_id), self.owner, self.ttl_ms))
        (self._held.add if ok else self._held.discard)(exp_id)
        return ok

    def release(self, exp_id: int) -> None:
        self._redis.eval(_RELEASE, 1, self._key(exp_id), self.owner)
        self._held.discard(exp_id)

    def release_all(self) -> None:
        for exp_id in list(self._held):
            self.release(exp_id)


def make_lease(redis_url: str | None, sessions: sessionmaker, owner: str, ttl_s: float = 60.0) -> Lease:
    return RedisLease(redis_url, owner, ttl_s) if redis_url else DatabaseLease(sessions, owner, ttl_s)
