"""Many open live event streams must not slow the API: a stream holds no threadpool thread.

The scheduler runs for real (uvicorn in a thread on a free loopback port, as in
the dashboard tests: TestClient would serialise the requests), on SQLite (and, for the hundred
streams, PostgreSQL when GRADALIGN_TEST_DATABASE_URL is set), with the in-process
event bus and, when GRADALIGN_TEST_REDIS_URL is set, the Redis one. Streams are plain sockets
speaking HTTP/1.1, so the test itself holds no thread per stream either. Also: the caps on open
streams (in total, per client address) answer 429 with Retry-After, a closed stream frees its
place, shutdown ends the streams, and an unreachable Redis answers 503.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import statistics
import threading
import time

import pytest
from fastapi.testclient import TestClient

from scheduler_fixtures import make_settings
from live_scheduler import LiveScheduler
from services.scheduler.app import create_app
from services.scheduler.events import InProcessEventBus, RedisEventBus

STREAMS = 100
HEALTHZ_BOUND_S = 0.200
LIST_BOUND_S = 0.500


class RawStream:
    """GET /api/v1/events over a bare socket: the status, the headers, then the body as it comes."""

    def __init__(
        self, live: LiveScheduler, query: str = "", source: str | None = None, timeout: float = 60.0, forwarded_for: str | None = None
    ):
        self.sock = socket.create_connection((live.host, live.port), timeout=timeout, source_address=(source, 0) if source else None)
        proxy = f"X-Forwarded-For: {forwarded_for}\r\n" if forwarded_for else ""
        self.sock.sendall(
            f"GET /api/v1/events{query} HTTP/1.1\r\nHost: {live.host}:{live.port}\r\n{proxy}Accept: text/event-stream\r\n\r\n".encode()
        )
        self.buf = b""
        head = self.read_until(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        self.buf = self.buf.split(b"\r\n\r\n", 1)[1]
        if self.status == 200:
            self.read_until(b": connected")

    def read_until(self, marker: bytes, timeout: float | None = None, start: int = 0) -> bytes:
        """Read until `marker` is in the body from offset `start` on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while marker not in self.buf[start:]:
            if deadline is not None:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed before {marker!r}: {self.buf[-300:]!r}")
            self.buf += chunk
        return self.buf

    def body(self) -> dict:
        """The JSON body of a refusal (Content-Length framed)."""
        length = int(self.headers["content-length"])
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        return json.loads(self.buf[:length])

    def read_to_end(self, timeout: float) -> bytes:
        """Everything until the server ends the response (the last chunk) or closes the connection."""
        try:
            self.read_until(b"\r\n0\r\n\r\n", timeout=timeout)
        except EOFError:
            pass
        return self.buf

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(params=["in-process", "redis"])
def bus_url(request) -> str | None:
    if request.param == "in-process":
        return None
    return request.getfixturevalue("redis_url")


@pytest.fixture
def flood_settings(tmp_path, bus_url):
    def make(database_url: str | None = None, **overrides):
        url = database_url or f"sqlite:///{tmp_path / 'scheduler.db'}"
        return make_settings(tmp_path, url, redis_url=bus_url, **overrides)

    return make


@pytest.fixture
def live_factory():
    started: list[LiveScheduler] = []

    def start(settings) -> LiveScheduler:
        started.append(LiveScheduler(settings))
        return started[-1]

    yield start
    for live in started:
        live.stop()


def _timed_get(live: LiveScheduler, path: str) -> float:
    """Seconds for one GET on a fresh connection (on a reused one, delayed ACKs add ~40 ms whatever the load)."""
    conn = http.client.HTTPConnection(live.host, live.port, timeout=30)
    try:
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    assert resp.status == 200, body
    return elapsed


