"""RayLogFollower: a Ray job's driver log, followed line by line on a thread.

Why `tail_job_logs` and an offset, not polling `get_job_logs`: `get_job_logs` returns the
whole log on every call, and verl's driver log (its own lines plus what Ray forwards from
every worker) grows to megabytes over a long run, so polling it every few seconds would move
the whole log again and again. `tail_job_logs` (a websocket) sends what is new as the driver
writes it. It is an async iterator, so it runs in an event loop on this thread, which hands
whole lines to the caller through a queue. Websockets drop (a restarted head, a proxy timeout):
a new tail starts again from the log's first character, so the follower counts the characters
it has delivered and skips that many, and reconnects after a pause for as long as the job is
not finished. When the stream ends and the job's status is terminal, one `get_job_logs` call
fetches whatever the stream did not deliver (nothing after a clean close), past the same offset:
every line is delivered once, in order, even if the last connection broke.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from gradalign_common.logging_setup import get_logger

log = get_logger("gradalign.trainer.verl")

RECONNECT_PAUSE_S = 1.0


class RayHeadLost(RuntimeError):
    """The Ray head stayed unreachable for longer than the follower's patience."""


class RayLogFollower:
    """Follows submission `submission_id`'s log on a daemon thread; `lines` yields each line (str), then None
    at the end. If the head stays unreachable for `patience_s`, `error` is set before the None."""

    def __init__(self, client, submission_id: str, patience_s: float = 300.0):
        self.client = client
        self.submission_id = submission_id
        self.patience_s = patience_s
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.error: Exception | None = None
        self._delivered = 0  # characters of the log handed on (whole lines and the partial one)
        self._partial = ""
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name=f"ray-log-{submission_id}", daemon=True)

    def start(self) -> "RayLogFollower":
        self._thread.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop following (a tail in progress is cancelled) and wait for the thread, at most timeout_s."""
        self._stopping.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop already closed
                pass
        self._thread.join(timeout_s)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        last_contact = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    asyncio.run(self._tail_once())
                    last_contact = time.monotonic()
                except asyncio.CancelledError:
                    break
                except Exception as exc:  # a dropped or refused connection
                    log.warning("ray_log_tail_interrupted", submission_id=self.submission_id, error=str(exc)[:300])
                if self._stopping.is_set():
                    break
                finished = self._finished()
                if finished is not None:
                    last_contact = time.monotonic()
                    if finished:
                        self._deliver_rest()
                        break
                elif time.monotonic() - last_contact > self.patience_s:
                    raise RayHeadLost(
                        f"the Ray head did not answer for {self.patience_s:.0f} s while following job {self.submission_id}"
                    )
                self._stopping.wait(RECONNECT_PAUSE_S)
        except Exception as exc:
            self.error = exc
        finally:
            if self._partial:
                self.lines.put(self._partial)
                self._partial = ""
            self.lines.put(None)

    async def _tail_once(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._stopping.is_set():
            return
        skip = self._delivered
        try:
            async for chunk in self.client.tail_job_logs(self.submission_id):
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                self._deliver(chunk)
        finally:
            self._task = None

    def _finished(self) -> bool | None:
        """Whether the job is in a terminal state; None when the head cannot be asked."""
        try:
            return self.client.get_job_status(self.submission_id).is_terminal()
        except Exception as exc:
            log.warning("ray_status_unavailable", submission_id=self.submission_id, error=str(exc)[:300])
            return None

    def _deliver_rest(self) -> None:
        """After a terminal status: what the stream has not delivered, from the complete log."""
        try:
            text = self.client.get_job_logs(self.submission_id)
        except Exception as exc:
            log.warning("ray_final_logs_unavailable", submission_id=self.submission_id, error=str(exc)[:300])
            return
        self._deliver(text[self._delivered :])

    def _deliver(self, text: str) -> None:
        if not text:
            return
        self._delivered += len(text)
        *whole, self._partial = (self._partial + text).split("\n")
        for line in whole:
            self.lines.put(line.rstrip("\r"))
