"""Server-sent events: stage transitions and progress, of all experiments or one.

A stream is an async generator awaiting the bus (`EventBus.subscribe_async`), so open streams
hold no threadpool thread and do not slow the rest of the API. Open streams are capped, in
total (`max_event_streams`) and per client address (`max_event_streams_per_client`): past
either cap the request gets 429 with a Retry-After header; a stream's place is freed when it
ends, however it ends (client gone, shutdown, error).
"""

from __future__ import annotations

import json
import threading
from typing import Annotated, AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gradalign_common.logging_setup import get_logger
from services.scheduler.deps import READ_ACCESS, EventBusDep, ShutdownDep
from services.scheduler.events import AsyncSubscription
from services.scheduler.schemas import ErrorOut

log = get_logger("gradalign.events")

KEEP_ALIVE_S = 1.0  # an idle stream sends a comment this often (and notices shutdown)
RETRY_AFTER_S = 5  # the Retry-After of a 429 or 503: streams are long-lived, places free slowly

router = APIRouter(prefix="/api/v1/events", tags=["events"], dependencies=READ_ACCESS)


class StreamSlots:
    """Open event streams, counted in total and per client address. Used from the event loop; locked anyway."""

    def __init__(self, total: int, per_client: int):
        self.total, self.per_client = total, per_client
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str) -> str | None:
        """Take a place for `client`, or say (the 429's detail) why there is none."""
        with self._lock:
            if sum(self._open.values()) >= self.total:
                return f"too many live event streams are open ({self.total}, max_event_streams); retry later"
            if self._open.get(client, 0) >= self.per_client:
                return (
                    f"this client already has {self.per_client} live event streams open "
                    "(max_event_streams_per_client); close one or retry later"
                )
            self._open[client] = self._open.get(client, 0) + 1
            return None

    def release(self, client: str) -> None:
        with self._lock:
            left = self._open.get(client, 0) - 1
            if left > 0:
                self._open[client] = left
            else:
                self._open.pop(client, None)

    def open_streams(self, client: str | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if client is None else self._open.get(client, 0)


async def get_stream_slots(request: Request) -> StreamSlots:
    """The app's StreamSlots, made at its first stream from the app's settings (async: runs on the loop, no race)."""
    state = request.app.state
    slots = getattr(state, "event_stream_slots", None)
    if slots is None:
        settings = state.settings
        slots = state.event_stream_slots = StreamSlots(settings.max_event_streams, settings.max_event_streams_per_client)
    return slots


StreamSlotsDep = Annotated[StreamSlots, Depends(get_stream_slots)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get(
    "",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "`: connected`, then `event: <type>` / `data: <json>` messages"},
        429: {"model": ErrorOut, "description": "too many event streams open (in total or from this client); see Retry-After"},
        503: {"model": ErrorOut, "description": "the event bus (Redis) is unreachable; see Retry-After"},
    },
)
async def stream_events(
    request: Request, bus: EventBusDep, shutdown: ShutdownDep, slots: StreamSlotsDep, experiment_id: int | None = None
) -> StreamingResponse:
    """Server-sent events: stage transitions and progress (all experiments, or one)."""
    client = client_address(request)
    refusal = slots.acquire(client)
    if refusal is not None:
        raise HTTPException(429, refusal, headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        sub = await bus.subscribe_async()
    except BaseException as exc:
        slots.release(client)
        if isinstance(exc, Exception):
            log.warning("event_subscribe_failed", error=repr(exc))
            raise HTTPException(503, "live events are unavailable: the event bus is unreachable",
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        raise
    return EventStreamResponse(
        server_sent_events(sub, shutdown, experiment_id),
        cleanup=[sub.close, lambda: slots.release(client)],
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that runs `cleanup` once it is over, however it ends (even if never started)."""

    def __init__(self, content: AsyncIterator[str], cleanup: list[Callable], **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # a disconnect cancels the stream: clean up regardless
                await self.body_iterator.aclose()
                for step in self._cleanup:
                    try:
                        result = step()
                        if hasattr(result, "__await__"):
                            await result
                    except Exception as exc:  # noqa: BLE001 - the next step (the slot) must still run
                        log.warning("event_stream_cleanup_failed", error=repr(exc))


async def server_sent_events(sub: AsyncSubscription, shutdown: threading.Event, experiment_id: int | None) -> AsyncIterator[str]:
    """The bus's events as SSE messages (a comment line while idle keeps proxies from closing the stream),
    until the app shuts down or the bus fails (the client reconnects)."""
    yield ": connected\n\n"
    while not shutdown.is_set():
        try:
            event = await sub.get(KEEP_ALIVE_S)
        except Exception as exc:  # noqa: BLE001 - Redis went away: end the stream, the client reconnects
            log.warning("event_stream_failed", error=repr(exc))
            return
        if event is None:
            yield ": keep-alive\n\n"
        elif experiment_id is None or event.get("experiment_id") == experiment_id:
            yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event, default=str)}\n\n"
