"""Live events (stage transitions, progress) for the dashboard and the CLI.

`InProcessEventBus` serves one machine; `RedisEventBus` publishes on a Redis channel so
that any scheduler replica's API can stream what any replica's orchestrator does.
An event is a small JSON-able dict with at least "type" and "experiment_id".
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Iterator, Protocol

CHANNEL = "gradalign:events"


class EventBus(Protocol):
    def publish(self, event: dict) -> None: ...

    def subscribe(self, timeout: float = 1.0) -> "Subscription": ...

    def close(self) -> None: ...


class Subscription(Protocol):
    def get(self, timeout: float) -> dict | None: ...

    def close(self) -> None: ...


class InProcessEventBus:
    def __init__(self) -> None:
        self._subscribers: list[queue.Queue] = []
        self._lock = threading.Lock()

    def publish(self, event: dict) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for q in subscribers:
            q.put(event)

    def subscribe(self, timeout: float = 1.0) -> "_QueueSubscription":
        q: queue.Queue = queue.Queue(maxsize=10_000)
        with self._lock:
            self._subscribers.append(q)
        return _QueueSubscription(self, q)

    def _unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def close(self) -> None:
        with self._lock:
            self._subscribers.clear()


class _QueueSubscription:
    def __init__(self, bus: InProcessEventBus, q: queue.Queue):
        self._bus, self._q = bus, q

    def get(self, timeout: float) -> dict | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus._unsubscribe(self._q)


class RedisEventBus:
    def __init__(self, url: str, channel: str = CHANNEL):
        import redis

        self._redis = redis.Redis.from_url(url)
        self._redis.ping()  # fail loudly at start-up, not at the first event
        self.channel = channel

    def publish(self, event: dict) -> None:
        self._redis.publish(self.channel, json.dumps(event, default=str))

    def subscribe(self, timeout: float = 1.0) -> "_RedisSubscription":
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        return _RedisSubscription(pubsub)

    def close(self) -> None:
        self._redis.close()


class _RedisSubscription:
    def __init__(self, pubsub):
        self._pubsub = pubsub

    def get(self, timeout: float) -> dict | None:
        msg = self._pubsub.get_message(timeout=timeout)
        if msg is None or msg.get("type") != "message":
            return None
        return json.loads(msg["data"])

    def close(self) -> None:
        self._pubsub.close()


def make_event_bus(redis_url: str | None) -> EventBus:
    return RedisEventBus(redis_url) if redis_url else InProcessEventBus()


def iter_events(sub: Subscription, stop: threading.Event, timeout: float = 1.0) -> Iterator[dict | None]:
    """Yield events (None on each idle timeout, so callers can send keep-alives) until stop is set."""
    while not stop.is_set():
        yield sub.get(timeout)
