"""Skipping dead problems in `gradalign bench quality` (issue 18, after GRESO): a regime with and without
skipping, over the same seeds, and what skipping bought.

`gradalign bench quality --config FILE --results DIR --skip-dead both` runs every mode x seed twice through the
same loop (gradalign_tools.bench.quality.run, whose chunks come from gradalign_common.round_policy.draw_chunk,
the scheduler's own function): loop.skip_dead.enabled false into DIR/no-skip, true into DIR/skip (each a normal
results folder: runs/, summary.md, plots), seed by seed so that an interrupted comparison keeps its pairs, and
then writes DIR/skipping.csv (one row per mode and seed) and DIR/skipping.md (per mode, paired by seed).

What is measured per run (from the run records):
- generated tokens: the sum of the response lengths of the candidates' rollouts (rollout_train), every round;
- zero-advantage tokens: those of them spent on groups that came out zero-advantage (no gradient, no GRPO signal);
- final greedy test accuracy (points) and generated tokens per point of it;
- candidates skipped, and rollouts saved = skipped x n_samples_train.

A skipped problem's place in the chunk is filled from the pool (the chunk keeps chunk_size candidates), so the
tokens generated per round are about the same with and without skipping: what skipping changes is how many of
them go to dead groups, and (through that) the accuracy those tokens buy.

The shipped regimes walk their pool exactly once (8 rounds x 128 = 1024), where nothing can be skipped; the
configs under benchmarks/quality/skip/ use a smaller pool that the rounds walk 2.7 times.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

from gradalign_common.artifacts import atomic_write_bytes
from gradalign_tools.bench.quality.benchmark import RunScope, run_benchmark
from gradalign_tools.bench.quality.stats import mean, std

SKIP_COLUMNS = [
    "mode", "seed", "tokens_off", "tokens_on", "tokens_change_pct", "zero_adv_tokens_off", "zero_adv_tokens_on",
    "accuracy_off", "accuracy_on", "accuracy_diff", "tokens_per_point_off", "tokens_per_point_on", "skipped",
    "rollouts_saved", "wall_seconds_off", "wall_seconds_on",
]
VARIANTS = {False: "no-skip", True: "skip"}


def with_skip(config: dict, enabled: bool) -> dict:
    """The config with loop.skip_dead.enabled set (base and cap as the config gives them)."""
    out = copy.deepcopy(config)
    out["loop"]["skip_dead"]["enabled"] = enabled
    return out


def variant_dir(results: Path, enabled: bool) -> Path:
    return results / VARIANTS[enabled]


def _tokens_per_point(tokens: float, accuracy_points: float) -> float | None:
    return tokens / accuracy_points if accuracy_points > 0 else None


def skip_rows(
    off: Mapping[tuple[str, int], dict], on: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int],
    n_samples_train: int,
) -> list[dict]:
    """One row per (mode, seed) that has both runs: the pair's tokens, accuracy and skips. Pure."""
    rows = []
    for mode in modes:
        for seed in seeds:
            a, b = off.get((mode, seed)), on.get((mode, seed))
            if a is None or b is None or "rollout_tokens" not in a or "rollout_tokens" not in b:
                continue
            acc_off, acc_on = 100 * a["accuracy"][-1], 100 * b["accuracy"][-1]
            rows.append({
                "mode": mode,
                "seed": seed,
                "tokens_off": a["rollout_tokens"],
                "tokens_on": b["rollout_tokens"],
                "tokens_change_pct": 100 * (b["rollout_tokens"] - a["rollout_tokens"]) / a["rollout_tokens"],
                "zero_adv_tokens_off": a["zero_advantage_tokens"],
                "zero_adv_tokens_on": b["zero_advantage_tokens"],
                "accuracy_off": acc_off,
                "accuracy_on": acc_on,
                "accuracy_diff": acc_on - acc_off,
                "tokens_per_point_off": _tokens_per_point(a["rollout_tokens"], acc_off),
                "tokens_per_point_on": _tokens_per_point(b["rollout_tokens"], acc_on),
                "skipped": b["skipped"],
                "rollouts_saved": b["skipped"] * n_samples_train,
                "wall_seconds_off": a["wall_seconds"],
                "wall_seconds_on": b["wall_seconds"],
            })
    return rows


def _ms(xs: Sequence[float | None], digits: int = 1) -> str:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    if not vals:
        return "—"
    return f"{mean(vals):.{digits}f} ± {std(vals):.{digits}f}" if len(vals) > 1 else f"{vals[0]:.{digits}f}"


