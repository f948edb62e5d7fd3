"""Shared helpers of the worker capacity and cancel tests."""

from __future__ import annotations

import threading


class HeldBackend:
    """The real hf backend, except that generate() calls after the first `hold_after` wait until the test
    sets `release` (`entered` is set when one waits)."""

    def __init__(self, real, hold_after: int = 0):
        self.real = real
        self.hold_after = hold_after
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def generate(self, prompt_ids, sampling):
        self.calls += 1
        if self.calls > self.hold_after:
            self.entered.set()
            assert self.release.wait(60), "the test never released generate()"
        return self.real.generate(prompt_ids, sampling)
