"""Checkpoint retention (keep the last N rounds plus the best N by validation reward) and sweeping of stale temporaries.

The trainer writes one checkpoint directory per round (`.../checkpoints/round-00007`,
see gradalign_common.artifacts.ArtifactStore.checkpoint_dir). Only the scheduler knows
each round's validation reward, so it calls `prune_checkpoints` after it records one.

- `checkpoints_to_delete` is the policy, a pure function: of the given checkpoints keep
  the `keep_last` latest rounds and the `keep_best` with the highest validation reward
  (ties go to the later round; a missing or non-finite reward never counts as best);
  delete the rest.
- `prune_checkpoints` applies it to a directory. It considers only finished checkpoint
  directories whose names match the round pattern, so the temporaries of a write in
  progress (`.round-00008.tmp-...`, hidden) and anything else in the directory are never
  touched; it never deletes a checkpoint named in `in_use`; and it deletes by renaming
  the directory to a hidden `.NAME.old-xxxxxxxx` first (atomic: a reader sees the whole
  checkpoint or none) and then removing that.
- `sweep_stale_checkpoint_temporaries` runs at trainer start-up: it removes the
  temporaries a killed trainer left under the checkpoint root (whatever a crash between
  the rename and the removal above left, too).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from gradalign_common.artifacts import sweep_stale_temporaries
from gradalign_common.errors import InvalidInputError
from gradalign_common.logging_setup import get_logger

log = get_logger("gradalign.trainer.retention")

ROUND_DIR_PATTERN = r"round-(\d+)"


@dataclass(frozen=True)
class CheckpointInfo:
    path: str | Path
    round: int
    validation_reward: float | None = None


CheckpointLike = CheckpointInfo | tuple


def checkpoints_to_delete(
    checkpoints: Iterable[CheckpointLike], keep_last: int, keep_best: int = 0
) -> list:
    """The paths to delete: every checkpoint except the `keep_last` latest rounds and the `keep_best` best.

    `checkpoints` are `(path, round, validation_reward | None)` tuples or CheckpointInfo.
    The result keeps the input's path objects, in round order. keep_last must be >= 1
    (the latest checkpoint is where the next round starts); keep_best >= 0. Rounds must
    be unique.
    """
    if keep_last < 1:
        raise InvalidInputError(f"keep_last must be >= 1 (the latest checkpoint is in use), got {keep_last}")
    if keep_best < 0:
        raise InvalidInputError(f"keep_best must be >= 0, got {keep_best}")
    items = [c if isinstance(c, CheckpointInfo) else CheckpointInfo(*c) for c in checkpoints]
    rounds = [c.round for c in items]
    if len(set(rounds)) != len(rounds):
        raise InvalidInputError(f"two checkpoints of the same round: {sorted(rounds)}")
    by_round = sorted(items, key=lambda c: c.round)
    keep = {c.round for c in by_round[-keep_last:]}
    rated = [c for c in items if _finite(c.validation_reward)]
    rated.sort(key=lambda c: (c.validation_reward, c.round), reverse=True)
    keep.update(c.round for c in rated[:keep_best])
    return [c.path for c in by_round if c.round not in keep]


def list_round_checkpoints(directory: str | Path, pattern: str = ROUND_DIR_PATTERN) -> list[tuple[Path, int]]:
    """Finished checkpoint directories in `directory` whose whole name matches `pattern` (group 1 = round)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    regex = re.compile(pattern)
    found = []
    for entry in directory.iterdir():
        m = regex.fullmatch(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            found.append((entry, int(m.group(1))))
    return sorted(found, key=lambda item: item[1])


def prune_checkpoints(
    directory: str | Path,
    validation_rewards: Mapping[int, float | None] | None = None,
    keep_last: int = 3,
    keep_best: int = 1,
    in_use: Iterable[str | Path] = (),
    pattern: str = ROUND_DIR_PATTERN,
    dry_run: bool = False,
) -> list[Path]:
    """Delete the round checkpoints in `directory` the policy does not keep; return the deleted paths.

    `validation_rewards` maps a round to its validation reward (absent = unknown). Paths
    in `in_use` (e.g. the checkpoint a worker has loaded, the KL reference) are never
    deleted. With dry_run nothing is deleted and the paths that would be are returned.
    """
    rewards = validation_rewards or {}
    protected = {_resolved(p) for p in in_use}
    found = list_round_checkpoints(directory, pattern)
    infos = [CheckpointInfo(path, rnd, rewards.get(rnd)) for path, rnd in found]
    doomed = [p for p in checkpoints_to_delete(infos, keep_last, keep_best) if _resolved(p) not in protected]
    if dry_run:
        return doomed
    deleted = []
    for path in doomed:
        if _delete_dir(path):
            deleted.append(path)
    if deleted:
        log.info("checkpoints_pruned", directory=str(directory), deleted=[p.name for p in deleted])
    return deleted


def sweep_stale_checkpoint_temporaries(root: str | Path, older_than_s: float) -> list[Path]:
    """Remove the temporaries (`.NAME.tmp-*`, `.NAME.old-*`) under root untouched for older_than_s seconds."""
    removed = sweep_stale_temporaries(root, older_than_s)
    if removed:
        log.info("stale_temporaries_removed", root=str(root), removed=[str(p) for p in removed])
    return removed


def _delete_dir(path: Path) -> bool:
    """Rename path to a hidden .old- name (one atomic step), then remove it; False if it vanished."""
    hidden = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, hidden)
    except FileNotFoundError:
        return False
    shutil.rmtree(hidden, ignore_errors=True)
    return True


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)