def skip_markdown(config: dict, rows: Sequence[dict]) -> list[str]:
    """Per mode, paired by seed: tokens, zero-advantage share, accuracy, tokens per point, skips."""
    skip = config["loop"]["skip_dead"]
    loop, pool = config["loop"], config["data"]["pool_size"]
    walked = loop["rounds"] * loop["chunk_size"] / pool
    lines = [
        f"## Skipping dead problems: {config['name']}",
        "",
        f"{loop['rounds']} rounds x {loop['chunk_size']} candidates x {loop['n_samples_train']} samples over a pool of {pool} "
        f"(walked {walked:.2f} times); skip probability min({skip['cap']}, 1 - (1 - {skip['base']})^streak). "
        "Generated tokens: the candidates' rollouts (every round). Accuracy: final greedy test accuracy, points. "
        "Mean ± std over seeds; differences paired by seed (same warm start, same pool, same test set).",
        "",
        "| mode | seeds | tokens off | tokens on | zero-adv. tokens off | zero-adv. tokens on | accuracy off | accuracy on "
        "| on − off per seed | on ahead | tokens/point off | tokens/point on | skipped | rollouts saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        diffs = [r["accuracy_diff"] for r in rs]
        per_seed = " ".join(f"{d:+.1f}" for d in diffs)
        zero_share = lambda key, tot: _ms([100 * r[key] / r[tot] for r in rs])  # noqa: E731
        lines.append(
            f"| {mode} | {len(rs)} | {_ms([r['tokens_off'] for r in rs], 0)} | {_ms([r['tokens_on'] for r in rs], 0)} "
            f"| {zero_share('zero_adv_tokens_off', 'tokens_off')}% | {zero_share('zero_adv_tokens_on', 'tokens_on')}% "
            f"| {_ms([r['accuracy_off'] for r in rs])} | {_ms([r['accuracy_on'] for r in rs])} "
            f"| {per_seed} (mean {mean(diffs):+.1f}) | {sum(d > 0 for d in diffs)}/{len(rs)} "
            f"| {_ms([r['tokens_per_point_off'] for r in rs], 0)} | {_ms([r['tokens_per_point_on'] for r in rs], 0)} "
            f"| {_ms([r['skipped'] for r in rs], 0)} | {_ms([r['rollouts_saved'] for r in rs], 0)} |"
        )
    lines += ["", "Per seed (skipping.csv):", "",
              "| mode | seed | tokens off / on | zero-adv. tokens off / on | accuracy off / on | tokens/point off / on | skipped | rollouts saved |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tpp = " / ".join("—" if x is None else f"{x:.0f}" for x in (r["tokens_per_point_off"], r["tokens_per_point_on"]))
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['tokens_off']} / {r['tokens_on']} | {r['zero_adv_tokens_off']} / {r['zero_adv_tokens_on']} "
            f"| {r['accuracy_off']:.1f} / {r['accuracy_on']:.1f} | {tpp} | {r['skipped']} | {r['rollouts_saved']} |"
        )
    return lines


def write_skip_report(config: dict, results: Path, rows: Sequence[dict]) -> None:
    from gradalign_tools.bench.quality.report import csv_bytes

    atomic_write_bytes(results / "skipping.csv", csv_bytes(SKIP_COLUMNS, rows))
    atomic_write_bytes(results / "skipping.md", ("\n".join(skip_markdown(config, rows)) + "\n").encode())


def run_skip_comparison(config: dict, results: Path, scope: RunScope = RunScope()) -> list[dict]:
    """Every mode x seed of `scope` without and with skipping (resumable: finished runs are reused); the paired report."""
    seeds, modes = scope.runs(config)
    results.mkdir(parents=True, exist_ok=True)
    scope = dataclasses.replace(scope, modes=modes, model_cache=scope.cache(results))
    runs: dict[bool, dict] = {False: {}, True: {}}
    n = config["loop"]["n_samples_train"]
    for seed in seeds:  # seed by seed: an interrupted comparison still has whole pairs, and a report of them
        for enabled in (False, True):
            one_seed = dataclasses.replace(scope, seeds=[seed])
            runs[enabled].update(run_benchmark(with_skip(config, enabled), variant_dir(results, enabled), one_seed))
        write_skip_report(config, results, skip_rows(runs[False], runs[True], modes, seeds, n))
    for enabled in (False, True):  # each variant's summary over every seed
        every_seed = dataclasses.replace(scope, seeds=seeds, progress=False)
        run_benchmark(with_skip(config, enabled), variant_dir(results, enabled), every_seed)
    rows = skip_rows(runs[False], runs[True], modes, seeds, n)
    write_skip_report(config, results, rows)
    return rows
