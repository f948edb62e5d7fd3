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


def test_bench_scaling_study_at_a_tiny_size(tmp_path):
    """--sizes runs floor, exact and today's path at each size within the budget and reports the ratios."""
    out = tmp_path / "scaling.json"
    tiny = [a for a in TINY if a not in ("--select-fraction", "0.5")]
    result = CliRunner().invoke(app, [*tiny, "--vocab", "5000", "--sizes", "1,2", "--memory-budget", "16MiB",
                                      "--attention", "sdpa,eager", "--batch-groups", "1,2", "--peak-tflops", "0.01",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in ["scaling within a 16 MB memory budget", "today's floor", "today's exact", "MB/tok",
                 "exact/floor", "peak of torch's tensors", "scaling targets"]:
        assert text in result.stdout, text
    data = json.loads(out.read_text())["scaling"]
    assert [s["groups"] for s in data["sizes"]] == [1, 2]
    assert set(data["sizes"][0]["jobs"]) == {"floor", "today's floor", "exact", "today's exact"}  # the smallest
    assert set(data["sizes"][1]["jobs"]) == {"floor", "exact"}
    for size in data["sizes"]:
        assert all(j["seconds"] > 0 and j["tokens_in_flight"] > 0 for j in size["jobs"].values())
    assert set(data["targets"]) == {"exact_peak_within_budget", "exact_peak_growth_below_1.2x",
                                    "exact_tensor_peak_within_budget", "exact_tensor_peak_growth_below_1.2x",
                                    "exact_time_per_token_within_1.2x", "exact_within_1.15x_floor"}
    assert all(0 < s["exact_tensor_peak_mb"] <= 16 for s in data["sizes"])  # torch's tensors, within the budget
    assert all(s["exact_batches"] >= 1 for s in data["sizes"])
    assert data["first_size_beyond_one_batch"] == next((s["groups"] for s in data["sizes"] if s["exact_batches"] > 1), None)
    assert data["exact_peak_growth_beyond_one_batch"] is None  # no larger size after the first of several batches
    exact = data["sizes"][0]["jobs"]["exact"]  # 6 x parameters x response tokens / s, against the given peak
    assert exact["fraction_of_peak"] == pytest.approx(exact["model_tflops"] / 0.01)
    assert exact["model_tflops"] > 0 and "of the device's dense peak" in result.stdout
    attention = data["attention"]  # floor and exact again with each implementation; the model's own restored after
    assert attention["default"] == "sdpa" and set(attention["implementations"]) == {"sdpa", "eager"}
    assert all(j["seconds"] > 0 for jobs in attention["implementations"].values() for j in jobs.values())
    assert "attention eager at 1 groups" in result.stdout and "x sdpa's time" in result.stdout
    by_batch = data["batch_size"]  # exact at the largest size in batches of 1 and of 2 groups
    assert by_batch["groups"] == 2 and set(by_batch["per_batch"]) == {"1", "2"}
    assert min(v["vs_best"] for v in by_batch["per_batch"].values()) == 1.0
    assert all(v["seconds_per_1k_tokens"] > 0 for v in by_batch["per_batch"].values())
    assert "by groups per batch: 1:" in result.stdout
    assert CliRunner().invoke(app, [*tiny, "--sizes", "2,x"]).exit_code == 2
    assert CliRunner().invoke(app, [*tiny, "--sizes", "2", "--batch-groups", "0"]).exit_code == 2
    assert CliRunner().invoke(app, [*tiny, "--sizes", "2", "--attention", "fast"]).exit_code == 2
    assert CliRunner().invoke(app, [*tiny, "--sizes", "2", "--memory-budget", "lots"]).exit_code == 2


@pytest.mark.slow
def test_bench_scaling_study_reports_torch_compile(tmp_path):
    """--compile times floor (and exact, or its error) with the decoder layers compiled, after eager."""
    out = tmp_path / "compile.json"
    tiny = [a for a in TINY if a not in ("--select-fraction", "0.5")]
    result = CliRunner().invoke(app, [*tiny, "--sizes", "1", "--memory-budget", "16MiB", "--compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    compiled = json.loads(out.read_text())["scaling"]["compile"]
    assert compiled["floor"] > 0 and compiled["compiled floor"] > 0 and compiled["first_compiled_floor_seconds"] > 0
    assert compiled["compiled_floor_vs_floor"] == pytest.approx(compiled["compiled floor"] / compiled["floor"])
    assert ("compiled_exact_vs_exact" in compiled) != ("compiled_exact_error" in compiled)
    assert "torch.compile at 1 groups: floor" in result.stdout
