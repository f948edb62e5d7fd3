"""Resolving an experiment's dataset reference to problems: a built-in name or a local file."""

from __future__ import annotations

from pathlib import Path

from gradalign_common.datasets import load_problems
from gradalign_common.records import Problem
from gradalign_common.tiny_task import write_splits

BUILTIN_DATASETS = {"arith-train": "train", "arith-val": "val", "arith-test": "test"}


def resolve_dataset(ref: str, artifact_root: Path) -> Path:
    """Path of the dataset file named by ref; built-in datasets are written on first use."""
    if ref in BUILTIN_DATASETS:
        out_dir = Path(artifact_root) / "datasets" / "builtin" / "arith"
        path = out_dir / f"{BUILTIN_DATASETS[ref]}.jsonl"
        if not path.exists():
            write_splits(out_dir)
        return path
    return Path(ref).expanduser().resolve()


def load_dataset(ref: str, artifact_root: Path) -> list[Problem]:
    return load_problems(resolve_dataset(ref, artifact_root))
