"""Live events (stage transitions, progress) for the dashboard and the CLI.

`InProcessEventBus` serves one machine; `RedisEventBus` publishes on a Redis channel so
that any scheduler replica's API can stream what any replica's orchestrator does.
An event is a small JSON-able dict with at least "type" and "experiment_id".

Two ways to listen: `subscribe()` gives a blocking `Subscription` (for threads), and
`await subscribe_async()` an `AsyncSubscription` whose `get` awaits without holding a
thread -- what the API's event streams use, so that open streams cost no threadpool
threads. In-process, an async subscriber is an asyncio queue on its event loop, fed from
the publishing thread with `loop.call_soon_threadsafe`; on Redis it is a `redis.asyncio`
pub/sub connection.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections import defaultdict
from typing import Iterator, Protocol

CHANNEL = "gradalign:events"
QUEUE_SIZE = 10_000  # events a subscriber may fall behind by; past it, new events are dropped for it
SUBSCRIBE_TIMEOUT_S = 5.0  # how long an async Redis subscription waits for the server's confirmation


class EventBus(Protocol):
    def publish(self, event: dict) -> None: ...

    def subscribe(self, timeout: float = 1.0) -> "Subscription": ...

    async def subscribe_async(self) -> "AsyncSubscription": ...

    def close(self) -> None: ...


class Subscription(Protocol):
    def get(self, timeout: float) -> dict | None: ...

    def close(self) -> None: ...


class AsyncSubscription(Protocol):
    async def get(self, timeout: float) -> dict | None:
        """The next event, or None when none came within `timeout` seconds."""
        ...

    async def close(self) -> None: ...


class InProcessEventBus:
    def __init__(self) -> None:
        self._subscribers: list[_QueueSubscription] = []
        self._async_subscribers: list[_AsyncQueueSubscription] = []
        self._lock = threading.Lock()

    def publish(self, event: dict) -> None:
        """Never blocks: a subscriber that fell QUEUE_SIZE events behind misses the new ones."""
        with self._lock:
            subscribers = list(self._subscribers)
            by_loop: dict[asyncio.AbstractEventLoop, list[_AsyncQueueSubscription]] = defaultdict(list)
            for sub in self._async_subscribers:
                by_loop[sub.loop].append(sub)
        for sub in subscribers:
            sub.put(event)
        for loop, subs in by_loop.items():  # one wake-up per event loop, however many streams it serves
            try:
                loop.call_soon_threadsafe(_put_all, subs, event)
            except RuntimeError:  # that loop is closed: its subscribers are gone
                with self._lock:
                    self._async_subscribers = [s for s in self._async_subscribers if s.loop is not loop]

    def subscribe(self, timeout: float = 1.0) -> "_QueueSubscription":
        sub = _QueueSubscription(self)
        with self._lock:
            self._subscribers.append(sub)
        return sub

    async def subscribe_async(self) -> "_AsyncQueueSubscription":
        sub = _AsyncQueueSubscription(self, asyncio.get_running_loop())
        with self._lock:
            self._async_subscribers.append(sub)
        return sub

    def _unsubscribe(self, sub) -> None:
        with self._lock:
            for subs in (self._subscribers, self._async_subscribers):
                if sub in subs:
                    subs.remove(sub)

    def close(self) -> None:
        with self._lock:
            self._subscribers.clear()
            self._async_subscribers.clear()


def _put_all(subs: list["_AsyncQueueSubscription"], event: dict) -> None:
    for sub in subs:
        sub.put(event)


class _QueueSubscription:
    def __init__(self, bus: InProcessEventBus):
        self._bus, self._q = bus, queue.Queue(maxsize=QUEUE_SIZE)

    def put(self, event: dict) -> None:
        try:
            self._q.put_nowait(event)
        except queue.Full:  # a reader that stopped reading must not stall the publisher (the orchestrator)
            pass

    def get(self, timeout: float) -> dict | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus._unsubscribe(self)


class _AsyncQueueSubscription:
    """An asyncio queue on `loop`; `put` runs on that loop (the bus schedules it there)."""

    def __init__(self, bus: InProcessEventBus, loop: asyncio.AbstractEventLoop):
        self._bus, self.loop = bus, loop
        self._q: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_SIZE)

    def put(self, event: dict) -> None:
        try:
            self._q.put_nowait(event)
        except asyncio.QueueFull:
            pass

    async def get(self, timeout: float) -> dict | None:
        try:
            async with asyncio.timeout(timeout):
                return await self._q.get()
        except TimeoutError:
            return None

    async def close(self) -> None:
        self._bus._unsubscribe(self)


class RedisEventBus:
    def __init__(self, url: str, channel: str = CHANNEL):
        import redis

        self.url = url
        self._redis = redis.Redis.from_url(url)
        self._redis.ping()  # fail loudly at start-up, not at the first event
        self.channel = channel

    def publish(self, event: dict) -> None:
        self._redis.publish(self.channel, json.dumps(event, default=str))

    def subscribe(self, timeout: float = 1.0) -> "_RedisSubscription":
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel)
        return _RedisSubscription(pubsub)

    async def subscribe_async(self) -> "_AsyncRedisSubscription":
        """A redis.asyncio pub/sub connection of its own (a client per subscription: nothing is tied to an
        event loop that may end), returned once Redis confirmed the SUBSCRIBE, so that whatever is
        published afterwards reaches it. Raises redis's ConnectionError/TimeoutError when Redis is unreachable."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                while True:
                    msg = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT_S)
                    if msg is not None and msg.get("type") == "subscribe":
                        break
        except TimeoutError as exc:
            await _close_redis(pubsub, client)
            raise aioredis.TimeoutError("Redis did not confirm the subscription") from exc
        except BaseException:
            await _close_redis(pubsub, client)
            raise
        return _AsyncRedisSubscription(client, pubsub)

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


class _AsyncRedisSubscription:
    def __init__(self, client, pubsub):
        self._client, self._pubsub = client, pubsub

    async def get(self, timeout: float) -> dict | None:
        msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        if msg is None or msg.get("type") != "message":
            return None
        return json.loads(msg["data"])

    async def close(self) -> None:
        await _close_redis(self._pubsub, self._client)


async def _close_redis(pubsub, client) -> None:
    try:
        await pubsub.aclose()
    finally:
        await client.aclose()


def make_event_bus(redis_url: str | None) -> EventBus:
    return RedisEventBus(redis_url) if redis_url else InProcessEventBus()


def iter_events(sub: Subscription, stop: threading.Event, timeout: float = 1.0) -> Iterator[dict | None]:
    """Yield events (None on each idle timeout, so callers can send keep-alives) until stop is set."""
    while not stop.is_set():
        yield sub.get(timeout)
