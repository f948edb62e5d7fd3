"""Resolving an experiment's dataset reference to problems: a built-in name or a local file."""

from __future__ import annotations

from pathlib import Path

from gradalign_common.datasets import load_problems
from gradalign_common.errors import InvalidInputError
from gradalign_common.records import Problem
from gradalign_common.tiny_task import write_splits

BUILTIN_DATASETS = {"arith-train": "train", "arith-val": "val", "arith-test": "test"}


def resolve_dataset(ref: str, artifact_root: Path, data_root: Path | None = None) -> Path:
    """Path of the dataset file named by ref; built-in datasets are written on first use.

    With data_root given, a path must lie under data_root or artifact_root (after
    resolving symlinks and '..'); anything else is refused.
    """
    if ref in BUILTIN_DATASETS:
        out_dir = Path(artifact_root) / "datasets" / "builtin" / "arith"
        path = out_dir / f"{BUILTIN_DATASETS[ref]}.jsonl"
        if not path.exists():
            write_splits(out_dir)
        return path
    path = Path(ref).expanduser().resolve()
    if data_root is not None and not any(
        path.is_relative_to(Path(root).expanduser().resolve()) for root in (data_root, artifact_root)
    ):
        raise InvalidInputError(f"{path} is outside the allowed data root {Path(data_root).expanduser().resolve()}")
    return path


def load_dataset(ref: str, artifact_root: Path, data_root: Path | None = None) -> list[Problem]:
    return load_problems(resolve_dataset(ref, artifact_root, data_root))
