"""Server-sent events: stage transitions and progress, of all experiments or one."""

from __future__ import annotations

import json
import threading
from typing import Iterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from services.scheduler.deps import READ_ACCESS, EventBusDep, ShutdownDep
from services.scheduler.errors import AUTH_ERRORS
from services.scheduler.events import EventBus, iter_events

router = APIRouter(prefix="/api/v1/events", tags=["events"], dependencies=READ_ACCESS, responses=AUTH_ERRORS)


@router.get("", response_class=StreamingResponse)
def stream_events(bus: EventBusDep, shutdown: ShutdownDep, experiment_id: int | None = None) -> StreamingResponse:
    """Server-sent events: stage transitions and progress (all experiments, or one)."""
    return StreamingResponse(
        server_sent_events(bus, shutdown, experiment_id), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def server_sent_events(bus: EventBus, shutdown: threading.Event, experiment_id: int | None) -> Iterator[str]:
    """The bus's events as SSE messages (a comment line while idle keeps proxies from closing the stream)."""
    sub = bus.subscribe()
    try:
        yield ": connected\n\n"
        for event in iter_events(sub, shutdown, timeout=1.0):
            if event is None:
                yield ": keep-alive\n\n"
            elif experiment_id is None or event.get("experiment_id") == experiment_id:
                yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event, default=str)}\n\n"
    finally:
        sub.close()
