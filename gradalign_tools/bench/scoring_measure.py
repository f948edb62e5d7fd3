"""Measuring one benchmark run: wall time, the process's CPU time and peak memory (`gradalign bench scoring`).

Peak memory is torch's peak allocation above the start on CUDA; on CPU the process's peak
resident set size above its size at the start of the run, after returning freed heap to the OS.
`peak_tensor_bytes` measures, on CPU, the peak of the bytes torch holds in tensors (what a memory
plan governs; the resident set adds the allocator's and libraries' own).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from gradalign_common.records import ScoreRecord
from services.scoring.cpu_allocator import release_freed_memory


@dataclass
class Row:
    """One measured method."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    peak_total_mb: list[float] = field(default_factory=list)
    scores: list[ScoreRecord] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu_seconds)


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block: CUDA peak allocation, or the process's peak RSS (VmHWM reset through
    /proc/self/clear_refs; a sampling thread where that is not allowed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_above_start_mb = 0.0
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        release_freed_memory()  # freed heap back to the OS: the next run's resident-set peak starts clean
        self._start = (_status_kb("VmRSS") or 0) * 1024
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self._sampled = self._start
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, (_status_kb("VmRSS") or 0) * 1024)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._sampled
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        self.peak_mb = peak / 2**20
        self.peak_above_start_mb = max(0.0, peak - self._start) / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(row: Row, device: torch.device, fn: Callable[[], object]) -> object:
    """Run fn once, adding its wall time, the process's CPU time and peak memory to row."""
    with PeakMemory(device) as memory:
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = fn()
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    row.seconds.append(seconds)
    row.cpu_seconds.append(cpu_seconds)
    row.peak_mb.append(memory.peak_above_start_mb)
    row.peak_total_mb.append(memory.peak_mb)
    return result


def peak_tensor_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """(the peak of live CPU tensor bytes while fn() runs, above what was live before; fn's result), measured:
    torch's profiler records every allocation and free of the CPU allocator (profile_memory=True); their
    running sum in time order is what torch holds in tensors at each moment. Allocator slack and memory
    outside tensors (libraries' workspaces, Python objects) are not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, result
