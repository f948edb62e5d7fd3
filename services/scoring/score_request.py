"""Score one request: the candidates' ScoreRecords for a mode and a method, whatever asks for them.

The gRPC service, the `gradalign score` command and the scoring benchmark all score through
`score_request`. What differs between them is where the engine, the preconditioner and the
validation gradient come from (the service keeps them cached and checks for cancellation while
computing g_V; the command loads them once and draws progress bars), so those come in as
callables, called only when the mode needs gradients (services.scoring.gradient_source).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from gradalign_common.records import RolloutRecord, ScoreRecord
from gradalign_common.scoring_methods import MethodSpec, parse_method
from gradalign_common.selection import SelectionMode, get_mode
from services.scoring.engine import Preconditioner, ScoringEngine
from services.scoring.gradient_source import GradientSource, gradient_source
from services.scoring.score_records import ProgressCallback, score_without_gradients, with_progress

EngineSource = Callable[[], ScoringEngine]
"""Returns the engine to score with (e.g. loads the checkpoint, or returns the one already loaded)."""

PreconditionerSource = Callable[[ScoringEngine], "Preconditioner | None"]
"""Returns the engine's preconditioner for the request (None: plain gradients)."""

ValidationGradientSource = Callable[[ScoringEngine, MethodSpec, "Preconditioner | None"], torch.Tensor]
"""Returns g_V of the request's validation rollouts for the engine, method and preconditioner."""


def no_preconditioner(engine: ScoringEngine) -> None:
    """A PreconditionerSource for requests without an optimizer state."""
    return None


def validation_gradient_of(
    rollouts: Sequence[RolloutRecord], progress: ProgressCallback | None = None
) -> ValidationGradientSource:
    """A ValidationGradientSource that computes g_V of `rollouts` (progress after each batch of groups)."""

    def compute(engine: ScoringEngine, method: MethodSpec, preconditioner: Preconditioner | None) -> torch.Tensor:
        return engine.validation_gradient(rollouts, progress, method=method, preconditioner=preconditioner)

    return compute


def score_request(
    candidates: Sequence[RolloutRecord],
    mode: str | SelectionMode,
    *,
    engine: EngineSource,
    validation_gradient: ValidationGradientSource | None = None,
    preconditioner: PreconditionerSource = no_preconditioner,
    method: str | MethodSpec = "exact",
    seed: int = 0,
    progress: ProgressCallback | None = None,
    validation_name: str = "validation rollouts",
) -> Iterator[ScoreRecord]:
    """One ScoreRecord per candidate problem, in order of first appearance of each problem_id.

    `validation_gradient` is None when the request has no validation rollouts (align then uses
    the candidates' own; a mode needing an external set is refused, naming `validation_name`).
    The engine, the preconditioner and g_V are fetched, in that order, before this returns, and
    only when the mode needs gradients; the scores are computed as the iterator is consumed,
    calling progress(done, total) after each candidate. `seed` is used by rand and by
    fewer-responses' choice of responses.
    """
    mode = get_mode(mode)
    spec = parse_method(method)
    source = gradient_source(mode, validation_gradient is not None, validation_name)
    if source is GradientSource.NONE:
        scores = score_without_gradients(candidates, mode, seed)
        return with_progress(scores, len(scores), progress)
    scoring_engine = engine()
    conditioner = preconditioner(scoring_engine)
    g_v = None
    if source is GradientSource.VALIDATION:
        g_v = validation_gradient(scoring_engine, spec, conditioner)
    return scoring_engine.score(
        candidates, mode, validation_gradient=g_v, method=spec, preconditioner=conditioner, seed=seed,
        progress=progress,
    )
