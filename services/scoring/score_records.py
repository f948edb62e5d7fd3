"""From per-group signals to ScoreRecords: how a selection mode's score is reported for each candidate.

The mode (gradalign_common.selection) turns GroupSignals into a score; a zero-advantage
candidate gets cosine = dot = 0 (so 0 in sim, dot and align) without a model pass. Modes that
need no gradients (accgreedy, rand) are scored here from the groups alone.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

from gradalign_common.records import RolloutRecord, ScoreRecord
from gradalign_common.selection import GroupSignals, SelectionMode, get_mode, seeded_uniform_scores
from services.scoring.groups import Group, groups_of

ProgressCallback = Callable[[int, int], None]
"""Called as progress(done, total) after each group."""


def score_record(group: Group, mode: SelectionMode, signals: GroupSignals) -> ScoreRecord:
    """The candidate's ScoreRecord under `mode`."""
    return ScoreRecord(
        problem_id=group.problem_id,
        score=mode.score(signals),
        accuracy=group.accuracy,
        n_responses=len(group.records),
        zero_advantage=group.zero_advantage,
    )


def score_without_gradients(
    candidates: Sequence[RolloutRecord], mode: str | SelectionMode, seed: int = 0
) -> list[ScoreRecord]:
    """Scores of a mode that needs no model pass (accgreedy, rand), in order of first appearance."""
    mode = get_mode(mode)
    if mode.needs_gradients:
        raise ValueError(f"mode {mode.name!r} needs gradients: use ScoringEngine.score")
    groups = groups_of(candidates, "candidate")
    uniform = seeded_uniform_scores((g.problem_id for g in groups), seed)
    return [
        score_record(g, mode, GroupSignals(g.accuracy, g.zero_advantage, uniform=uniform[g.problem_id]))
        for g in groups
    ]


def records_from_signals(
    groups: Sequence[Group], mode: SelectionMode, signals: Iterator[tuple[float, float]]
) -> Iterator[ScoreRecord]:
    """Each group's record, in order: `signals` yields (<g~_i, g_V>, ||g~_i||^2) of the non-zero-advantage
    groups only; cos = dot / ||g~_i|| (0 for a zero gradient)."""
    for group in groups:
        if group.zero_advantage:
            yield score_record(group, mode, GroupSignals(group.accuracy, True))
            continue
        dot, sq_norm = next(signals)
        cosine = dot / math.sqrt(sq_norm) if sq_norm > 0.0 else 0.0
        yield score_record(group, mode, GroupSignals(group.accuracy, False, cosine=cosine, dot=dot))


def with_progress(scores: Iterable[ScoreRecord], total: int, progress: ProgressCallback | None) -> Iterator[ScoreRecord]:
    """The scores, calling progress(done, total) after each."""
    for done, record in enumerate(scores, start=1):
        if progress is not None:
            progress(done, total)
        yield record
