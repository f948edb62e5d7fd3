"""CPU memory back to the operating system, so a process's resident memory follows what scoring holds.

glibc's malloc serves blocks below its mmap threshold (dynamic, up to 32 MiB) from its heaps and keeps
what is freed there for reuse; a scoring pass allocates and frees many activation-sized blocks (a layer's
activations of a batch are megabytes), so the resident set drifts above what the pass holds (measured: a
4 GiB plan's exact pass at 2.8 GB resident in a fresh process, 3.5 GB after other passes had run).
`map_large_blocks` fixes the threshold at LARGE_BLOCK_BYTES (such blocks are mapped and unmapped one by
one: the same pass stayed at 2.7-3.0 GB, no slower); `release_freed_memory` hands what the heaps hold
free back after each batch (malloc_trim), so smaller blocks cannot pile up from batch to batch either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

LARGE_BLOCK_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.lru_cache(maxsize=None)
def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Have malloc serve blocks of `threshold` bytes or more by mmap (returned to the system when freed).
    Process-wide, once per threshold; False where the C library is not glibc (nothing changes)."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, threshold))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the free memory of malloc's heaps to the system (glibc's malloc_trim; elsewhere nothing)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
