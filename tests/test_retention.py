"""Checkpoint retention and the start-up sweep of temporaries (gradalign_common/checkpoint_retention.py)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from gradalign_common.artifacts import sweep_stale_temporaries
from gradalign_common.errors import InvalidInputError
from gradalign_common.checkpoint_retention import (
    CheckpointInfo,
    checkpoints_to_delete,
    list_round_checkpoints,
    prune_checkpoints,
)
from services.trainer.server import startup_housekeeping
from services.trainer.settings import TrainerSettings


def _ckpts(rewards: dict[int, float | None]) -> list[tuple[str, int, float | None]]:
    return [(f"round-{r:05d}", r, v) for r, v in rewards.items()]


def test_keeps_the_last_n_and_the_best_n():
    ckpts = _ckpts({1: 0.2, 2: 0.9, 3: 0.4, 4: 0.5, 5: 0.3, 6: None})
    assert checkpoints_to_delete(ckpts, keep_last=2, keep_best=1) == ["round-00001", "round-00003", "round-00004"]
    assert checkpoints_to_delete(ckpts, keep_last=2, keep_best=2) == ["round-00001", "round-00003"]
    assert checkpoints_to_delete(ckpts, keep_last=2, keep_best=0) == [f"round-0000{i}" for i in (1, 2, 3, 4)]
    # the best already among the last: nothing extra kept
    assert checkpoints_to_delete(_ckpts({1: 0.1, 2: 0.2, 3: 0.9}), keep_last=1, keep_best=1) == [
        "round-00001",
        "round-00002",
    ]


def test_policy_edge_cases():
    assert checkpoints_to_delete([], keep_last=1, keep_best=1) == []
    assert checkpoints_to_delete(_ckpts({3: None, 1: None}), keep_last=5, keep_best=5) == []
    # input order does not matter; the result is in round order and keeps the caller's path objects
    paths = [Path("/c/b"), Path("/c/a"), Path("/c/c")]
    got = checkpoints_to_delete([(paths[0], 7, 0.1), (paths[1], 2, 0.0), (paths[2], 9, 0.5)], keep_last=1)
    assert got == [paths[1], paths[0]] and got[0] is paths[1]
    # ties go to the later round; NaN, inf and None never count as best
    ckpts = _ckpts({1: 0.5, 2: 0.5, 3: math.nan, 4: math.inf, 5: None, 6: 0.0})
    assert checkpoints_to_delete(ckpts, keep_last=1, keep_best=1) == [f"round-0000{i}" for i in (1, 3, 4, 5)]
    assert checkpoints_to_delete([CheckpointInfo("x", 1, 0.3), CheckpointInfo("y", 2)], 1, 1) == []


@pytest.mark.parametrize(
    "ckpts, keep_last, keep_best, match",
    [
        (_ckpts({1: None}), 0, 1, "keep_last must be >= 1"),
        (_ckpts({1: None}), 1, -1, "keep_best must be >= 0"),
        ([("a", 1, None), ("b", 1, 0.2)], 1, 1, "same round"),
    ],
)
def test_policy_refuses_bad_arguments(ckpts, keep_last, keep_best, match):
    with pytest.raises(InvalidInputError, match=match):
        checkpoints_to_delete(ckpts, keep_last, keep_best)


def _fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"x" * 16)
    return path


def test_prune_deletes_only_finished_round_checkpoints_not_in_use(tmp_path):
    root = tmp_path / "checkpoints"
    for r in range(1, 7):
        _fake_checkpoint(root / f"round-{r:05d}")
    live_tmp = _fake_checkpoint(root / ".round-00007.tmp-0123abcd")  # a write in progress
    other = _fake_checkpoint(root / "initial-model")
    (root / "notes.txt").write_text("keep me")
    assert [r for _, r in list_round_checkpoints(root)] == [1, 2, 3, 4, 5, 6]

    rewards = {1: 0.1, 2: 0.8, 3: 0.3, 4: 0.2}
    planned = prune_checkpoints(root, rewards, keep_last=2, keep_best=1, in_use=[root / "round-00003"], dry_run=True)
    assert [p.name for p in planned] == ["round-00001", "round-00004"]
    assert (root / "round-00001").exists()  # dry run

    deleted = prune_checkpoints(root, rewards, keep_last=2, keep_best=1, in_use=[str(root / "round-00003")])
    assert [p.name for p in deleted] == ["round-00001", "round-00004"]
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted(
        [".round-00007.tmp-0123abcd", "initial-model", "notes.txt", "round-00002", "round-00003", "round-00005", "round-00006"]
    )
    assert live_tmp.exists() and other.exists()
    assert prune_checkpoints(tmp_path / "missing", {}, keep_last=1) == []


def test_prune_with_a_custom_pattern(tmp_path):
    for name in ("step-1", "step-2", "step-10"):
        _fake_checkpoint(tmp_path / name)
    deleted = prune_checkpoints(tmp_path, {2: 1.0}, keep_last=1, keep_best=1, pattern=r"step-(\d+)")
    assert [p.name for p in deleted] == ["step-1"]


def _age(path: Path, seconds: float) -> None:
    """Set path's and (for a directory) its entries' mtimes `seconds` in the past."""
    stamp = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (stamp, stamp))
    os.utime(path, (stamp, stamp))


def test_sweep_removes_stale_temporaries_only(tmp_path):
    root = tmp_path / "root"
    ckpts = root / "experiments" / "1" / "checkpoints"
    finished = _fake_checkpoint(ckpts / "round-00001")
    stale_dir = _fake_checkpoint(ckpts / ".round-00002.tmp-aaaaaaaa")
    stale_old = _fake_checkpoint(ckpts / ".round-00001.old-bbbbbbbb")
    stale_file = root / "experiments" / "1" / ".rollouts-0000.parquet.tmp-cccccccc"
    stale_file.write_bytes(b"half")
    live_dir = _fake_checkpoint(ckpts / ".round-00003.tmp-dddddddd")
    verl_dir = _fake_checkpoint(ckpts / ".round-00004-verl.tmp-eeeeeeee")
    not_ours = _fake_checkpoint(ckpts / ".round-00005.tmp-notahex")
    for p in (finished, stale_dir, stale_old, stale_file, live_dir, verl_dir, not_ours):
        _age(p, 7200)
    (live_dir / "model.safetensors").write_bytes(b"still being written")  # fresh file inside: a live write

    removed = sweep_stale_temporaries(root, older_than_s=3600)
    assert sorted(removed) == sorted([stale_dir, stale_old, stale_file, verl_dir])
    assert finished.exists() and live_dir.exists() and not_ours.exists()
    assert not stale_dir.exists() and not stale_file.exists()
    assert sweep_stale_temporaries(root, older_than_s=3600) == []
    assert sweep_stale_temporaries(tmp_path / "missing", 0) == []
    with pytest.raises(ValueError):
        sweep_stale_temporaries(root, -1)


def test_start_up_housekeeping_sweeps_the_checkpoint_root_and_the_verl_scratch(tmp_path):
    root, scratch = tmp_path / "ckpts", tmp_path / "scratch"
    killed = _fake_checkpoint(root / ".round-00001.tmp-0badf00d")  # what a SIGKILL mid-write leaves
    verl = _fake_checkpoint(scratch / ".round-00001-verl.tmp-0badf00d")
    fresh = _fake_checkpoint(root / ".round-00002.tmp-12345678")
    _age(killed, 3 * 3600)
    _age(verl, 3 * 3600)
    settings = TrainerSettings(artifact_root=tmp_path / "art", checkpoint_root=root, verl_work_dir=scratch)
    assert settings.stale_temp_minutes == 60
    assert startup_housekeeping(settings.model_copy(update={"stale_temp_minutes": None})) == []
    assert startup_housekeeping(settings) == [killed, verl]
    assert [p.name for p in root.iterdir()] == [fresh.name] and list(scratch.iterdir()) == []
