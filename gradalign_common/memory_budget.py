"""A scoring memory budget: how much memory one scoring pass may use on top of what is resident when it starts.

Written as bytes ("4GiB", "4GB", "512MiB", "4000000000") or as a fraction of the device's memory ("0.8",
"80%"). What is resident (the model's weights, g_V, a preconditioner) is not part of the budget: the
budget bounds the working memory of the pass (activations, lm_head's logits in chunks, per-group
gradients), which is what batch planning (services.scoring.memory_plan) controls.
- A budget in bytes is taken as is.
- A fraction f of a CUDA device: f x its total memory minus what torch has allocated on it, and at most
  what is free on it (free memory plus torch's cached blocks).
- A fraction f of the CPU: f x the machine's memory minus this process's resident set, and at most f x
  what the machine has available (MemAvailable: other processes share it); in a container with a memory
  limit (cgroup v2 or v1), the machine's memory is the limit and what is available at most the limit
  minus the cgroup's usage.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gradalign_common.errors import InvalidInputError

if TYPE_CHECKING:  # torch only where a budget is turned into bytes: the scheduler validates budgets without it
    import torch

DEFAULT_MEMORY_BUDGET = "0.75"
MAX_BUDGET_BYTES = 1 << 60  # an exbibyte: anything larger is a typo, and would overflow the planner's integers

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}  # fmt: skip
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class MemoryBudget:
    """Exactly one of `bytes` (working memory in bytes) or `fraction` (of the device's memory, in (0, 1])."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.bytes is None) == (self.fraction is None):
            raise InvalidInputError("a memory budget is either bytes or a fraction of the device's memory")
        if self.bytes is not None and self.bytes <= 0:
            raise InvalidInputError(f"a memory budget must be positive, got {self.bytes} bytes")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise InvalidInputError(f"a memory budget fraction must lie in (0, 1], got {self.fraction}")

    def __str__(self) -> str:
        if self.bytes is not None:
            return f"{self.bytes / 2**30:.3g} GiB"
        return f"{self.fraction:g} of the device's memory"

    def working_bytes(self, device: "torch.device") -> int:
        """The bytes one scoring pass on `device` may use on top of what is resident now (module docstring)."""
        if self.bytes is not None:
            return self.bytes
        total, resident, available = device_memory(device)
        limit = available if device.type == "cuda" else self.fraction * available
        return max(0, int(min(self.fraction * total - resident, limit)))


def parse_memory_budget(value: "str | int | float | MemoryBudget") -> MemoryBudget:
    """A MemoryBudget from bytes with a unit (B, KB, MB, GB, TB powers of 1000; K, M, G, T or KiB, MiB, GiB,
    TiB powers of 1024), a whole number of bytes (> 1), a fraction in (0, 1] or a percentage ("80%");
    InvalidInputError for anything else."""
    if isinstance(value, MemoryBudget):
        return value
    if isinstance(value, bool):
        raise InvalidInputError(f"not a memory budget: {value!r}")
    if isinstance(value, int):
        if value > MAX_BUDGET_BYTES:
            raise InvalidInputError(f"not a memory budget: {value!r} (more than {MAX_BUDGET_BYTES >> 50} PiB)")
        return MemoryBudget(bytes=value) if value > 1 else MemoryBudget(fraction=float(value))
    if isinstance(value, float):
        if not math.isfinite(value) or value > MAX_BUDGET_BYTES:
            raise InvalidInputError(f"not a memory budget: {value!r}")
        return MemoryBudget(fraction=value) if value <= 1.0 else MemoryBudget(bytes=int(value))
    text = str(value).strip().lower()
    if text.endswith("%"):
        try:
            return MemoryBudget(fraction=float(text[:-1]) / 100.0)
        except (ValueError, OverflowError):
            raise InvalidInputError(f"not a memory budget: {value!r}") from None
    match = _PATTERN.match(text)
    if match is None or match.group(2) not in _UNITS:
        raise InvalidInputError(
            f"not a memory budget: {value!r} (bytes such as 4GiB or 512MB, or a fraction of the device's memory such as 0.8)"
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit == "" and number <= 1.0:
        return MemoryBudget(fraction=number)
    if not math.isfinite(number * _UNITS[unit]) or number * _UNITS[unit] > MAX_BUDGET_BYTES:
        raise InvalidInputError(f"not a memory budget: {value!r} (more than {MAX_BUDGET_BYTES >> 50} PiB)")
    return MemoryBudget(bytes=int(number * _UNITS[unit]))


def device_memory(device: "torch.device") -> tuple[int, int, int]:
    """(total, resident, available) bytes of `device`: on CUDA its memory, torch's allocation on it, and what
    is free (plus torch's cached blocks); elsewhere the machine's memory, this process's resident set and
    MemAvailable."""
    if device.type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
        allocated = torch.cuda.memory_allocated(device)
        free, _ = torch.cuda.mem_get_info(device)
        return total, allocated, free + torch.cuda.memory_reserved(device) - allocated
    meminfo = _proc_kb("/proc/meminfo", ("MemTotal", "MemAvailable"))
    total = meminfo.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = meminfo.get("MemAvailable", total)
    resident = _proc_kb("/proc/self/status", ("VmRSS",)).get("VmRSS", 0)
    limited = cgroup_memory()
    if limited is not None:  # a container's limit, not the host's memory, is what the process may use
        limit, usage = limited
        total, available = min(total, limit), min(available, max(0, limit - usage))
    return total, resident, available


CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_memory(root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(limit, usage) bytes of this process's memory cgroup (v2: memory.max, memory.current; v1:
    memory/memory.limit_in_bytes, memory.usage_in_bytes), or None where there is no limit or no cgroup."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            text = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if text == "max":
            return None
        try:
            limit = int(text)
        except ValueError:
            continue
        return None if limit >= _NO_LIMIT else (limit, usage)
    return None


def _proc_kb(path: str, names: tuple[str, ...]) -> dict[str, int]:
    """Fields of a /proc file given in kB, as bytes ({} where it cannot be read)."""
    out = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in names:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out
