"""The quality sweep's tables: every variant x mode, final test accuracy paired against a baseline seed by seed,
and the recommended default against every other mode; with a paired t-test and a sign test. Pure functions of
the run records (`gradalign bench quality-sweep` writes them as summary.json, summary.csv and summary.md).

Significance is the two-sided paired t-test on the per-seed differences of final test accuracy, at
ALPHA = 0.05 and without correction for the number of comparisons. The sign test (two-sided, ties dropped) is
shown beside it; with 5 seeds it cannot go below p = 0.0625, so on its own it can never call a difference
significant at 0.05 - it says how consistent a difference is, the t-test how large against its spread.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from gradalign_tools.bench.quality.stats import mean, std

ALPHA = 0.05


# ---- statistics -------------------------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def paired_t(diffs: Sequence[float]) -> tuple[float, float] | tuple[None, None]:
    """(t, two-sided p) of the paired t-test that the mean difference is 0; (None, None) with fewer than 2
    differences. All differences equal: p = 1 when they are 0, else 0 (t infinite)."""
    n = len(diffs)
    if n < 2:
        return None, None
    m, s = mean(diffs), std(diffs)
    if s == 0.0:
        return (0.0, 1.0) if m == 0.0 else (math.copysign(math.inf, m), 0.0)
    t = m / (s / math.sqrt(n))
    return t, t_two_sided_p(t, n - 1)


def sign_test_p(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test (binomial, p = 1/2), ties (differences of 0) dropped; 1 when nothing is left."""
    pos = sum(d > 0 for d in diffs)
    neg = sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


def verdict(diff_mean: float, p: float | None) -> str:
    """'ahead', 'behind' (two-sided paired t-test p < ALPHA) or 'n.s.'."""
    if p is None or p >= ALPHA:
        return "n.s."
    return "ahead" if diff_mean > 0 else "behind"


# ---- the summary -----------------------------------------------------------------------------------------


def _final(run: Mapping) -> float:
    return float(run["accuracy"][-1])


def _val_over_rounds(run: Mapping) -> float:
    """Greedy validation accuracy averaged over rounds 1..R (what development choices read, never the test set)."""
    return mean(run["val_accuracy"][1:])


def paired(runs: Mapping[tuple[str, int], Mapping], mode: str, other: str, seeds: Sequence[int]) -> dict | None:
    """`mode` against `other` on the seeds both finished: per-seed differences of final test accuracy (points),
    their mean and std, seeds ahead / behind, the paired t-test and the sign test; None without common seeds."""
    common = [s for s in seeds if (mode, s) in runs and (other, s) in runs]
    if not common:
        return None
    diffs = [100.0 * (_final(runs[(mode, s)]) - _final(runs[(other, s)])) for s in common]
    t, p = paired_t(diffs)
    return {
        "mode": mode,
        "against": other,
        "seeds": common,
        "diffs": [round(d, 4) for d in diffs],
        "mean": mean(diffs),
        "std": std(diffs),
        "ahead": sum(d > 0 for d in diffs),
        "behind": sum(d < 0 for d in diffs),
        "n": len(diffs),
        "t": t,
        "t_p": p,
        "sign_p": sign_test_p(diffs),
        "verdict": verdict(mean(diffs), p),
    }


def variant_summary(name: str, runs: Mapping[tuple[str, int], Mapping], modes: Sequence[str], seeds: Sequence[int],
                    baseline: str, default: str | None) -> dict:
    """One variant: per mode its final test accuracy (%) over seeds, validation accuracy over rounds, the tracked
    fraction selected; each mode against the baseline; the default against every other mode."""
    per_mode = {}
    for mode in modes:
        rs = [runs[(mode, s)] for s in seeds if (mode, s) in runs]
        if not rs:
            continue
        finals = [100.0 * _final(r) for r in rs]
        per_mode[mode] = {
            "n": len(rs),
            "seeds": [r["seed"] for r in rs],
            "final": finals,
            "final_mean": mean(finals),
            "final_std": std(finals),
            "initial_mean": 100.0 * mean([r["accuracy"][0] for r in rs]),
            "val_over_rounds_mean": 100.0 * mean([_val_over_rounds(r) for r in rs]),
            "tracked_label": rs[0].get("tracked_label"),
            "tracked_fraction_mean": 100.0 * mean([mean(r["tracked_fraction"]) for r in rs]),
            "fallback_rounds": sum(1 for r in rs for x in r.get("rounds", ()) if x.get("fallback")),
            "wall_seconds_mean": mean([r.get("wall_seconds", 0.0) for r in rs]),
        }
    vs_baseline = {m: p for m in modes if m != baseline and (p := paired(runs, m, baseline, seeds))}
    vs_default = {}
    if default is not None:
        vs_default = {m: p for m in modes if m != default and (p := paired(runs, default, m, seeds))}
    return {"variant": name, "modes": per_mode, "vs_baseline": vs_baseline, "vs_default": vs_default}


