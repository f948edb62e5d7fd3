"""Suspect-reward flags measured: precision and recall against the problems the benchmark knows are noisy.

Each run records its rounds' candidates (`candidate_columns`: problem id, score, accuracy, zero
advantage, whether the problem's reward is noisy and its data source). From them, with the
product's own flag rules (gradalign_common.suspects), this module computes per round and
cumulatively (every problem flagged at least once in rounds 1..r, as the scheduler's API lists
"suspect" and "watch") how many candidates were flagged, how many of those are noisy (precision)
and how many of the noisy candidates seen were flagged (recall), beside the pass-rate heuristic
that peers use. Runs written before candidates were recorded have no such figures.

`flag_rows` gives the rows of flags.csv, `flag_table` the summary's section; `flags_command` is
`gradalign bench quality-flags`, which computes them offline from a results folder's runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from gradalign_common.suspects import CandidateSignal, alignment_of, flag_round, get_rule, status_of, unavailable_reason
from gradalign_tools.bench.quality.stats import mean, std

# (rule, threshold; None: the rule's default): the product's gradient rules, then the pass-rate baselines
REPORTED_RULES: tuple[tuple[str, float | None], ...] = (("cosine", None), ("robust_z", None), ("pass_rate", 0.0), ("pass_rate", 0.25))
MIN_ROUNDS = 2  # the scheduler's default: flagged in this many rounds makes a problem "suspect"


def candidate_columns(scores: Sequence, info: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
    """A round's scored candidates as columns (ScoreRecords in; what the flag figures need out)."""
    return {
        "problem_id": [s.problem_id for s in scores],
        "score": [float(s.score) for s in scores],
        "accuracy": [float(s.accuracy) for s in scores],
        "zero_advantage": [bool(s.zero_advantage) for s in scores],
        "noisy": [bool(info[s.problem_id]["noisy"]) for s in scores],
        "data_source": [str(info[s.problem_id]["data_source"]) for s in scores],
    }


def round_signals(round_record: Mapping[str, Any], mode: str) -> tuple[list[CandidateSignal], list[bool]] | None:
    """The round's candidates as the flag rules see them in `mode`, and which are noisy; None when the run did
    not record them or the round fell back to random scores (no cosines)."""
    cols = round_record.get("candidates")
    if not cols or round_record.get("fallback"):
        return None
    signals = [
        CandidateSignal(pid, alignment_of(mode, score, acc, zero), acc, zero)
        for pid, score, acc, zero in zip(cols["problem_id"], cols["score"], cols["accuracy"], cols["zero_advantage"])
    ]
    return signals, list(cols["noisy"])


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def run_flag_figures(run: Mapping[str, Any], rule: str, threshold: float | None, min_rounds: int = MIN_ROUNDS) -> list[dict] | None:
    """Per round r (1..R) of one run: the rule's flags in round r alone and cumulative over rounds 1..r, with
    precision and recall against the noisy problems; None when the rule does not apply to the run's mode
    or the run recorded no candidates."""
    if unavailable_reason(run["mode"], rule) is not None:
        return None
    out: list[dict] = []
    flag_count: dict[str, int] = {}
    noisy_seen: set[str] = set()
    recorded = False
    for r in run["rounds"]:
        got = round_signals(r, run["mode"])
        if got is None:
            continue
        recorded = True
        signals, noisy = got
        flags = flag_round(signals, rule, threshold)
        flagged = {f.problem_id for f in flags if f.flagged}
        noisy_ids = {s.problem_id for s, n in zip(signals, noisy) if n}
        for pid in flagged:
            flag_count[pid] = flag_count.get(pid, 0) + 1
        noisy_seen |= noisy_ids
        ever = set(flag_count)
        suspects = {pid for pid, n in flag_count.items() if status_of(n, min_rounds) == "suspect"}
        out.append({
            "round": r["round"],
            "candidates": len(signals),
            "flagged": len(flagged), "true_flags": len(flagged & noisy_ids), "noisy": len(noisy_ids),
            "precision": _ratio(len(flagged & noisy_ids), len(flagged)), "recall": _ratio(len(flagged & noisy_ids), len(noisy_ids)),
            "cum_flagged": len(ever), "cum_true_flags": len(ever & noisy_seen), "cum_noisy": len(noisy_seen),
            "cum_precision": _ratio(len(ever & noisy_seen), len(ever)), "cum_recall": _ratio(len(ever & noisy_seen), len(noisy_seen)),
            "cum_suspects": len(suspects), "cum_true_suspects": len(suspects & noisy_seen),
        })
    return out if recorded else None


