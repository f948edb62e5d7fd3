"""The benchmark's tables (summary.md, summary.csv, paired.csv) and plots."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence


from gradalign_common.artifacts import atomic_write_bytes
from gradalign_tools.bench.quality.flags import FLAG_COLUMNS, flag_rows, flag_table
from gradalign_tools.bench.quality.stats import mean, std


def summary_rows(runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    rows = []
    for mode in modes:
        rs = [runs[(mode, s)] for s in seeds if (mode, s) in runs]
        if not rs:
            continue
        finals = [r["accuracy"][-1] for r in rs]
        fractions = [mean(r["tracked_fraction"]) for r in rs]
        types = list(rs[0]["per_type_accuracy"][-1])
        row = {
            "mode": mode,
            "n_seeds": len(rs),
            "initial_mean": mean([r["accuracy"][0] for r in rs]),
            "final_mean": mean(finals),
            "final_std": std(finals),
            "val_final_mean": mean([r["val_accuracy"][-1] for r in rs]),
            **{f"final_seed{r['seed']}": r["accuracy"][-1] for r in rs},
            "tracked_label": rs[0]["tracked_label"],
            "selected_fraction_mean": mean(fractions),
            "selected_fraction_std": std(fractions),
            "chunk_fraction_mean": mean([mean(r["chunk_tracked_fraction"]) for r in rs]),
            **{f"final_{t}_mean": mean([r["per_type_accuracy"][-1][t] for r in rs]) for t in types},
            "wall_seconds_mean": mean([r["wall_seconds"] for r in rs]),
            "fallback_rounds": sum(1 for r in rs for x in r["rounds"] if x["fallback"]),
        }
        rows.append(row)
    return rows


def paired_against(
    runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int], baseline: str = "rand"
) -> list[dict]:
    """Each mode against `baseline` on the same seeds (same start model, same test set): per-seed
    differences of final test accuracy and of the mean over rounds 1..R, their mean and sample
    standard deviation, and on how many seeds the mode ended ahead. Pure; empty without a baseline."""
    out = []
    for mode in modes:
        if mode == baseline:
            continue
        common = [s for s in seeds if (mode, s) in runs and (baseline, s) in runs]
        if not common:
            continue
        final = [runs[(mode, s)]["accuracy"][-1] - runs[(baseline, s)]["accuracy"][-1] for s in common]
        over_rounds = [
            mean(runs[(mode, s)]["accuracy"][1:]) - mean(runs[(baseline, s)]["accuracy"][1:]) for s in common
        ]
        out.append({
            "mode": mode,
            "baseline": baseline,
            "seeds": common,
            "final_diff": final,
            "final_diff_mean": mean(final),
            "final_diff_std": std(final),
            "ahead": sum(d > 0 for d in final),
            "rounds_diff_mean": mean(over_rounds),
            "rounds_diff_std": std(over_rounds),
            "rounds_ahead": sum(d > 0 for d in over_rounds),
        })
    return out


def write_summary(config: dict, results: Path, runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int]) -> None:
    rows = summary_rows(runs, modes, seeds)
    if not rows:
        return
    label = rows[0]["tracked_label"]
    seed_cols = [f"final_seed{s}" for s in seeds]
    type_cols = [k for k in rows[0] if k.startswith("final_") and k.endswith("_mean") and k != "final_mean"]
    columns = ["mode", "n_seeds", "initial_mean", "final_mean", "final_std", *seed_cols, "val_final_mean",
               f"{label}_selected_mean", f"{label}_selected_std", f"{label}_in_chunk_mean", *type_cols, "wall_seconds_mean",
               "fallback_rounds"]
    summary = []
    for row in rows:
        values = dict(row)
        values[f"{label}_selected_mean"] = row["selected_fraction_mean"]
        values[f"{label}_selected_std"] = row["selected_fraction_std"]
        values[f"{label}_in_chunk_mean"] = row["chunk_fraction_mean"]
        summary.append(values)
    _write_csv(results / "summary.csv", columns, summary)
    paired = paired_against(runs, modes, seeds)
    if paired:
        _write_csv(
            results / "paired.csv",
            ["mode", "baseline", "n_seeds", "final_diff_mean", "final_diff_std", "ahead", "rounds_diff_mean",
             "rounds_diff_std", "rounds_ahead", *[f"final_diff_seed{s}" for s in seeds]],
            [{**c, "n_seeds": len(c["seeds"]), **{f"final_diff_seed{s}": d for s, d in zip(c["seeds"], c["final_diff"])}}
             for c in paired],
        )
    flags = flag_rows(runs, modes, seeds)
    if flags:
        _write_csv(results / "flags.csv", FLAG_COLUMNS, flags)
    markdown = summary_markdown(config, rows, seeds, label, paired, flag_table(flags))
    atomic_write_bytes(results / "summary.md", markdown.encode())
    plot_results(config, results, runs, modes, seeds, label)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV of `columns` (floats to 4 decimals, a missing value empty), written atomically."""
    atomic_write_bytes(path, csv_bytes(columns, rows))


def csv_bytes(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt_csv(row.get(c, "")) for c in columns])
    return buf.getvalue().encode()


