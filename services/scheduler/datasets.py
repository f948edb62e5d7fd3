"""Resolving an experiment's dataset reference to problems: a built-in name or a local file."""

from __future__ import annotations

from pathlib import Path

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.errors import InvalidInputError
from gradalign_common.tiny_task import write_splits

BUILTIN_DATASETS = {"arith-train": "train", "arith-val": "val", "arith-test": "test"}


def check_under_data_root(path: str | Path, data_root: Path | None, artifact_root: Path) -> Path:
    """The resolved path (symlinks and '..' resolved) if it lies under data_root or artifact_root."""
    if "\x00" in str(path):
        raise InvalidInputError("the path contains a NUL byte")
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        raise InvalidInputError("the path cannot be resolved") from None
    if data_root is not None and not any(
        resolved.is_relative_to(Path(root).expanduser().resolve()) for root in (data_root, artifact_root)
    ):  # the message names no server path (neither the resolved one nor the root)
        raise InvalidInputError("the path is outside the allowed data root")
    return resolved


def display_path(path: str | Path, data_root: Path | None, artifact_root: Path) -> str:
    """How a file is named to API users: relative to the data root (or, prefixed "artifacts/", to the
    artifact root), else by its file name alone -- never as an absolute server path."""
    p = Path(path)
    for root, prefix in ((data_root, ""), (artifact_root, "artifacts/")):
        if root is None:
            continue
        try:
            return prefix + str(p.relative_to(Path(root).expanduser().resolve()))
        except ValueError:
            pass
        try:
            return prefix + str(p.relative_to(Path(root).expanduser()))
        except ValueError:
            pass
    return p.name


def scrub_paths(message: str, data_root: Path | None, artifact_root: Path) -> str:
    """The message with the data and artifact roots (as given and resolved) cut out of every path."""
    for root, prefix in ((artifact_root, "artifacts/"), (data_root, "")):
        if root is None:
            continue
        for form in sorted({str(Path(root).expanduser()), str(Path(root).expanduser().resolve())}, key=len, reverse=True):
            message = message.replace(form + "/", prefix).replace(form, prefix.rstrip("/") or ".")
    return message


def resolve_dataset(ref: str, artifact_root: Path, data_root: Path | None = None, registered: dict[str, str] | None = None) -> Path:
    """Path of the dataset file named by ref: a built-in name (written on first use), a
    registered dataset's name, or a file path under the data root."""
    if ref in BUILTIN_DATASETS:
        out_dir = ArtifactStore(artifact_root).datasets_dir() / "builtin" / "arith"
        path = out_dir / f"{BUILTIN_DATASETS[ref]}.jsonl"
        if not path.exists():
            write_splits(out_dir)
        return path
    if registered and ref in registered:
        return Path(registered[ref])
    return check_under_data_root(ref, data_root, artifact_root)
