"""A real scheduler over HTTP for tests that need concurrent connections (TestClient serialises requests):
create_app(settings) served by uvicorn in a thread on a free 127.0.0.1 port."""

from __future__ import annotations

import socket
import threading
import time

from services.scheduler.app import create_app, server_options


class LiveScheduler:
    def __init__(self, settings, thread_name: str = "live-scheduler"):
        import uvicorn

        self.app = create_app(settings)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.host, self.port = sock.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        options = {**server_options(settings), "log_level": "warning", "timeout_graceful_shutdown": 3}
        config = uvicorn.Config(self.app, lifespan="on", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name=thread_name, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the scheduler did not start")
            time.sleep(0.02)

    @property
    def sessions(self):
        return self.app.state.sessions

    def publish(self, event: dict) -> None:
        self.app.state.bus.publish({"time": time.time(), **event})

    def open_streams(self) -> int:
        """Event streams open now (0 before the first stream created the counter)."""
        slots = getattr(self.app.state, "event_stream_slots", None)
        return 0 if slots is None else slots.open_streams()

    def stop(self) -> None:
        self.app.state.shutdown.set()  # ends open event streams
        self.server.should_exit = True
        self.thread.join(timeout=20)
