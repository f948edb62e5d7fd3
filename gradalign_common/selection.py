"""The registry of selection modes: how each mode scores a candidate problem and ranks the candidates.

A selection mode (shared/spec/gradalign-score.md, "Scores per candidate problem") says
- what its score is computed from (`GroupSignals`: accuracy, gradient cosine and dot product,
  a seeded uniform draw) through its registered score function,
- whether computing it needs gradients, and where its validation gradient comes from
  (`ValidationSource`: an external validation set, the candidates' own rollouts, or none),
- its ranking direction (highest or lowest score first).

Modes are registered with the `register_mode` decorator, in the manner of verl's core_algos.
Ranking is deterministic: ties break by problem_id ascending.
Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from gradalign_common.errors import InvalidInputError
from gradalign_common.records import ScoreRecord
from gradalign_common.registry import Registry


class ValidationSource(enum.Enum):
    """Where a mode's validation gradient g_V comes from."""

    NONE = "none"  # the mode needs no validation gradient
    EXTERNAL = "external"  # an external validation set's rollouts
    CANDIDATES = "candidates"  # the candidates' own rollouts (LearnAlign-style)


@dataclass(frozen=True)
class GroupSignals:
    """What a mode's score is computed from, for one candidate problem.

    cosine and dot are cos(g_i, g_V) and <g_i, g_V>; they are 0 for a zero-advantage
    candidate and in modes that need no gradients. uniform is the problem's seeded
    uniform draw in [0, 1) (see `seeded_uniform_scores`), 0 where unused.
    """

    accuracy: float
    zero_advantage: bool
    cosine: float = 0.0
    dot: float = 0.0
    uniform: float = 0.0


ScoreFunction = Callable[[GroupSignals], float]


@dataclass(frozen=True)
class SelectionMode:
    """One registered selection mode."""

    name: str
    needs_gradients: bool
    validation: ValidationSource
    highest_first: bool
    score_fn: ScoreFunction

    @property
    def needs_validation(self) -> bool:
        """Whether the mode needs an external validation set."""
        return self.validation is ValidationSource.EXTERNAL

    def score(self, signals: GroupSignals) -> float:
        """The candidate's reported score."""
        return float(self.score_fn(signals))


_MODES: Registry[SelectionMode] = Registry("selection mode", "modes", SelectionMode)


def register_mode(
    name: str, *, needs_gradients: bool, validation: ValidationSource, highest_first: bool
) -> Callable[[ScoreFunction], ScoreFunction]:
    """Register the decorated score function as selection mode `name`."""
    if needs_gradients == (validation is ValidationSource.NONE):
        raise ValueError(f"mode {name!r}: a mode needs a validation source exactly when it needs gradients")

    def decorator(score_fn: ScoreFunction) -> ScoreFunction:
        _MODES.add(name, SelectionMode(name, needs_gradients, validation, highest_first, score_fn))
        return score_fn

    return decorator


mode_names = _MODES.names  # the registered modes' names, sorted
get_mode = _MODES.get  # the mode called `name` (a SelectionMode as it is); InvalidInputError listing the modes


def seeded_uniform_scores(problem_ids: Iterable[str], seed: int) -> dict[str, float]:
    """A uniform draw in [0, 1) per distinct problem id, from numpy default_rng((seed, hash of the id)).

    Each problem's draw depends only on (seed, problem_id): not on input order nor on which
    other problems share the request, so a round sharded over scorers gets the same draws.
    """
    out = {}
    for pid in problem_ids:
        if pid not in out:
            key = int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8).digest(), "little")
            out[pid] = float(np.random.default_rng([seed, key]).random())
    return out


def rank(scores: Sequence[ScoreRecord], mode: str | SelectionMode) -> list[ScoreRecord]:
    """The scores in the mode's selection order; ties break by problem_id ascending."""
    mode = get_mode(mode)
    sign = -1.0 if mode.highest_first else 1.0
    return sorted(scores, key=lambda s: (sign * s.score, s.problem_id))


def select_top(scores: Sequence[ScoreRecord], mode: str | SelectionMode, n: int) -> list[str]:
    """The problem ids of the first n candidates in the mode's selection order."""
    if n < 0:
        raise InvalidInputError(f"number of problems to select must be >= 0, got {n}")
    return [s.problem_id for s in rank(scores, mode)[:n]]


# The modes. Gradient modes see cosine = dot = 0 for a zero-advantage candidate, so it scores 0.


@register_mode("sim", needs_gradients=True, validation=ValidationSource.EXTERNAL, highest_first=True)
def _sim(s: GroupSignals) -> float:
    """cos(g_i, g_V)."""
    return s.cosine


@register_mode("dot", needs_gradients=True, validation=ValidationSource.EXTERNAL, highest_first=True)
def _dot(s: GroupSignals) -> float:
    """<g_i, g_V>, g_i not normalised."""
    return s.dot


@register_mode("align", needs_gradients=True, validation=ValidationSource.CANDIDATES, highest_first=True)
def _align(s: GroupSignals) -> float:
    """cos(g_i, g_V) with g_V from the candidates' own rollouts."""
    return s.cosine


@register_mode("accgreedy", needs_gradients=False, validation=ValidationSource.NONE, highest_first=False)
def _accgreedy(s: GroupSignals) -> float:
    """abs(accuracy - 0.5): accuracy closest to 0.5 first."""
    return abs(s.accuracy - 0.5)


@register_mode("rand", needs_gradients=False, validation=ValidationSource.NONE, highest_first=True)
def _rand(s: GroupSignals) -> float:
    """The problem's seeded uniform draw."""
    return s.uniform


@register_mode("simacc", needs_gradients=True, validation=ValidationSource.EXTERNAL, highest_first=True)
def _simacc(s: GroupSignals) -> float:
    """cos(g_i, g_V) weighted by 4 acc (1 - acc), which peaks at accuracy 0.5."""
    return s.cosine * 4.0 * s.accuracy * (1.0 - s.accuracy)


@register_mode("negsim", needs_gradients=True, validation=ValidationSource.EXTERNAL, highest_first=False)
def _negsim(s: GroupSignals) -> float:
    """cos(g_i, g_V), lowest first (an ablation: the least aligned candidates)."""
    return s.cosine


SIMGATE_COSINE_WEIGHT = 1e-3  # below the smallest accuracy step of a group of up to 64 responses (1/64)


@register_mode("simgate", needs_gradients=True, validation=ValidationSource.EXTERNAL, highest_first=True)
def _simgate(s: GroupSignals) -> float:
    """The gradient as a gate, the pass rate as the order: candidates aligned with the validation gradient
    (cos > 0) first, accuracy closest to 0.5 first among them (ties by cosine), scored
    2 - |acc - 0.5| + 0.001 cos in (1.5, 2.001]; then the rest by cosine (<= 0: zero-advantage candidates
    at 0, before those that point against the validation gradient)."""
    if s.cosine > 0.0:
        return 2.0 - abs(s.accuracy - 0.5) + SIMGATE_COSINE_WEIGHT * s.cosine
    return s.cosine
