"""VerlProcess: verl (or its model merger) as a subprocess that a cancel, a deadline or a killed
trainer ends, with its whole process group."""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence


class VerlRunError(RuntimeError):
    """verl or its model merger failed; the message ends with the tail of its output."""


ShouldStop = Callable[[], bool]


# Runs first in the child (a fresh interpreter, so nothing of the trainer's threads is inherited):
# asks Linux to SIGKILL it when the trainer dies (prctl PR_SET_PDEATHSIG survives exec), gives up
# if the trainer is already gone, then becomes the real command.
_LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """argv behind a launcher that ties its life to the trainer's (Linux), so a killed trainer does not
    leave verl holding the GPUs; argv unchanged elsewhere. Best effort: it covers verl's driver process
    (and with it the Ray cluster it started, which ends with its driver), not processes that detach."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]


class VerlProcess:
    """A subprocess in its own session whose merged output is read line by line on a thread."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path, tail_lines: int = 60):
        self.argv = list(argv)
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            _with_parent_death_signal(self.argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd),
            env={**os.environ, **env},
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stop() ends verl's children too
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def output(self, should_stop: ShouldStop | None, deadline: float | None) -> Iterator[str]:
        """Yield output lines until the process closes its output; stop it on should_stop or the deadline."""
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if should_stop is not None and should_stop():
                    self.stop()
                    raise VerlRunError(f"cancelled: {self.argv[2] if len(self.argv) > 2 else self.argv[0]}")
                if deadline is not None and time.monotonic() > deadline:
                    self.stop()
                    raise VerlRunError(f"timed out: {' '.join(self.argv[:3])}\n" + "\n".join(self.tail))
                continue
            if line is None:
                return
            line = line.rstrip("\r\n")
            self.tail.append(line)
            yield line

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after grace_s."""
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
