"""`gradalign bench scoring` at a tiny size: it runs and prints the expected rows (timings are not asserted)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from gradalign_tools.bench.scoring import scoring_command
from gradalign_tools.bench.scoring_fidelity import fidelity, rankdata, spearman
from gradalign_common.records import ScoreRecord

app = typer.Typer()
app.command()(scoring_command)

TINY = ["--layers", "2", "--hidden", "32", "--intermediate", "64", "--heads", "4", "--kv-heads", "2",
        "--vocab", "64", "--groups", "6", "--responses", "3", "--tokens", "6", "--prompt-tokens", "4",
        "--validation-groups", "3", "--select-fraction", "0.5"]  # fmt: skip


def test_bench_prints_every_row_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [*TINY, "--memory-multiplier", "2", "--repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = result.stdout
    for row in ["floor", "baseline", "exact", "project-16", "top-layers-1", "fewer-responses"]:
        assert any(line.startswith(row + " ") for line in table.splitlines()), (row, table)
    for text in ["groups/s", "resp tok/s", "peak MB", "x floor", "x baseline", "spearman", "top overlap",
                 "max |exact - baseline| score difference", "memory: exact peak", "validation gradient seconds"]:
        assert text in table, text
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == ["floor", "baseline", "exact", "project-16", "top-layers-1", "fewer-responses"]
    assert rows["exact"]["max_abs_diff_vs_baseline"] <= 1e-5
    assert all(len(r["seconds_all"]) == 2 and r["seconds"] > 0 for r in rows.values())
    for name in ["project-16", "top-layers-1", "fewer-responses"]:
        assert rows[name]["speedup_vs_exact"] > 0
        assert 0.0 <= rows[name]["top_overlap"] <= 1.0
        assert rows[name]["spearman"] is None or -1.0 <= rows[name]["spearman"] <= 1.0
    assert data["memory_check"]["groups_multiplied"] == 12
    assert set(data["targets"]) >= {"exact_within_1.15x_floor", "exact_not_slower_than_baseline",
                                    "exact_equals_baseline_1e-5", "memory_flat"}


def test_bench_rejects_bad_arguments():
    result = CliRunner().invoke(app, [*TINY, "--methods", "exact", "--memory-multiplier", "0"])
    assert result.exit_code == 2 and "exact" in result.stderr
    result = CliRunner().invoke(app, [*TINY, "--mode", "rand"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["--preset", "huge"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_bench_replicas_mode(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [*TINY, "--methods", "", "--memory-multiplier", "0", "--replicas", "2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "replicas: 1 process" in result.stdout
    replicas = json.loads(out.read_text())["replicas"]
    assert replicas["replicas"] == 2 and replicas["ratio"] > 0
    assert replicas["max_abs_diff_sharded_vs_one"] <= 1e-6


def test_rank_statistics():
    assert list(rankdata([3.0, 1.0, 2.0, 1.0])) == [4.0, 1.5, 3.0, 1.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    exact = [ScoreRecord(f"p{i}", float(i), 0.5, 4, False) for i in range(8)]
    approx = [ScoreRecord(f"p{i}", float(i if i < 6 else -i), 0.5, 4, False) for i in range(8)]
    f = fidelity(exact, approx, "sim", 0.25)
    assert f["n_select"] == 2 and f["top_overlap"] == 0.0
    assert fidelity(exact, exact, "sim", 0.5)["top_overlap"] == 1.0
