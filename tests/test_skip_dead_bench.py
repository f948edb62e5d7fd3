"""Skipping dead problems in `gradalign bench quality` (issue 18): `--skip-dead both` runs a regime without and with
skipping over the same seeds through the round policy's draw_chunk (the scheduler's function), counts the generated
tokens, and writes the paired report. On a smoke config whose pool the rounds walk twice; the effect on accuracy is
never asserted here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gradalign_common.round_policy import chunk_ids, draw_chunk, stage_seed, zero_advantage_streaks
from gradalign_tools.bench.quality import load_config, run_hash
from gradalign_tools.bench.quality.config import skip_setting
from gradalign_tools.bench.quality.run import make_family_for
from gradalign_tools.bench.quality.skipping import skip_markdown, skip_rows, with_skip
from gradalign_tools.cli import app

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "benchmarks" / "quality" / "smoke.yaml"
POOL, M, ROUNDS = 24, 12, 4  # 4 rounds of 12 walk a pool of 24 twice


def _config_file(tmp_path: Path, **skip) -> Path:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["name"] = "smoke_skip"
    raw["data"]["pool_size"] = POOL
    raw["loop"].update(rounds=ROUNDS, chunk_size=M, k=2, skip_dead={"enabled": True, "base": 1.0, "cap": 0.99, **skip})
    raw["train"]["batch_size"] = 4
    path = tmp_path / "smoke_skip.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _invoke(*args: str):
    return CliRunner().invoke(app, ["bench", "quality", "--no-progress", *args])


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skip")
    config = _config_file(tmp)
    results = tmp / "results"
    result = _invoke("--config", str(config), "--results", str(results), "--skip-dead", "both", "--modes", "rand", "--seeds", "0")
    assert result.exit_code == 0, result.output
    return load_config(config), results, result.output


def _run(results: Path, variant: str) -> dict:
    return json.loads((results / variant / "runs" / "rand-seed0.json").read_text())


def test_both_runs_and_the_paired_report_are_written(compared):
    config, results, output = compared
    off, on = _run(results, "no-skip"), _run(results, "skip")
    assert off["skip_dead"]["enabled"] is False and on["skip_dead"]["enabled"] is True
    assert off["config_hash"] != on["config_hash"]
    for run in (off, on):  # the chunk is refilled from the pool: every round rolls out M candidates
        assert [x["chunk_size"] for x in run["rounds"]] == [M] * ROUNDS
        assert [x["rollout_responses"] for x in run["rounds"]] == [M * 4] * ROUNDS
        assert run["rollout_tokens"] == sum(x["rollout_tokens"] for x in run["rounds"]) > 0
        assert 0 <= run["zero_advantage_tokens"] <= run["rollout_tokens"]
    assert off["skipped"] == 0 and on["skipped"] == sum(len(x["skipped_ids"]) for x in on["rounds"])
    with open(results / "skipping.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["mode"], row["seed"]) == ("rand", "0")
    assert int(row["tokens_off"]) == off["rollout_tokens"] and int(row["tokens_on"]) == on["rollout_tokens"]
    assert int(row["skipped"]) == on["skipped"] and int(row["rollouts_saved"]) == on["skipped"] * 4
    assert float(row["accuracy_off"]) == pytest.approx(100 * off["accuracy"][-1], abs=1e-3)
    report = (results / "skipping.md").read_text()
    assert "Skipping dead problems: smoke_skip" in report and "walked 2.00 times" in report and "| rand | 1 |" in report
    assert "skipping.md" in output
    assert (results / "no-skip" / "summary.md").is_file() and (results / "skip" / "summary.md").is_file()


def test_the_chunks_are_the_round_policys(compared):
    config, results, _ = compared
    pool_order = [p.problem_id for p in make_family_for(config, 0).pool_problems()]
    off, on = _run(results, "no-skip"), _run(results, "skip")
    for r, x in enumerate(off["rounds"]):  # off: exactly the chunks of before
        assert sorted(x["candidates"]["problem_id"]) == sorted(chunk_ids(pool_order, r, M))
    history, cursor, skipped_any = [], 0, False
    for r, x in enumerate(on["rounds"]):
        streaks = zero_advantage_streaks(history)
        draw = draw_chunk(pool_order, cursor, M, streaks, skip_setting(config), stage_seed(0, r, "skip_dead"))
        cursor = draw.end
        ids = x["candidates"]["problem_id"]
        assert sorted(ids) == sorted(draw.ids) and x["skipped_ids"] == draw.skipped
        assert all(streaks.get(pid, 0) > 0 for pid in draw.skipped)  # only problems dead in their last rounds
        assert not set(ids) & set(draw.skipped) and len(set(ids)) == len(ids)
        skipped_any |= bool(draw.skipped)
        history += [(r, pid, zero) for pid, zero in zip(ids, x["candidates"]["zero_advantage"])]
    assert skipped_any, "the smoke pool had no dead problem to skip"
    assert [x["skipped"] for x in on["rounds"][:2]] == [0, 0]  # the first pass knows no streaks


def test_disabled_skipping_keeps_the_run_hash_of_before(tmp_path):
    plain = load_config(SMOKE)
    assert run_hash(with_skip(plain, False)) == run_hash(plain)
    assert run_hash(with_skip(plain, True)) != run_hash(plain)
    bad = _config_file(tmp_path, cap=1.0)
    result = _invoke("--config", str(bad), "--results", str(tmp_path / "out"))
    assert result.exit_code == 2 and "loop.skip_dead" in result.output and "cap" in result.output
    result = _invoke("--config", str(SMOKE), "--results", str(tmp_path / "out"), "--skip-dead", "maybe")
    assert result.exit_code == 2 and "--skip-dead" in result.output


def _fake_run(mode, seed, tokens, zero, acc, skipped):
    return {"mode": mode, "seed": seed, "rollout_tokens": tokens, "zero_advantage_tokens": zero, "accuracy": [0.1, acc],
            "skipped": skipped, "wall_seconds": 1.0}


def test_skip_rows_pair_by_seed_and_compute_tokens_per_point():
    off = {("sim", 0): _fake_run("sim", 0, 1000, 400, 0.50, 0), ("sim", 1): _fake_run("sim", 1, 1000, 500, 0.40, 0),
           ("sim", 2): _fake_run("sim", 2, 1000, 500, 0.40, 0)}
    on = {("sim", 0): _fake_run("sim", 0, 990, 200, 0.55, 12), ("sim", 1): _fake_run("sim", 1, 1010, 300, 0.0, 7)}
    rows = skip_rows(off, on, ["sim"], [0, 1, 2], n_samples_train=8)
    assert [r["seed"] for r in rows] == [0, 1]  # seed 2 has no pair
    first, second = rows
    assert first["tokens_per_point_off"] == pytest.approx(1000 / 50) and first["tokens_per_point_on"] == pytest.approx(990 / 55)
    assert first["accuracy_diff"] == pytest.approx(5.0) and first["rollouts_saved"] == 96
    assert first["tokens_change_pct"] == pytest.approx(-1.0)
    assert second["tokens_per_point_on"] is None  # no accuracy: no tokens per point
    config = {"name": "r", "loop": {"rounds": 8, "chunk_size": 128, "n_samples_train": 8, "skip_dead": {"base": 0.5, "cap": 0.9}},
              "data": {"pool_size": 384}}
    text = "\n".join(skip_markdown(config, rows))
    assert "walked 2.67 times" in text and "+5.0 -40.0 (mean -17.5)" in text and "| sim | 2 |" in text