def _close_one_and_reopen(live: LiveScheduler, streams: list[RawStream], index: int) -> None:
    """Close streams[index]; once its place is freed (only the rest of `streams` open), a new stream gets
    one: appended to `streams`."""
    streams.pop(index).close()
    wait_until(lambda: live.open_streams() == len(streams), 5, "the closed stream's place to be freed")
    again = RawStream(live)
    assert again.status == 200, again.buf
    streams.append(again)


def test_a_hundred_open_streams_do_not_slow_the_api(flood_settings, live_factory, database_url):
    settings = flood_settings(database_url=database_url, max_event_streams=STREAMS, max_event_streams_per_client=STREAMS)
    live = live_factory(settings)
    streams: list[RawStream] = []
    try:
        _timed_get(live, "/healthz"), _timed_get(live, "/api/v1/experiments")  # warm
        for i in range(STREAMS):
            s = RawStream(live, query=f"?experiment_id={i}" if i % 2 else "")
            assert s.status == 200, (i, s.buf)
            assert s.headers["content-type"].startswith("text/event-stream")
            streams.append(s)
        assert live.open_streams() == STREAMS
        time.sleep(1.5)  # every stream has gone round its keep-alive wait at least once

        healthz = [_timed_get(live, "/healthz") for _ in range(5)]
        listing = [_timed_get(live, "/api/v1/experiments") for _ in range(5)]
        timings = f"healthz {[round(t * 1000, 1) for t in healthz]} ms, experiments {[round(t * 1000, 1) for t in listing]} ms"
        print(f"with {STREAMS} open event streams: {timings}")
        assert statistics.median(healthz) < HEALTHZ_BOUND_S, timings
        assert statistics.median(listing) < LIST_BOUND_S, timings

        # the streams are live, not just open: an event reaches the ones that want it, keep-alives flow
        live.app.state.bus.publish({"type": "progress", "experiment_id": 7, "done": 3, "total": 8})
        for s in (streams[7], streams[0]):  # experiment 7's stream, and an unfiltered one
            s.read_until(b'"experiment_id": 7', timeout=10)
            assert b"event: progress\ndata: " in s.buf
        streams[3].read_until(b": keep-alive", timeout=5, start=len(streams[3].buf))  # sent after the event was handled
        assert b"event: progress" not in streams[3].buf  # experiment 3's stream does not get experiment 7's event

        # past the cap: 429, with Retry-After and a detail that says which cap
        refused = RawStream(live)
        assert refused.status == 429, refused.buf
        assert int(refused.headers["retry-after"]) > 0
        assert "max_event_streams" in refused.body()["detail"]
        refused.close()
        assert live.open_streams() == STREAMS
        assert _timed_get(live, "/healthz") < HEALTHZ_BOUND_S * 5  # refusals cost nothing either

        # a closed stream frees its place
        _close_one_and_reopen(live, streams, -1)
    finally:
        for s in streams:
            s.close()
    wait_until(lambda: live.open_streams() == 0, 10, "every closed stream's place to be freed")


def test_the_per_client_cap_counts_each_address(flood_settings, live_factory):
    live = live_factory(flood_settings(max_event_streams=10, max_event_streams_per_client=3))
    streams = [RawStream(live) for _ in range(3)]
    try:
        assert [s.status for s in streams] == [200, 200, 200]
        refused = RawStream(live)
        assert refused.status == 429 and int(refused.headers["retry-after"]) > 0
        assert "max_event_streams_per_client" in refused.body()["detail"]
        refused.close()
        other = RawStream(live, source="127.0.0.2")  # another client address still gets one
        assert other.status == 200, other.buf
        streams.append(other)
        _close_one_and_reopen(live, streams, 0)  # one of the first client's: that client gets a place again
    finally:
        for s in streams:
            s.close()
    wait_until(lambda: live.open_streams() == 0, 10, "every closed stream's place to be freed")