def rule_label(rule: str, threshold: float | None) -> str:
    t = get_rule(rule).default_threshold if threshold is None else threshold
    return f"{rule}@{t:g}"


def flag_rows(
    runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int],
    rules: Sequence[tuple[str, float | None]] = REPORTED_RULES, min_rounds: int = MIN_ROUNDS,
) -> list[dict]:
    """flags.csv: one row per mode x seed x rule x round with the round's and the cumulative figures."""
    rows = []
    for mode in modes:
        for seed in seeds:
            run = runs.get((mode, seed))
            if run is None:
                continue
            for rule, threshold in rules:
                figures = run_flag_figures(run, rule, threshold, min_rounds)
                for f in figures or ():
                    rows.append({"mode": mode, "seed": seed, "rule": rule_label(rule, threshold), **f})
    return rows


FLAG_COLUMNS = (
    "mode", "seed", "rule", "round", "candidates", "flagged", "true_flags", "noisy", "precision", "recall",
    "cum_flagged", "cum_true_flags", "cum_noisy", "cum_precision", "cum_recall", "cum_suspects", "cum_true_suspects",
)


def _fmt(values: Sequence[float]) -> str:
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return "n/a"
    return f"{100 * mean(known):.0f} ± {100 * std(known):.0f}" if len(known) > 1 else f"{100 * known[0]:.0f}"


def flag_table(rows: Sequence[dict], min_rounds: int = MIN_ROUNDS) -> list[str]:
    """The summary's section (markdown lines): per mode and rule, over seeds (mean ± std, %), the cumulative
    precision and recall after the last round, the per-round precision and recall (mean over rounds and seeds),
    and how many problems a run flagged; empty when no row has noisy problems to find."""
    if not rows or not any(r["cum_noisy"] for r in rows):
        return []
    keys = list(dict.fromkeys((r["mode"], r["rule"]) for r in rows))
    lines = [
        f"Suspect-reward flags against the known noisy problems (gradalign_common.suspects; `gradalign bench "
        f"quality-flags` recomputes them): the gradient rules `cosine` and `robust_z` beside the pass-rate heuristic "
        f"`pass_rate` (accuracy at or below the threshold). Cumulative: every problem flagged in at least one of rounds "
        f"1..R (what the API lists as watch or suspect); precision = flagged problems that are noisy, recall = noisy "
        f"candidates flagged; %, mean ± std over seeds. Suspects: problems flagged in >= {min_rounds} rounds (a problem "
        f"recurs only when the rounds go through the pool more than once).",
        "",
        "| mode | rule | seeds | cumulative precision | cumulative recall | per-round precision | per-round recall | flagged per run "
        "| suspect precision | suspect recall | suspects per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, rule in keys:
        mine = [r for r in rows if r["mode"] == mode and r["rule"] == rule]
        seeds = list(dict.fromkeys(r["seed"] for r in mine))
        last = [max((r for r in mine if r["seed"] == s), key=lambda r: r["round"]) for s in seeds]
        per_round = {s: [r for r in mine if r["seed"] == s] for s in seeds}
        lines.append(
            f"| {mode} | {rule} | {len(seeds)} | {_fmt([r['cum_precision'] for r in last])} | "
            f"{_fmt([r['cum_recall'] for r in last])} | "
            f"{_fmt([mean([r['precision'] for r in per_round[s] if not math.isnan(r['precision'])] or [float('nan')]) for s in seeds])} | "
            f"{_fmt([mean([r['recall'] for r in per_round[s] if not math.isnan(r['recall'])] or [float('nan')]) for s in seeds])} | "
            f"{mean([r['cum_flagged'] for r in last]):.1f} of {mean([r['cum_noisy'] for r in last]):.0f} noisy | "
            f"{_fmt([_ratio(r['cum_true_suspects'], r['cum_suspects']) for r in last])} | "
            f"{_fmt([_ratio(r['cum_true_suspects'], r['cum_noisy']) for r in last])} | {mean([r['cum_suspects'] for r in last]):.1f} |"
        )
    return lines


def load_runs(results: Path) -> dict[tuple[str, int], dict]:
    """Every run record under results/runs, by (mode, seed); unreadable files are left out."""
    runs = {}
    for path in sorted((results / "runs").glob("*.json")):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(run, dict) and "mode" in run and "seed" in run and "rounds" in run:
            runs[(run["mode"], run["seed"])] = run
    return runs
