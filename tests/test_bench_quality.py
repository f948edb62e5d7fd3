"""`gradalign bench quality` on the smoke config: the outputs are produced and well formed, and a
rerun resumes (skips finished runs, redoes missing, stale or broken ones). The ranking of the
modes is never asserted here (docs/quality.md has the real regimes)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from gradalign_tools.bench.quality import load_config, paired_against, run_hash

from cli_helpers import invoke, invoke_ok, run_bench

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "benchmarks" / "quality" / "smoke.yaml"
MODES = ["sim", "dot", "align", "accgreedy", "rand"]
SEEDS = [0, 1]
QUALITY = ("bench", "quality", "--no-progress")


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG", path
        assert image.width > 100 and image.height > 100
        image.load()  # decodes every chunk: a truncated or corrupt file raises


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> tuple[Path, str]:
    return run_bench(tmp_path_factory.mktemp("quality") / "smoke", *QUALITY, "--config", str(SMOKE))


def test_the_smoke_benchmark_writes_runs_tables_and_plots(smoke_results):
    results, output = smoke_results
    assert "5 modes x 2 seeds; 0 runs already finished" in output
    config = load_config(SMOKE)
    rounds = config["loop"]["rounds"]
    for mode in MODES:
        for seed in SEEDS:
            run = json.loads((results / "runs" / f"{mode}-seed{seed}.json").read_text())
            assert run["mode"] == mode and run["seed"] == seed and run["config_hash"] == run_hash(config)
            assert len(run["accuracy"]) == rounds + 1 and all(0.0 <= a <= 1.0 for a in run["accuracy"])
            assert len(run["val_accuracy"]) == rounds + 1
            assert len(run["tracked_fraction"]) == rounds and all(0.0 <= f <= 1.0 for f in run["tracked_fraction"])
            assert [set(p) for p in run["per_type_accuracy"]] == [{"add2", "copy"}] * (rounds + 1)
            for r in run["rounds"]:
                assert r["selected"] == config["loop"]["chunk_size"] // config["loop"]["k"]
                assert sum(r["selected_types"].values()) == r["selected"]
                assert 0 <= r["selected_noisy"] <= r["selected"]
    # every mode starts from the same cached warm-started model, one per seed
    models = sorted(p.name for p in (results / "models").iterdir() if not p.name.startswith("."))
    assert len(models) == len(SEEDS) and all((results / "models" / m / "warm_start.json").is_file() for m in models)
    starts = {json.loads((results / "runs" / f"{m}-seed0.json").read_text())["accuracy"][0] for m in MODES}
    assert len(starts) == 1

    with (results / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["mode"] for r in rows] == MODES
    for r in rows:
        assert int(r["n_seeds"]) == len(SEEDS)
        for key in ("initial_mean", "final_mean", "final_std", "final_seed0", "final_seed1", "val_final_mean",
                    "noisy_selected_mean", "noisy_selected_std", "noisy_in_chunk_mean", "final_add2_mean", "final_copy_mean"):
            assert 0.0 <= float(r[key]) <= 1.0, key
        finals = [float(r["final_seed0"]), float(r["final_seed1"])]
        assert float(r["final_mean"]) == pytest.approx(sum(finals) / 2, abs=1e-4)

    md = (results / "summary.md").read_text()
    assert md.startswith("# Selection quality: smoke")
    table = [line for line in md.splitlines() if line.startswith("| ") and "|---" not in line]
    header = table[0]
    assert "final mean" in header and "final std" in header and "seed 0" in header and "seed 1" in header
    assert "noisy selected (%)" in header
    mode_rows = [line for line in table[1:] if line.split("|")[1].strip() in MODES]
    assert [line.split("|")[1].strip() for line in mode_rows[: len(MODES)]] == MODES
    assert all(len(line.split("|")) == len(header.split("|")) for line in mode_rows[: len(MODES)])
    assert md in output  # the command prints the summary

    assert "Paired against rand" in md
    with (results / "paired.csv").open() as fh:
        paired = list(csv.DictReader(fh))
    assert [r["mode"] for r in paired] == [m for m in MODES if m != "rand"]
    for r in paired:
        assert r["baseline"] == "rand" and int(r["n_seeds"]) == len(SEEDS) and 0 <= int(r["ahead"]) <= len(SEEDS)

    for name in ("accuracy.png", "selected_fraction.png"):
        _assert_png(results / name)

    # suspect-reward flags: each round records its candidates; flags.csv and the summary measure the flags
    run = json.loads((results / "runs" / "sim-seed0.json").read_text())
    assert all(len(r["candidates"]["problem_id"]) == config["loop"]["chunk_size"] for r in run["rounds"])
    with (results / "flags.csv").open() as fh:
        flags = list(csv.DictReader(fh))
    assert {r["rule"] for r in flags if r["mode"] == "sim"} == {"cosine@0", "robust_z@0", "pass_rate@0", "pass_rate@0.25"}
    assert {r["rule"] for r in flags if r["mode"] == "rand"} == {"pass_rate@0", "pass_rate@0.25"}  # no cosine in rand
    assert {int(r["round"]) for r in flags} == {1, 2}
    for r in flags:
        assert int(r["true_flags"]) <= int(r["flagged"]) <= int(r["candidates"]) and int(r["cum_true_flags"]) <= int(r["cum_noisy"])
    assert "Suspect-reward flags against the known noisy problems" in md and "| sim | cosine@0 |" in md


def _run(accuracy: list[float]) -> dict:
    return {"accuracy": accuracy}


def test_paired_against_rand_compares_the_same_seed_only():
    runs = {
        ("sim", 0): _run([0.5, 0.6, 0.7]), ("rand", 0): _run([0.5, 0.5, 0.4]),
        ("sim", 1): _run([0.2, 0.2, 0.3]), ("rand", 1): _run([0.2, 0.4, 0.4]),
        ("sim", 2): _run([0.9, 0.9, 0.9]),  # no rand run for seed 2: left out
        ("dot", 5): _run([0.1, 0.1, 0.1]),  # no common seed with rand: no row
    }
    (sim,) = paired_against(runs, ["sim", "dot", "rand"], [0, 1, 2, 5])
    assert sim["mode"] == "sim" and sim["baseline"] == "rand" and sim["seeds"] == [0, 1]
    assert sim["final_diff"] == pytest.approx([0.3, -0.1])
    assert sim["final_diff_mean"] == pytest.approx(0.1)
    assert sim["final_diff_std"] == pytest.approx(0.08 ** 0.5)  # sample std of (0.3, -0.1)
    assert sim["ahead"] == 1
    # over rounds 1..R: seed 0 (0.65 - 0.45) = 0.2, seed 1 (0.25 - 0.4) = -0.15
    assert sim["rounds_diff_mean"] == pytest.approx(0.025)
    assert sim["rounds_ahead"] == 1
    assert paired_against(runs, ["sim"], [0, 1], baseline="align") == []


def test_a_rerun_skips_finished_runs_and_redoes_missing_stale_or_broken_ones(smoke_results):
    results, _ = smoke_results
    runs = results / "runs"
    before = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    assert len(before) == len(MODES) * len(SEEDS)

    again = invoke_ok(*QUALITY, "--config", str(SMOKE), "--results", str(results))
    assert "10 runs already finished" in again and "0 to run" in again
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")} == before

    # a run that never finished (killed: no file, or a leftover temporary file), a broken file,
    # and a run made with another config are redone; the others are kept
    (runs / "rand-seed1.json").unlink()
    (runs / ".rand-seed1.json.tmp-deadbeef").write_text('{"half": ')
    (runs / "sim-seed0.json").write_text('{"mode": "sim", "seed": 0, "accur')
    stale = json.loads((runs / "dot-seed1.json").read_text())
    stale["config_hash"] = "0" * 16
    (runs / "dot-seed1.json").write_text(json.dumps(stale))
    resumed = invoke_ok(*QUALITY, "--config", str(SMOKE), "--results", str(results))
    assert "7 runs already finished" in resumed and "3 to run" in resumed
    after = {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"rand-seed1.json", "sim-seed0.json", "dot-seed1.json"}
    assert json.loads((runs / "sim-seed0.json").read_text())["config_hash"] == run_hash(load_config(SMOKE))


def test_seeds_and_modes_can_be_narrowed(smoke_results, tmp_path):
    results, _ = smoke_results
    out = tmp_path / "narrow"
    invoke_ok(*QUALITY, "--config", str(SMOKE), "--results", str(out), "--seeds", "1", "--modes", "rand,sim",
              "--model-cache", str(results / "models"))
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == ["rand-seed1.json", "sim-seed1.json"]
    assert not (out / "models").exists()  # the shared cache was used
    with (out / "summary.csv").open() as fh:
        assert [r["mode"] for r in csv.DictReader(fh)] == ["rand", "sim"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("loop: {chunk_size: 16, k: 8}\n", "fewer than train.batch_size"),
        ("loop: {rounds: 0}\n", "loop.rounds must be an integer >= 1"),
        ("lopo: {}\n", "unknown key lopo"),
        ("data: {test: {division: 3}}\n", "unknown problem type 'division'"),
        ("data: {noise: {rate: 0.5, rewards: {nope: 1}}}\n", "unknown data_source 'nope'"),
        ("modes: [sim, best]\n", "unknown selection mode 'best'"),
        ("data: {test_weights: {add2: 0, copy: 0}}\n", "some type a weight > 0"),
    ],
)
def test_a_bad_config_is_refused_with_the_reason(tmp_path, text, message):
    import yaml

    base = yaml.safe_load(SMOKE.read_text())
    for key, value in yaml.safe_load(text).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key].update(value)
        else:
            base[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base))
    result = invoke(*QUALITY, "--config", str(path), "--results", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_the_regime_configs_load_with_every_mode_and_three_seeds():
    noisy, imbalance, low_utility = (
        load_config(ROOT / "benchmarks" / "quality" / f"{name}.yaml") for name in ("noisy_rewards", "imbalance", "low_utility")
    )
    for config in (noisy, imbalance, low_utility):
        assert set(config["modes"]) >= {"sim", "dot", "align", "accgreedy", "rand"}
        assert len(config["seeds"]) >= 3
        assert config["model"] == noisy["model"]
    assert 0.3 <= noisy["data"]["noise"]["rate"] <= 0.5
    assert imbalance["data"]["track"]["types"] == ["sub"] and low_utility["data"]["track"]["label"] == "useless"
    # noisy rewards and low utility share one cached warm-started model per seed
    assert noisy["warm_start"] == low_utility["warm_start"]


def _flag_round(index: int, pids, scores, accuracy, zero, noisy, fallback=None) -> dict:
    cols = {"problem_id": pids, "score": scores, "accuracy": accuracy, "zero_advantage": zero, "noisy": noisy,
            "data_source": ["arith_inverted" if n else "arith" for n in noisy]}
    return {"round": index, "fallback": fallback, "candidates": cols}


FLAG_RUN = {
    "mode": "sim", "seed": 0,
    "rounds": [
        _flag_round(1, ["a", "b", "c", "d"], [-0.3, 0.2, -0.1, 0.0], [0.25, 0.5, 0.0, 1.0], [False, False, False, True], [True, False, False, True]),
        _flag_round(2, ["x"], [-0.9], [0.5], [False], [True], fallback="the validation gradient is zero"),  # random scores: left out
        _flag_round(3, ["a", "e", "f"], [-0.2, -0.4, 0.3], [0.25, 0.5, 0.5], [False, False, False], [True, True, False]),
    ],
}


def test_flag_precision_and_recall_per_round_and_cumulative():
    from gradalign_tools.bench.quality.flags import run_flag_figures

    first, third = run_flag_figures(FLAG_RUN, "cosine", 0.0, min_rounds=2)
    # round 1: flags a (-0.3) and c (-0.1); d has zero advantage; noisy a, d
    assert (first["round"], first["flagged"], first["true_flags"], first["noisy"]) == (1, 2, 1, 2)
    assert (first["precision"], first["recall"], first["cum_precision"], first["cum_recall"]) == (0.5, 0.5, 0.5, 0.5)
    # round 3: flags a and e, both noisy; cumulative: {a, c, e} flagged against {a, d, e} noisy; a flagged twice
    assert (third["round"], third["precision"], third["recall"]) == (3, 1.0, 1.0)
    assert (third["cum_flagged"], third["cum_true_flags"], third["cum_noisy"]) == (3, 2, 3)
    assert third["cum_precision"] == pytest.approx(2 / 3) and third["cum_recall"] == pytest.approx(2 / 3)
    assert (third["cum_suspects"], third["cum_true_suspects"]) == (1, 1)
    # the pass-rate heuristic: c (accuracy 0) in round 1, nothing in round 3
    first, third = run_flag_figures(FLAG_RUN, "pass_rate", 0.0)
    assert (first["flagged"], first["precision"], first["recall"]) == (1, 0.0, 0.0)
    assert third["flagged"] == 0 and math.isnan(third["precision"]) and third["recall"] == 0.0 and third["cum_precision"] == 0.0


def test_flag_figures_need_recorded_candidates_and_a_validation_gradient():
    from gradalign_tools.bench.quality.flags import flag_rows, flag_table, run_flag_figures

    assert run_flag_figures({**FLAG_RUN, "mode": "rand"}, "cosine", 0.0) is None  # no cosine in rand
    assert run_flag_figures({**FLAG_RUN, "mode": "rand"}, "pass_rate", 0.0) is not None
    old = {**FLAG_RUN, "rounds": [{k: v for k, v in r.items() if k != "candidates"} for r in FLAG_RUN["rounds"]]}
    assert run_flag_figures(old, "cosine", 0.0) is None  # a run written before candidates were recorded
    rows = flag_rows({("sim", 0): FLAG_RUN, ("sim", 1): old}, ["sim"], [0, 1], [("cosine", None), ("pass_rate", 0.25)])
    assert [(r["seed"], r["rule"], r["round"]) for r in rows] == [(0, "cosine@0", 1), (0, "cosine@0", 3), (0, "pass_rate@0.25", 1), (0, "pass_rate@0.25", 3)]
    table = flag_table(rows)
    assert "| sim | cosine@0 | 1 | 67 | 67 | 75 | 75 | 3.0 of 3 noisy | 100 | 33 | 1.0 |" in table
    clean = [{**r, "cum_noisy": 0} for r in rows]
    assert flag_table(clean) == []  # no noisy problems to find: no section


def test_flags_offline_command(smoke_results, tmp_path):
    import shutil

    results, _ = smoke_results
    copy = tmp_path / "copy"
    shutil.copytree(results / "runs", copy / "runs")
    out = invoke_ok("bench", "quality-flags", "--results", str(copy), "--rules", "cosine@-0.1,pass_rate")
    assert "| sim | cosine@-0.1 |" in out and "| rand | pass_rate@0 |" in out
    with (copy / "flags.csv").open() as fh:
        assert {r["rule"] for r in csv.DictReader(fh)} == {"cosine@-0.1", "pass_rate@0"}
    bad = invoke("bench", "quality-flags", "--results", str(copy), "--rules", "cosine@7")
    assert bad.exit_code == 2 and "threshold of rule 'cosine'" in bad.output
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    assert invoke("bench", "quality-flags", "--results", str(empty)).exit_code == 1