def _fmt_csv(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else v


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def summary_markdown(
    config: dict, rows: list[dict], seeds: Sequence[int], label: str, paired: Sequence[dict] = (), flag_lines: Sequence[str] = ()
) -> str:
    loop, train = config["loop"], config["train"]
    lines = [
        f"# Selection quality: {config['name']}",
        "",
        " ".join(config["description"].split()) if config["description"] else "",
        "",
        f"{loop['rounds']} rounds of {loop['chunk_size']} candidates x {loop['n_samples_train']} samples, "
        f"keep {loop['chunk_size'] // loop['k']} (k={loop['k']}), {train['steps']} GRPO steps of {train['batch_size']} "
        f"problems per round (lr {train['learning_rate']}); validation {loop['n_samples_val']} samples per problem. "
        f"Held-out test accuracy (greedy, %), final round; `{label} selected` is the mean fraction of selected "
        f"problems that are {label} (`in chunk`: the fraction among the candidates, what random selection expects); "
        "`validation final`: greedy accuracy on the trusted validation set (%, mean over seeds).",
        "",
        "| mode | seeds | initial | final mean | final std | "
        + " | ".join(f"seed {s}" for s in seeds)
        + f" | validation final | {label} selected (%) | {label} in chunk (%) |",
        "|---|---|---|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['n_seeds']} | {_pct(row['initial_mean'])} | {_pct(row['final_mean'])} | "
            f"{_pct(row['final_std'])} | "
            + " | ".join(_pct(row.get(f"final_seed{s}")) if f"final_seed{s}" in row else "-" for s in seeds)
            + f" | {_pct(row['val_final_mean'])} | {_pct(row['selected_fraction_mean'])} ± {_pct(row['selected_fraction_std'])} | {_pct(row['chunk_fraction_mean'])} |"
        )
    type_cols = [k for k in rows[0] if k.startswith("final_") and k.endswith("_mean") and k != "final_mean"]
    if len(type_cols) > 1:
        types = [c[len("final_") : -len("_mean")] for c in type_cols]
        lines += ["", "Final test accuracy per type (%, mean over seeds):", "",
                  "| mode | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for row in rows:
            lines.append(f"| {row['mode']} | " + " | ".join(_pct(row[c]) for c in type_cols) + " |")
    if paired:
        lines += ["", f"Paired against {paired[0]['baseline']} (same seed: same start model and test set), in points: "
                  "the difference of final test accuracy per seed, its mean ± standard deviation, the seeds where the "
                  "mode ended ahead, and the difference of test accuracy averaged over rounds 1..R.", "",
                  "| mode | final − rand per seed | mean ± std | ahead | over rounds: mean ± std | ahead |",
                  "|---|---|---|---|---|---|"]
        for c in paired:
            n = len(c["seeds"])
            lines.append(
                f"| {c['mode']} | " + ", ".join(f"{100 * d:+.1f}" for d in c["final_diff"])
                + f" | {100 * c['final_diff_mean']:+.1f} ± {100 * c['final_diff_std']:.1f} | {c['ahead']}/{n} | "
                f"{100 * c['rounds_diff_mean']:+.1f} ± {100 * c['rounds_diff_std']:.1f} | {c['rounds_ahead']}/{n} |"
            )
    if flag_lines:
        lines += ["", *flag_lines, "", "Per round and run: `flags.csv`."]
    fallbacks = [f"{r['mode']} {r['fallback_rounds']}" for r in rows if r["fallback_rounds"]]
    if fallbacks:
        lines += ["", "Rounds where the mode could not score (e.g. a zero validation gradient) and selected at random "
                  "instead: " + ", ".join(fallbacks) + "."]
    lines += ["", "Mean wall time per run: " + ", ".join(f"{r['mode']} {r['wall_seconds_mean']:.0f} s" for r in rows) + ".",
              "", "Plots: `accuracy.png` (test accuracy per round and its change from round 0; mean and min-max band "
              "over seeds), "
              f"`selected_fraction.png` (fraction of {label} problems selected per round).", ""]
    return "\n".join(lines)


def plot_results(config: dict, results: Path, runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int], label: str) -> None:
    """accuracy.png: test accuracy per round (left) and its change from round 0, paired per seed (right);
    selected_fraction.png: the fraction of tracked problems selected per round. Lines are means over
    seeds, bands span the seeds' minimum to maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    chosen = {mode: [runs[(mode, s)] for s in seeds if (mode, s) in runs] for mode in modes}
    chosen = {mode: rs for mode, rs in chosen.items() if rs}

    def lines(ax, key: str, start: int, relative: bool = False) -> None:
        for mode, rs in chosen.items():
            ys = np.array([r[key] for r in rs], dtype=float) * 100
            if relative:
                ys = ys - ys[:, :1]
            xs = np.arange(start, start + ys.shape[1])
            (line,) = ax.plot(xs, ys.mean(axis=0), marker="o", markersize=3, label=f"{mode} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.1, linewidth=0)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)

    def save(fig, path: Path, bottom: float = 0.0) -> None:
        fig.tight_layout(rect=(0, bottom, 1, 1))
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    lines(left, "accuracy", 0)
    left.set_ylabel("held-out test accuracy (%)")
    left.set_title(f"{config['name']}: test accuracy (greedy)", fontsize=10)
    lines(right, "accuracy", 0, relative=True)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_ylabel("change from round 0 (points)")
    right.set_title("change from the warm-started model, per seed", fontsize=10)
    right.legend(fontsize=8)
    fig.text(0.5, 0.01, "lines: mean over seeds; bands: min to max over seeds", fontsize=8, ha="center")
    save(fig, results / "accuracy.png", bottom=0.04)

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    lines(ax, "tracked_fraction", 1)
    everything = [r for rs in chosen.values() for r in rs]
    chunk = np.array([r["chunk_tracked_fraction"] for r in everything], dtype=float) * 100
    ax.plot(np.arange(1, 1 + chunk.shape[1]), chunk.mean(axis=0), color="grey", linestyle=":", label="in chunk (what random expects)")
    ax.set_ylabel(f"{label} problems selected (%)")
    ax.set_title(f"{config['name']}: fraction of {label} problems selected (mean, min-max band)", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, results / "selected_fraction.png")
