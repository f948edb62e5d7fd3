"""The `gradalign score` command: score candidate rollouts from local files, write scores as JSONL.

Bad input (a missing file, a malformed record, an unknown mode or method, a missing
--validation, a directory that is not a model, an optimizer state that does not fit the
model) prints a message on stderr and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from tqdm import tqdm

from gradalign_common.errors import InvalidInputError
from gradalign_common.modeling import check_model_dir, dtype_on
from gradalign_common.optimizer_state import file_fingerprint, read_optimizer_state
from gradalign_common.records import ScoreRecord, group_rollouts, read_rollouts, write_scores_jsonl
from gradalign_common.selection import get_mode, mode_names
from gradalign_common.scoring_methods import METHODS, MethodSpec, parse_method
from services.scoring.engine import ScoringEngine, parse_device
from services.scoring.gradient_source import GradientSource, gradient_source
from gradalign_common.memory_budget import DEFAULT_MEMORY_BUDGET, parse_memory_budget
from services.scoring.score_request import score_request

BAD_INPUT_EXIT_CODE = 2


def score_command(
    model: Path = typer.Option(..., "--model", help="Hugging Face model directory (the current policy)."),
    candidates: Path = typer.Option(..., "--candidates", help="Candidate rollouts (JSONL or parquet)."),
    validation: Optional[Path] = typer.Option(
        None, "--validation", help="Validation rollouts (JSONL or parquet); needed by sim, dot, simacc, negsim; for align, used "
        "instead of the candidates' own rollouts (a round sharded over several commands)."
    ),
    mode: str = typer.Option(..., "--mode", help=f"Selection mode: {', '.join(mode_names())}."),
    method: str = typer.Option(
        "exact", "--method",
        help=f"Scoring method: {', '.join(METHODS)}. Approximate methods are used only when named here.",
    ),  # fmt: skip
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: float32, float64, bfloat16, float16, or auto (bfloat16 on CUDA, float32 on CPU)."),
    device: str = typer.Option("cpu", "--device", help="Torch device, e.g. cpu or cuda:0."),
    memory_budget: str = typer.Option(
        DEFAULT_MEMORY_BUDGET, "--memory-budget",
        help="Working memory of scoring on top of the loaded model: bytes (4GiB, 512MB) or a fraction of the "
        "device's memory (0.8); batches are planned to stay within it.",
    ),
    max_batch_tokens: Optional[int] = typer.Option(
        None, "--max-batch-tokens", min=1,
        help="Override: rows x width of one batched forward, instead of the memory budget.",
    ),
    target_batch_tokens: Optional[int] = typer.Option(
        None, "--target-batch-tokens", min=0,
        help="Rows x width batches are packed to at most within the budget (default: 768 MiB of activations on CPU, "
        "none on CUDA; 0: batches fill the budget).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the rand mode (and of fewer-responses' choice)."),
    optimizer_state: Optional[Path] = typer.Option(
        None, "--optimizer-state",
        help="Adam state file (safetensors, gradalign_common/optimizer_state.py): precondition every gradient "
        "by 1 / (sqrt(bias-corrected exp_avg_sq) + eps).",
    ),  # fmt: skip
    out: Path = typer.Option(..., "--out", help="Where to write the scores (JSONL, one line per candidate problem)."),
) -> None:
    """Score candidate problems by gradient alignment (shared/spec/gradalign-score.md) and write JSONL."""
    try:
        scores = _score(model, candidates, validation, mode, method, dtype, device, seed, optimizer_state,
                        memory_budget, max_batch_tokens, target_batch_tokens)
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(BAD_INPUT_EXIT_CODE) from None
    write_scores_jsonl(out, scores)
    typer.echo(f"wrote {len(scores)} scores to {out}", err=True)


def _score(
    model: Path,
    candidates_path: Path,
    validation_path: Optional[Path],
    mode_name: str,
    method: str,
    dtype_name: str,
    device: str,
    seed: int,
    optimizer_state: Optional[Path] = None,
    memory_budget: str = DEFAULT_MEMORY_BUDGET,
    max_batch_tokens: Optional[int] = None,
    target_batch_tokens: Optional[int] = None,
) -> list[ScoreRecord]:
    """Check the arguments, read the rollouts and score them; InvalidInputError on bad input."""
    mode = get_mode(mode_name)
    spec = parse_method(method)
    parse_device(device)
    budget = parse_memory_budget(memory_budget)
    dtype = dtype_on(dtype_name, device)
    check_model_dir(model)
    state = read_optimizer_state(optimizer_state) if optimizer_state is not None else None
    source = gradient_source(mode, validation_path is not None, "--validation")  # a missing --validation: refused early
    candidates = read_rollouts(candidates_path)
    validation = read_rollouts(validation_path) if source is GradientSource.VALIDATION else None

    def validation_gradient(engine: ScoringEngine, spec: MethodSpec, preconditioner) -> torch.Tensor:
        with _progress_bar(len(group_rollouts(validation)), "validation gradient") as bar:
            return engine.validation_gradient(validation, _updater(bar), method=spec, preconditioner=preconditioner)

    def preconditioner(engine: ScoringEngine):
        return None if state is None else engine.preconditioner(state, key=file_fingerprint(optimizer_state))

    scores = score_request(
        candidates, mode, method=spec, seed=seed, validation_name="--validation",
        engine=lambda: ScoringEngine.from_pretrained(model, device=device, dtype=dtype, memory_budget=budget,
                                                     max_batch_tokens=max_batch_tokens,
                                                     target_batch_tokens=target_batch_tokens),
        validation_gradient=validation_gradient if validation is not None else None,
        preconditioner=preconditioner,
        progress=lambda done, total: bar.update(done - bar.n),  # the bar below: scores come as they are consumed
    )  # fmt: skip
    with _progress_bar(len(group_rollouts(candidates)), f"scoring ({mode.name}, {spec.name})") as bar:
        return list(scores)


def _updater(bar: tqdm):
    """A progress callback that moves the bar to `done`."""
    return lambda done, total: bar.update(done - bar.n)


def _progress_bar(total: int, description: str) -> tqdm:
    return tqdm(total=total, unit="group", desc=description, file=sys.stderr)