def pooled(variants: Sequence[dict], key: str) -> dict[str, dict]:
    """Every (variant, seed) difference of `key` ('vs_baseline' or 'vs_default') pooled per mode: the mean, how many
    ahead, the paired t-test and sign test over all of them. The pairs are not independent across variants of one
    model block (they share the warm-started model of a seed); read it as a summary, not as a stronger test."""
    out: dict[str, dict] = {}
    modes = list(dict.fromkeys(m for v in variants for m in v[key]))
    for mode in modes:
        diffs = [d for v in variants if mode in v[key] for d in v[key][mode]["diffs"]]
        first = next(v[key][mode] for v in variants if mode in v[key])
        t, p = paired_t(diffs)
        out[mode] = {
            "mode": first["mode"], "against": first["against"], "n": len(diffs), "mean": mean(diffs), "std": std(diffs),
            "ahead": sum(d > 0 for d in diffs), "behind": sum(d < 0 for d in diffs), "t": t, "t_p": p,
            "sign_p": sign_test_p(diffs), "verdict": verdict(mean(diffs), p),
            "variants_behind": [v["variant"] for v in variants if mode in v[key] and v[key][mode]["verdict"] == "behind"],
            "variants_ahead": [v["variant"] for v in variants if mode in v[key] and v[key][mode]["verdict"] == "ahead"],
        }
    return out


def sweep_summary(manifest: Mapping[str, Any], runs_by_variant: Mapping[str, Mapping[tuple[str, int], Mapping]]) -> dict:
    """The whole sweep: per variant (variant_summary), pooled comparisons, and the validation ranking of the modes
    (mean over variants and seeds of validation accuracy over rounds: what a development choice may read)."""
    modes, seeds = list(manifest["modes"]), list(manifest["seeds"])
    baseline, default = manifest["baseline"], manifest.get("default")
    variants = [
        variant_summary(name, runs_by_variant.get(name, {}), modes, seeds, baseline, default) for name in manifest["variant_names"]
    ]
    val_rank = {}
    for mode in modes:
        vals = [v["modes"][mode]["val_over_rounds_mean"] for v in variants if mode in v["modes"]]
        if vals:
            val_rank[mode] = {"mean": mean(vals), "per_variant": {v["variant"]: v["modes"][mode]["val_over_rounds_mean"]
                                                                   for v in variants if mode in v["modes"]}}
    expected = len(manifest["variant_names"]) * len(modes) * len(seeds)
    finished = sum(v["modes"][m]["n"] for v in variants for m in v["modes"])
    return {
        "name": manifest["name"],
        "modes": modes,
        "seeds": seeds,
        "baseline": baseline,
        "default": default,
        "alpha": ALPHA,
        "test": "two-sided paired t-test on per-seed differences of final test accuracy (points); sign test beside it",
        "runs_expected": expected,
        "runs_finished": finished,
        "variants": variants,
        "pooled_vs_baseline": pooled(variants, "vs_baseline"),
        "pooled_vs_default": pooled(variants, "vs_default") if default else {},
        "val_ranking": val_rank,
    }


# ---- markdown and csv ------------------------------------------------------------------------------------


def _paired_row(variant: str, mode: str, vs: dict) -> str:
    """One markdown row of a paired comparison: per-seed differences, mean ± std, ahead, both p-values, verdict."""
    return (f"| {variant} | {mode} | {', '.join(_signed(d) for d in vs['diffs'])} | {_signed(vs['mean'])} ± "
            f"{vs['std']:.1f} | {vs['ahead']}/{vs['n']} | {_p(vs['t_p'])} | {_p(vs['sign_p'])} | {vs['verdict']} |")


def _signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", "−")