@pytest.mark.parametrize("trusted", [True, False])
def test_behind_a_trusted_proxy_the_per_client_cap_counts_the_forwarded_clients(flood_settings, live_factory, trusted):
    """uvicorn takes the client from X-Forwarded-For only when the connection comes from forwarded_allow_ips
    (the default trusts 127.0.0.1, where these connections come from): behind an Ingress, each user has a cap of
    their own; from an untrusted proxy the header is ignored and everyone shares the proxy's."""
    proxies = {} if trusted else {"forwarded_allow_ips": "10.9.9.9"}
    live = live_factory(flood_settings(max_event_streams=10, max_event_streams_per_client=2, **proxies))
    streams = [RawStream(live, forwarded_for="10.0.0.1") for _ in range(2)]
    try:
        assert [s.status for s in streams] == [200, 200]
        again = RawStream(live, forwarded_for="10.0.0.1")
        assert again.status == 429 and "max_event_streams_per_client" in again.body()["detail"]
        again.close()
        other = RawStream(live, forwarded_for="10.0.0.2")  # another user behind the same proxy
        streams.append(other)
        assert other.status == (200 if trusted else 429), other.buf
    finally:
        for s in streams:
            s.close()
    wait_until(lambda: live.open_streams() == 0, 10, "every closed stream's place to be freed")


def test_shutdown_ends_open_streams_and_frees_their_places(flood_settings, live_factory):
    live = live_factory(flood_settings())
    streams = [RawStream(live) for _ in range(5)]
    live.app.state.shutdown.set()
    try:
        t0 = time.monotonic()
        for s in streams:
            assert s.read_to_end(timeout=10).endswith(b"0\r\n\r\n")  # the response ended, cleanly
        assert time.monotonic() - t0 < 5
        wait_until(lambda: live.open_streams() == 0, 5, "the ended streams' places to be freed")
    finally:
        live.app.state.shutdown.clear()
        for s in streams:
            s.close()


def test_an_unreachable_redis_answers_503_and_frees_the_place(tmp_path, redis_url):
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'scheduler.db'}", redis_url=redis_url, max_event_streams=1))
    with TestClient(app) as client:
        good_url, app.state.bus.url = app.state.bus.url, "redis://127.0.0.1:1/0"
        resp = client.get("/api/v1/events")
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) > 0, resp.text
        assert "event bus" in resp.json()["detail"]
        assert app.state.event_stream_slots.open_streams() == 0
        app.state.bus.url = good_url
        with client.stream("GET", "/api/v1/events") as stream:  # the one place is free again
            assert stream.status_code == 200
            assert next(stream.iter_lines()) == ": connected"


def _async_roundtrip(bus) -> None:
    async def main():
        a, b = await bus.subscribe_async(), await bus.subscribe_async()
        try:
            assert await a.get(timeout=0.05) is None  # nothing yet: None after the timeout
            # published from another thread, as the orchestrator does
            threading.Thread(target=bus.publish, args=({"type": "stage_started", "experiment_id": 1},)).start()
            for sub in (a, b):
                ev = None
                for _ in range(20):
                    ev = await sub.get(timeout=0.25)
                    if ev is not None:
                        break
                assert ev == {"type": "stage_started", "experiment_id": 1}
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
    bus.close()


def test_in_process_bus_async_subscription():
    bus = InProcessEventBus()
    _async_roundtrip(bus)
    assert bus._async_subscribers == []


def test_redis_bus_async_subscription(redis_url):
    _async_roundtrip(RedisEventBus(redis_url, channel="gradalign:test-events-async"))


def test_in_process_publish_never_blocks_on_a_reader_that_stopped_reading(monkeypatch):
    import services.scheduler.events as events

    monkeypatch.setattr(events, "QUEUE_SIZE", 3)
    bus = InProcessEventBus()
    stalled = bus.subscribe()
    t0 = time.monotonic()
    for i in range(10):
        bus.publish({"type": "progress", "experiment_id": i})
    assert time.monotonic() - t0 < 1
    assert [stalled.get(timeout=0.1)["experiment_id"] for _ in range(3)] == [0, 1, 2]
    assert stalled.get(timeout=0.05) is None
    stalled.close()

