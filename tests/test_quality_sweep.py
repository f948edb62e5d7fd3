"""`gradalign bench quality-sweep` on the smoke manifest (benchmarks/quality/sweep_smoke.yaml): the summary's shape,
its paired differences recomputed from the run files, resuming; the paired statistics on known values; the
manifest's checks; the coin-flip reward the sweep added. The ranking of the modes is never asserted here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from gradalign_common.errors import InvalidInputError
from gradalign_tools.bench import noisy_rewards
from gradalign_tools.bench.quality.sweep import load_manifest, narrow
from gradalign_tools.bench.quality.sweep_report import markdown, paired_t, sign_test_p, sweep_summary, t_two_sided_p

from cli_helpers import invoke_ok, run_bench

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "benchmarks" / "quality" / "sweep_smoke.yaml"
VARIANTS = ["smoke", "smoke_coinflip"]
MODES = ["sim", "simgate", "rand"]
SEEDS = [0, 1]
SWEEP = ("bench", "quality-sweep")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    return run_bench(tmp_path_factory.mktemp("sweep") / "smoke", *SWEEP, "--manifest", str(SMOKE))


def test_the_smoke_sweep_writes_every_run_and_a_paired_summary(sweep):
    results, output = sweep
    assert "2 variants x 3 modes x 2 seeds; 0 runs already finished" in output and "12 to run" in output
    summary = json.loads((results / "summary.json").read_text())
    assert summary["runs_expected"] == summary["runs_finished"] == 12 and summary["failures"] == []
    assert summary["baseline"] == "rand" and summary["default"] == "simgate" and summary["workers"] == 2
    assert [v["variant"] for v in summary["variants"]] == VARIANTS
    for v in summary["variants"]:
        runs = {
            (m, s): json.loads((results / v["variant"] / "runs" / f"{m}-seed{s}.json").read_text()) for m in MODES for s in SEEDS
        }
        assert list(v["modes"]) == MODES
        for m in MODES:
            finals = [100 * runs[(m, s)]["accuracy"][-1] for s in SEEDS]
            assert v["modes"][m]["n"] == 2 and v["modes"][m]["final_mean"] == pytest.approx(sum(finals) / 2)
        assert set(v["vs_baseline"]) == {"sim", "simgate"} and set(v["vs_default"]) == {"sim", "rand"}
        for m, p in v["vs_baseline"].items():
            expected = [100 * (runs[(m, s)]["accuracy"][-1] - runs[("rand", s)]["accuracy"][-1]) for s in SEEDS]
            assert p["against"] == "rand" and p["seeds"] == SEEDS and p["diffs"] == pytest.approx(expected, abs=1e-3)
            assert p["ahead"] == sum(d > 0 for d in expected) and p["behind"] == sum(d < 0 for d in expected)
            assert p["verdict"] in {"ahead", "behind", "n.s."} and 0.0 <= p["sign_p"] <= 1.0
        for m, p in v["vs_default"].items():
            expected = [100 * (runs[("simgate", s)]["accuracy"][-1] - runs[(m, s)]["accuracy"][-1]) for s in SEEDS]
            assert p["mode"] == "simgate" and p["against"] == m and p["diffs"] == pytest.approx(expected, abs=1e-3)
        # each variant also gets `bench quality`'s own report
        assert (results / v["variant"] / "summary.md").is_file()
    assert summary["pooled_vs_baseline"]["sim"]["n"] == 4 and summary["pooled_vs_default"]["rand"]["n"] == 4

    md = (results / "summary.md").read_text()
    assert md.startswith("# Selection-quality sweep: sweep_smoke")
    assert "| variant | sim | simgate | rand |" in md
    assert sum(line.startswith("| smoke") for line in md.splitlines()) >= 2 + 4 + 4  # table, vs rand, vs default
    with (results / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["variant"], r["mode"]) for r in rows] == [(v, m) for v in VARIANTS for m in MODES]
    assert all(r["vs_baseline_verdict"] == "" for r in rows if r["mode"] == "rand")
    # both variants share one model block: one warm start per seed
    assert len([p for p in (results / "models").iterdir() if not p.name.startswith(".")]) == len(SEEDS)


def test_a_rerun_resumes(sweep):
    results, _ = sweep
    (results / "smoke_coinflip" / "runs" / "sim-seed1.json").unlink()
    (results / "smoke" / "runs" / "rand-seed0.json").write_text("{broken")
    output = invoke_ok(*SWEEP, "--manifest", str(SMOKE), "--results", str(results), "--workers", "1")
    assert "10 runs already finished" in output and "2 to run and 0 warm starts" in output
    assert json.loads((results / "summary.json").read_text())["runs_finished"] == 12
    # --report-only: the summary of what is finished, nothing run
    (results / "smoke" / "runs" / "simgate-seed1.json").unlink()
    output = invoke_ok(*SWEEP, "--manifest", str(SMOKE), "--results", str(results), "--report-only")
    assert "1 missing tasks not run" in output and "11 runs already finished" in output
    summary = json.loads((results / "summary.json").read_text())
    assert summary["runs_finished"] == 11 and summary["variants"][0]["vs_baseline"]["simgate"]["seeds"] == [0]
    assert not (results / "smoke" / "runs" / "simgate-seed1.json").exists()


def test_paired_statistics_on_known_values():
    # t = 3 / (sqrt(2.5) / sqrt(5)) = 4.2426, df 4: p = 0.01324 (two-sided)
    t, p = paired_t([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t == pytest.approx(4.242641, rel=1e-6) and p == pytest.approx(0.013236, abs=1e-5)
    assert t_two_sided_p(2.776445, 4) == pytest.approx(0.05, abs=1e-5)  # the 97.5% quantile of t(4)
    assert t_two_sided_p(12.7062, 1) == pytest.approx(0.05, abs=1e-4)
    assert t_two_sided_p(0.0, 4) == pytest.approx(1.0)
    assert paired_t([-1.0, -2.0, -3.0, -4.0, -5.0])[1] == pytest.approx(p)
    assert paired_t([2.0, 2.0, 2.0]) == (math.inf, 0.0) and paired_t([0.0, 0.0]) == (0.0, 1.0) and paired_t([1.0]) == (None, None)
    assert sign_test_p([1, 2, 3, 4, 5]) == pytest.approx(0.0625)  # 5 of 5: the smallest p 5 seeds can give
    assert sign_test_p([1, -1, 1, 1, 0]) == pytest.approx(0.625)  # tie dropped: 3 of 4
    assert sign_test_p([0, 0]) == 1.0


def _fake(final: float, val: float = 0.5) -> dict:
    return {"accuracy": [0.5, final], "val_accuracy": [0.5, val], "tracked_fraction": [0.25], "tracked_label": "noisy",
            "seed": 0, "rounds": [{"fallback": None}], "wall_seconds": 1.0}


def test_the_summary_calls_a_consistent_loss_significant_and_a_noisy_one_not():
    seeds = [20, 21, 22, 23, 24]
    behind = {"simgate": [0.70, 0.72, 0.66, 0.81, 0.60], "accgreedy": [0.74, 0.75, 0.71, 0.84, 0.64],
              "rand": [0.70, 0.71, 0.69, 0.80, 0.62]}
    noisy = {"simgate": [0.70, 0.80, 0.60, 0.75, 0.65], "accgreedy": [0.75, 0.70, 0.66, 0.70, 0.70],
             "rand": [0.70, 0.70, 0.70, 0.70, 0.70]}
    runs = {}
    for name, table in (("a", behind), ("b", noisy)):
        runs[name] = {}
        for mode, finals in table.items():
            for s, f in zip(seeds, finals):
                run = _fake(f)
                run["seed"] = s
                runs[name][(mode, s)] = run
    manifest = {"name": "t", "modes": ["simgate", "accgreedy", "rand"], "seeds": seeds, "baseline": "rand",
                "default": "simgate", "variant_names": ["a", "b"]}
    summary = sweep_summary(manifest, runs)
    a, b = summary["variants"]
    vs = a["vs_default"]["accgreedy"]  # simgate - accgreedy: -4, -3, -5, -3, -4
    assert vs["diffs"] == pytest.approx([-4, -3, -5, -3, -4], abs=1e-6) and vs["ahead"] == 0 and vs["behind"] == 5
    assert vs["verdict"] == "behind" and vs["t_p"] < 0.001 and vs["sign_p"] == pytest.approx(0.0625)
    assert b["vs_default"]["accgreedy"]["verdict"] == "n.s."
    assert summary["pooled_vs_default"]["accgreedy"]["variants_behind"] == ["a"]
    assert summary["pooled_vs_default"]["accgreedy"]["n"] == 10
    assert a["vs_baseline"]["accgreedy"]["verdict"] == "ahead"
    md = markdown(summary)
    assert "| a | 69.8 ± 7.8; −0.6, 2/5 | **73.6 ± 7.2**; +3.2, 5/5 ▲ | 70.4 ± 6.4 |" in md


def test_manifest_checks(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "m.yaml"
        path.write_text(text)
        return path

    smoke = ROOT / "benchmarks" / "quality" / "smoke.yaml"
    ok = load_manifest(write(f"variants: [{smoke}]\nmodes: [sim, rand]\nseeds: [1]\n"))
    assert ok["variant_names"] == ["smoke"] and ok["baseline"] == "rand" and ok["workers"] == 2 and ok["name"] == "m"
    for text, match in (
        (f"variants: [{smoke}]\nmodes: [sim]\nseeds: [1]\n", "baseline 'rand' is not among the modes"),
        (f"variants: [{smoke}, {smoke}]\nmodes: [sim, rand]\nseeds: [1]\n", "two variants are named 'smoke'"),
        (f"variants: [{smoke}]\nmodes: [sim, rand, bogus]\nseeds: [1]\n", "unknown selection mode 'bogus'"),
        (f"variants: [{smoke}]\nmodes: [sim, rand]\nseeds: [1]\ndefault: dot\n", "default 'dot' is not among the modes"),
        (f"variants: [{smoke}]\nmodes: [sim, rand]\nseeds: [1]\nextra: 1\n", "extra"),
        ("variants: [nowhere.yaml]\nmodes: [sim, rand]\nseeds: [1]\n", "config file not found"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            load_manifest(write(text))
    narrowed = narrow(load_manifest(SMOKE), variants=["smoke_coinflip"], modes=["sim"], seeds=[1])
    assert narrowed["variant_names"] == ["smoke_coinflip"] and narrowed["modes"] == ["sim", "rand"] and narrowed["seeds"] == [1]
    assert narrowed["default"] is None  # simgate was narrowed away
    with pytest.raises(InvalidInputError, match="not in the manifest"):
        narrow(load_manifest(SMOKE), seeds=[7])


def test_the_shipped_sweep_manifests_load():
    for name in ("sweep.yaml", "sweep_dev.yaml", "sweep_smoke.yaml"):
        manifest = load_manifest(ROOT / "benchmarks" / "quality" / name)
        assert manifest["baseline"] in manifest["modes"]
    sweep = load_manifest(ROOT / "benchmarks" / "quality" / "sweep.yaml")
    assert len(sweep["variant_names"]) >= 6 and sweep["seeds"] == [20, 21, 22, 23, 24]
    assert {"sim", "accgreedy", "rand"} <= set(sweep["modes"])
    dev = load_manifest(ROOT / "benchmarks" / "quality" / "sweep_dev.yaml")
    assert not set(dev["seeds"]) & set(sweep["seeds"])  # development seeds never confirm


def test_the_coinflip_reward_is_fixed_per_answer_and_blind_to_correctness():
    flip = noisy_rewards.coinflip_reward
    right = [flip(str(a + b), str(a + b)) for a in range(10, 50) for b in range(10, 15)]
    assert set(right) == {0.0, 1.0} and 0.4 < sum(right) / len(right) < 0.6  # the right answer: a coin
    assert all(flip("57", "57") == flip(" 57 ", "57") for _ in range(3))  # fixed per (problem, answer)
    assert len({flip(str(x), "57") for x in range(40, 80)}) == 2  # other answers: coins too
    assert noisy_rewards.COINFLIP not in noisy_rewards.NOISY_DATA_SOURCES