def _p(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def _cell(pm: Mapping, vs: Mapping | None, bold: bool) -> str:
    acc = f"{pm['final_mean']:.1f} ± {pm['final_std']:.1f}"
    if bold:
        acc = f"**{acc}**"
    if vs is None:
        return acc
    mark = {"ahead": " ▲", "behind": " ▼"}.get(vs["verdict"], "")
    return f"{acc}; {_signed(vs['mean'])}, {vs['ahead']}/{vs['n']}{mark}"


def markdown(summary: Mapping[str, Any], command: str | None = None) -> str:
    modes, baseline, default = summary["modes"], summary["baseline"], summary["default"]
    lines = [f"# Selection-quality sweep: {summary['name']}", ""]
    if command:
        lines += ["```sh", command, "```", ""]
    lines += [
        f"{summary['runs_finished']} of {summary['runs_expected']} runs finished; seeds {', '.join(map(str, summary['seeds']))}.",
        "",
        f"Final held-out test accuracy (%), mean ± std over seeds; then each mode − {baseline} paired by seed (points, "
        f"mean) and on how many seeds it ended ahead. ▲/▼: ahead/behind {baseline} by a two-sided paired t-test at "
        f"p < {summary['alpha']} (no correction for the number of comparisons). Bold: the highest mean of the row.",
        "",
        "| variant | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for v in summary["variants"]:
        present = [m for m in modes if m in v["modes"]]
        best = max(present, key=lambda m: v["modes"][m]["final_mean"]) if present else None
        cells = [
            _cell(v["modes"][m], v["vs_baseline"].get(m), m == best) if m in v["modes"] else "–" for m in modes
        ]
        lines.append(f"| {v['variant']} | " + " | ".join(cells) + " |")
    lines += ["", f"Each mode − {baseline}, seed by seed:", "",
              "| variant | mode | per seed (points) | mean ± std | ahead | t-test p | sign-test p | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for v in summary["variants"]:
        lines += [_paired_row(v["variant"], m, vs) for m, vs in v["vs_baseline"].items()]
    if default:
        lines += ["", f"The default `{default}` − each other mode, seed by seed (negative: `{default}` behind):", "",
                  "| variant | against | per seed (points) | mean ± std | default ahead | t-test p | sign-test p | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in summary["variants"]:
            lines += [_paired_row(v["variant"], m, vs) for m, vs in v["vs_default"].items()]
    for key, title in (("pooled_vs_baseline", f"each mode − {baseline}"), ("pooled_vs_default", f"`{default}` − each other mode")):
        rows = summary.get(key) or {}
        if not rows:
            continue
        lines += ["", f"Pooled over every variant and seed ({title}; the pairs share warm-started models, so read it as a "
                      "summary, not a stronger test):", "",
                  "| comparison | pairs | mean ± std | ahead | t-test p | sign-test p | significantly behind in | significantly ahead in |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows.values():
            lines.append(
                f"| {r['mode']} − {r['against']} | {r['n']} | {_signed(r['mean'])} ± {r['std']:.1f} | {r['ahead']}/{r['n']} | "
                f"{_p(r['t_p'])} | {_p(r['sign_p'])} | {', '.join(r['variants_behind']) or 'none'} | "
                f"{', '.join(r['variants_ahead']) or 'none'} |"
            )
    if summary["val_ranking"]:
        lines += ["", "Validation accuracy (greedy, %, over rounds 1..R, mean over seeds; biased for the modes that select "
                      "by the validation set - for choices between settings, never between sim and rand):", "",
                  "| mode | mean over variants | " + " | ".join(v["variant"] for v in summary["variants"]) + " |",
                  "|---|---|" + "---|" * len(summary["variants"])]
        for m, r in summary["val_ranking"].items():
            lines.append(f"| {m} | {r['mean']:.1f} | " + " | ".join(
                f"{r['per_variant'][v['variant']]:.1f}" if v["variant"] in r["per_variant"] else "–" for v in summary["variants"]) + " |")
    lines += ["", "Selected fraction of each variant's tracked problems (%, mean over seeds and rounds):", "",
              "| variant | tracked | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for v in summary["variants"]:
        label = next((pm["tracked_label"] for pm in v["modes"].values()), "")
        lines.append(f"| {v['variant']} | {label} | " + " | ".join(
            f"{v['modes'][m]['tracked_fraction_mean']:.1f}" if m in v["modes"] else "–" for m in modes) + " |")
    fallbacks = sum(pm["fallback_rounds"] for v in summary["variants"] for pm in v["modes"].values())
    lines += ["", f"Rounds that fell back to random order (zero validation gradient): {fallbacks}.", ""]
    return "\n".join(lines)


CSV_COLUMNS = (
    "variant", "mode", "n_seeds", "final_mean", "final_std", "val_over_rounds_mean", "tracked_fraction_mean",
    "vs_baseline_diffs", "vs_baseline_mean", "vs_baseline_std", "vs_baseline_ahead", "vs_baseline_t_p", "vs_baseline_sign_p",
    "vs_baseline_verdict", "default_minus_this_mean", "default_minus_this_ahead", "default_minus_this_t_p", "default_minus_this_verdict",
)


def csv_rows(summary: Mapping[str, Any]) -> list[dict]:
    rows = []
    for v in summary["variants"]:
        for m, pm in v["modes"].items():
            vs, vd = v["vs_baseline"].get(m), v["vs_default"].get(m)
            rows.append({
                "variant": v["variant"], "mode": m, "n_seeds": pm["n"], "final_mean": round(pm["final_mean"], 3),
                "final_std": round(pm["final_std"], 3), "val_over_rounds_mean": round(pm["val_over_rounds_mean"], 3),
                "tracked_fraction_mean": round(pm["tracked_fraction_mean"], 3),
                "vs_baseline_diffs": " ".join(f"{d:+.2f}" for d in vs["diffs"]) if vs else "",
                "vs_baseline_mean": round(vs["mean"], 3) if vs else "", "vs_baseline_std": round(vs["std"], 3) if vs else "",
                "vs_baseline_ahead": vs["ahead"] if vs else "", "vs_baseline_t_p": _p(vs["t_p"]) if vs else "",
                "vs_baseline_sign_p": _p(vs["sign_p"]) if vs else "", "vs_baseline_verdict": vs["verdict"] if vs else "",
                "default_minus_this_mean": round(vd["mean"], 3) if vd else "", "default_minus_this_ahead": vd["ahead"] if vd else "",
                "default_minus_this_t_p": _p(vd["t_p"]) if vd else "", "default_minus_this_verdict": vd["verdict"] if vd else "",
            })
    return rows
