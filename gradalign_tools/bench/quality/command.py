"""`gradalign bench quality`: the command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from gradalign_common.errors import InvalidInputError
from gradalign_tools.bench.quality.benchmark import RunScope, run_benchmark
from gradalign_tools.bench.quality.config import load_config


def _parse_list(text: Optional[str], kind, what: str) -> list | None:
    if text is None:
        return None
    try:
        items = [kind(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{what}: a comma-separated list, got {text!r}") from None
    if not items:
        raise typer.BadParameter(f"{what}: empty list")
    return items


def quality_command(
    config: Path = typer.Option(..., "--config", help="regime config (YAML), e.g. benchmarks/quality/noisy_rewards.yaml"),
    results: Path = typer.Option(..., "--results", help="results folder: runs/, summary.md, summary.csv, plots"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds (default: the config's)"),
    modes: Optional[str] = typer.Option(None, "--modes", help="comma-separated selection modes (default: the config's)"),
    model_cache: Optional[Path] = typer.Option(None, "--model-cache", help="warm-started model cache (default: <results>/models); share it between regimes"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default: the config's)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
    skip_dead: Optional[str] = typer.Option(
        None, "--skip-dead", help="on / off: override the config's loop.skip_dead.enabled; both: each run without "
        "(<results>/no-skip) and with skipping (<results>/skip), paired in <results>/skipping.md"
    ),
) -> None:
    """Selection quality: every mode x seed through the real rollout, scoring, selection and training
    code on a regime with bad data; held-out test accuracy per round, tables and plots. Resumable."""
    from gradalign_common.selection import get_mode

    try:
        cfg = load_config(config)
        seed_list = _parse_list(seeds, int, "--seeds")
        mode_list = _parse_list(modes, str, "--modes")
        for m in mode_list or ():
            get_mode(m)
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if threads is not None:
        cfg["threads"] = threads
    if skip_dead not in (None, "on", "off", "both"):
        typer.echo(f"error: --skip-dead must be on, off or both, got {skip_dead!r}", err=True)
        raise typer.Exit(2)
    scope = RunScope(seeds=seed_list, modes=mode_list, model_cache=model_cache, progress=progress, echo=typer.echo)
    started = time.perf_counter()
    if skip_dead == "both":
        from gradalign_tools.bench.quality.skipping import run_skip_comparison

        run_skip_comparison(cfg, results, scope)
        typer.echo((results / "skipping.md").read_text())
        typer.echo(f"wrote {results / 'skipping.md'}, {results / 'skipping.csv'} in {time.perf_counter() - started:.0f} s")
        return
    if skip_dead is not None:
        cfg["loop"]["skip_dead"]["enabled"] = skip_dead == "on"
    run_benchmark(cfg, results, scope)
    typer.echo((results / "summary.md").read_text())
    typer.echo(f"wrote {results / 'summary.md'}, {results / 'summary.csv'}, {results / 'accuracy.png'}, "
               f"{results / 'selected_fraction.png'} in {time.perf_counter() - started:.0f} s")


def _parse_rules(text: Optional[str]) -> list[tuple[str, float | None]] | None:
    """'cosine@-0.1,robust_z,pass_rate@0.25' -> [("cosine", -0.1), ("robust_z", None), ("pass_rate", 0.25)]."""
    from gradalign_common.suspects import get_rule

    if text is None:
        return None
    rules = []
    for item in _parse_list(text, str, "--rules") or ():
        name, _, threshold = item.partition("@")
        rule = get_rule(name)
        try:
            rules.append((rule.name, rule.check_threshold(float(threshold)) if threshold else None))
        except ValueError as exc:
            raise InvalidInputError(f"--rules: {item!r}: {exc}") from None
    return rules


def quality_flags_command(
    results: Path = typer.Option(..., "--results", help="a `bench quality` results folder (its runs/*.json)"),
    rules: Optional[str] = typer.Option(
        None, "--rules", help="comma-separated RULE[@THRESHOLD] (default: cosine, robust_z at their defaults, pass_rate@0, pass_rate@0.25)"
    ),
    min_rounds: int = typer.Option(2, "--min-rounds", min=1, help="flagged in this many rounds: suspect"),
) -> None:
    """Suspect-reward flags of finished runs, offline: precision and recall against the known noisy problems per
    round and cumulative, beside the pass-rate heuristic; writes <results>/flags.csv and prints the table."""
    from gradalign_common.artifacts import atomic_write_bytes
    from gradalign_tools.bench.quality.flags import FLAG_COLUMNS, REPORTED_RULES, flag_rows, flag_table, load_runs
    from gradalign_tools.bench.quality.report import csv_bytes

    try:
        chosen = _parse_rules(rules) or list(REPORTED_RULES)
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    runs = load_runs(results)
    modes = list(dict.fromkeys(mode for mode, _ in runs))
    seeds = sorted({seed for _, seed in runs})
    rows = flag_rows(runs, modes, seeds, chosen, min_rounds)
    if not rows:
        typer.echo(f"no run in {results / 'runs'} recorded its candidates' scores (runs written before the flag figures, "
                   "or modes without an external validation set): rerun them to get flag figures", err=True)
        raise typer.Exit(1)
    atomic_write_bytes(results / "flags.csv", csv_bytes(FLAG_COLUMNS, rows))
    typer.echo("\n".join(flag_table(rows, min_rounds) or ["no noisy problems in these runs: nothing to measure the flags against"]))
    typer.echo(f"wrote {results / 'flags.csv'}")
