"""The shared artifact store: deterministic paths and atomic writes (shared/ARCHITECTURE.md).

Every file is written to a temporary name beside its destination and renamed into
place, so a retried request overwrites the same result atomically and a reader never
sees half a file. Directories (checkpoints) are built under a temporary name and
renamed the same way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside dest; on success rename it onto dest, on error remove it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if tmp.is_dir():
            _replace_dir(tmp, dest)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def atomic_write_bytes(dest: str | Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished directory onto dest; an existing dest (a retried request) is replaced."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


class ArtifactStore:
    """Paths of an experiment's bulk data under one root shared by every service."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def experiment_dir(self, experiment_id: int | str) -> Path:
        return self.root / "experiments" / str(experiment_id)

    def round_dir(self, experiment_id: int | str, round_index: int) -> Path:
        return self.experiment_dir(experiment_id) / "rounds" / f"{round_index:05d}"

    def problems_path(self, experiment_id: int | str, round_index: int, stage: str, shard: int) -> Path:
        return self.round_dir(experiment_id, round_index) / stage / f"problems-{shard:04d}.parquet"

    def rollouts_path(self, experiment_id: int | str, round_index: int, stage: str, shard: int) -> Path:
        return self.round_dir(experiment_id, round_index) / stage / f"rollouts-{shard:04d}.parquet"

    def scores_path(self, experiment_id: int | str, round_index: int, shard: int) -> Path:
        return self.round_dir(experiment_id, round_index) / "score" / f"scores-{shard:04d}.jsonl"

    def checkpoint_dir(self, experiment_id: int | str, round_index: int) -> Path:
        """The checkpoint written by round `round_index`'s training stage."""
        return self.experiment_dir(experiment_id) / "checkpoints" / f"round-{round_index:05d}"

    def datasets_dir(self) -> Path:
        return self.root / "datasets"


def sweep_stale_temporaries(root: str | Path, older_than_s: float, now: float | None = None) -> list[Path]:
    """Remove the temporaries a killed writer left under root; return what was removed.

    A temporary is a file or directory named like the ones `atomic_path` and
    `_replace_dir` create (`.NAME.tmp-xxxxxxxx`, `.NAME.old-xxxxxxxx`). One is stale when
    nothing in it was modified for `older_than_s` seconds (for a directory: its newest
    entry, so a live write that keeps adding or growing files is left alone). Finished
    artifacts are never touched. Entries that vanish or cannot be removed meanwhile are
    skipped. Symbolic links are neither followed nor removed.
    """
    import re
    import time

    pattern = re.compile(r"^\..+\.(?:tmp|old)-[0-9a-f]{8}$")
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    cutoff = (time.time() if now is None else now) - older_than_s
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed

    def newest_mtime(path: Path) -> float:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for dirpath, dirnames, filenames in os.walk(path):
                for name in dirnames + filenames:
                    try:
                        newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
                    except OSError:
                        pass
        return newest

    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if not pattern.match(name):
                continue
            if name in dirnames:
                dirnames.remove(name)  # never descend into a temporary
            path = Path(dirpath) / name
            try:
                if path.is_symlink() or newest_mtime(path) > cutoff:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError:
                continue
            removed.append(path)
    return sorted(removed)
