"""`gradalign bench quality`: the command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from gradalign_common.errors import InvalidInputError
from gradalign_tools.bench.quality.benchmark import run_benchmark
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
    started = time.perf_counter()
    run_benchmark(cfg, results, seeds=seed_list, modes=mode_list, model_cache=model_cache, progress=progress, echo=typer.echo)
    typer.echo((results / "summary.md").read_text())
    typer.echo(f"wrote {results / 'summary.md'}, {results / 'summary.csv'}, {results / 'accuracy.png'}, "
               f"{results / 'selected_fraction.png'} in {time.perf_counter() - started:.0f} s")
