"""`gradalign data ...`: importing local VERL-style dataset files (docs/datasets.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.errors import InvalidInputError
from gradalign_common.settings import DEFAULT_HOME

data_app = typer.Typer(help="Datasets: import local VERL-style parquet/JSONL files (never downloads).", no_args_is_help=True)

DEFAULT_DATASETS_DIR = ArtifactStore(DEFAULT_HOME / "artifacts").datasets_dir()


@data_app.command("import")
def import_command(
    files: List[Path] = typer.Argument(..., help="local .parquet or .jsonl files of VERL-style records"),
    name: str = typer.Option(..., "--name", help="dataset name: the output is OUT_DIR/NAME.parquet (+ NAME.json)"),
    count: Optional[List[int]] = typer.Option(
        None, "--count", help="problems to take from each FILE, one --count per FILE in order (0: all); default all"
    ),
    out_dir: Path = typer.Option(DEFAULT_DATASETS_DIR, "--out-dir", help="where the dataset is written"),
    seed: int = typer.Option(0, help="seed of the sampling and of the mixing order"),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="model directory: record prompt lengths in its tokens (chat template applied)"
    ),
) -> None:
    """Import one file, or mix several with counts, into one normalised problems parquet."""
    from gradalign_common.datasets import import_dataset

    counts = list(count or [])
    if counts and len(counts) != len(files):
        typer.echo(f"error: give one --count per file ({len(files)} file(s), {len(counts)} --count)", err=True)
        raise typer.Exit(2)
    inputs = list(zip(files, counts or [None] * len(files)))
    try:
        with typer.progressbar(length=len(files) + 1, label="importing", file=sys.stderr) as bar:
            meta = import_dataset(
                inputs, name, out_dir, seed=seed, tokenizer=tokenizer, progress=lambda done, total, what: bar.update(1)
            )
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{meta['name']}: {meta['n_problems']} problems -> {meta['path']}")
    for src in meta["sources"]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(src["data_sources"].items()))
        typer.echo(f"  {src['path']}: {src['selected']} of {src['available']} ({kinds})")
    if "prompt_tokens" in meta:
        pt = meta["prompt_tokens"]
        typer.echo(f"  prompt tokens: min {pt['min']}, mean {pt['mean']}, max {pt['max']}")
