"""Suspect-reward flags: candidates whose policy gradient points against the trusted validation gradient.

A candidate whose group has non-zero advantage teaches the model something; when its gradient g_i
points against the gradient g_V of a trusted validation set (cos(g_i, g_V) < 0), what it teaches
undoes what the validation set asks for: evidence that its reward or its reference answer is wrong.

- Per round, a *flag rule* decides which candidates to flag from the round's candidates alone.
  Rules are registered with `register_rule` (as selection.py registers modes):
  `cosine` (alignment below a threshold), `robust_z` (alignment negative and its robust z-score
  within the round, median and MAD, below -threshold) and `pass_rate` (the peers' heuristic,
  for comparison: accuracy at or below a threshold, whatever the gradient says).
- Over rounds, per problem (`accumulate`): flagged in at least `min_rounds` rounds is "suspect",
  flagged in fewer (at least once) is "watch".

The gradient rules read a candidate's *alignment*: cos(g_i, g_V) with g_V from an external
validation set. Only modes whose score is a known function of that cosine carry it
(`alignment_of`): sim and negsim (the score is the cosine), simacc (the cosine times
4 acc (1 - acc), divided back out) and dot (<g_i, g_V> = |g_i| cos: the cosine's sign but not its
value, so only the scale-free `robust_z` reads it). `unavailable_reason` says why a mode and rule
give no flags. A zero-advantage candidate has no gradient and is never flagged by a gradient rule.
Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from gradalign_common.errors import InvalidInputError
from gradalign_common.registry import Registry
from gradalign_common.selection import ValidationSource, get_mode

SUSPECT = "suspect"
WATCH = "watch"
MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of a normal distribution


@dataclass(frozen=True)
class CandidateSignal:
    """One candidate of one round, as the flag rules see it.

    alignment: cos(g_i, g_V) (in dot: <g_i, g_V>, the same sign), None where it is not known.
    """

    problem_id: str
    alignment: float | None
    accuracy: float
    zero_advantage: bool


@dataclass(frozen=True)
class CandidateFlag:
    """A rule's verdict on one candidate of one round; z is its robust z-score (robust_z only)."""

    problem_id: str
    flagged: bool
    alignment: float | None
    accuracy: float
    zero_advantage: bool
    z: float | None = None


# ---- the rule registry -------------------------------------------------------------------------

Verdicts = list[tuple[bool, float | None]]  # (flagged, z) per candidate, in input order
RuleFunction = Callable[[Sequence[CandidateSignal], float], Verdicts]


@dataclass(frozen=True)
class FlagRule:
    """One registered flag rule: its default threshold and the range a threshold may take."""

    name: str
    default_threshold: float
    threshold_range: tuple[float, float]
    needs_alignment: bool  # reads the gradient's alignment (False: the pass-rate heuristic)
    needs_cosine: bool  # its threshold is on the cosine's scale (so dot, which is not, cannot use it)
    description: str
    flag_fn: RuleFunction

    def check_threshold(self, threshold: float) -> float:
        """The threshold as a float; InvalidInputError when it is not finite or outside the rule's range."""
        low, high = self.threshold_range
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or not low <= threshold <= high:
            raise InvalidInputError(f"threshold of rule {self.name!r} must be a number in [{low}, {high}], got {threshold!r}")
        return float(threshold)


_RULES: Registry[FlagRule] = Registry("flag rule", "rules", FlagRule)


def register_rule(
    name: str, *, default_threshold: float, threshold_range: tuple[float, float], needs_alignment: bool, needs_cosine: bool
) -> Callable[[RuleFunction], RuleFunction]:
    """Register the decorated function as flag rule `name`; its docstring describes it."""
    low, high = threshold_range
    if not low <= default_threshold <= high:
        raise ValueError(f"flag rule {name!r}: default threshold outside its range")

    def decorator(fn: RuleFunction) -> RuleFunction:
        description = " ".join((fn.__doc__ or "").split())
        _RULES.add(name, FlagRule(name, default_threshold, threshold_range, needs_alignment, needs_cosine, description, fn))
        return fn

    return decorator


rule_names = _RULES.names  # the registered rules' names, sorted
get_rule = _RULES.get  # the rule called `name` (a FlagRule as it is); InvalidInputError listing the rules


# ---- which modes carry the alignment -----------------------------------------------------------


def _score_is_cosine(score: float, accuracy: float) -> float | None:
    return score


def _simacc_cosine(score: float, accuracy: float) -> float | None:
    weight = 4.0 * accuracy * (1.0 - accuracy)
    return score / weight if weight > 0 else None


# mode -> (reads the alignment back from the stored score and accuracy, whether that alignment is the cosine)
_ALIGNMENT: dict[str, tuple[Callable[[float, float], float | None], bool]] = {
    "sim": (_score_is_cosine, True),
    "negsim": (_score_is_cosine, True),
    "simacc": (_simacc_cosine, True),
    "dot": (_score_is_cosine, False),  # |g_i| cos: the sign of the cosine, not its value
}


def unavailable_reason(mode: str, rule: str | FlagRule) -> str | None:
    """Why `rule` gives no flags for experiments of `mode`, or None when it does."""
    rule = get_rule(rule)
    if not rule.needs_alignment:
        return None
    selection = get_mode(mode)
    if selection.validation is not ValidationSource.EXTERNAL:
        return (
            f"mode {mode!r} scores without an external validation set, so its scores say nothing about whether a "
            "candidate's gradient points against trusted data; flags need sim, dot, simacc or negsim"
        )
    if mode not in _ALIGNMENT:
        return f"mode {mode!r}'s score is not a known function of cos(g_i, g_V)"
    if rule.needs_cosine and not _ALIGNMENT[mode][1]:
        return f"mode {mode!r} stores <g_i, g_V>, not the cosine, so a threshold on the cosine cannot apply; use rule robust_z"
    return None


def alignment_of(mode: str, score: float | None, accuracy: float, zero_advantage: bool | None) -> float | None:
    """A stored candidate's alignment in `mode` (see the module doc); None when unknown or zero-advantage."""
    if score is None or zero_advantage is None or zero_advantage or mode not in _ALIGNMENT:
        return None
    value = _ALIGNMENT[mode][0](float(score), float(accuracy))
    return value if value is not None and math.isfinite(value) else None


# ---- the rules ---------------------------------------------------------------------------------


def _gradient_known(c: CandidateSignal) -> bool:
    return not c.zero_advantage and c.alignment is not None


@register_rule("cosine", default_threshold=0.0, threshold_range=(-1.0, 1.0), needs_alignment=True, needs_cosine=True)
def _cosine(candidates: Sequence[CandidateSignal], threshold: float) -> Verdicts:
    """Flag a candidate with non-zero advantage whose cos(g_i, g_V) is below the threshold."""
    return [(_gradient_known(c) and c.alignment < threshold, None) for c in candidates]


@register_rule("robust_z", default_threshold=0.0, threshold_range=(0.0, 100.0), needs_alignment=True, needs_cosine=False)
def _robust_z(candidates: Sequence[CandidateSignal], threshold: float) -> Verdicts:
    """Flag a candidate with non-zero advantage whose alignment is negative and whose robust z-score within the
    round ((alignment - median) / (1.4826 MAD), over the round's candidates with non-zero advantage) is below
    -threshold. A round whose MAD is 0 flags nothing."""
    z = robust_z_scores([c.alignment if _gradient_known(c) else None for c in candidates])
    return [(_gradient_known(c) and c.alignment < 0 and zi is not None and zi < -threshold, zi) for c, zi in zip(candidates, z)]


@register_rule("pass_rate", default_threshold=0.0, threshold_range=(0.0, 1.0), needs_alignment=False, needs_cosine=False)
def _pass_rate(candidates: Sequence[CandidateSignal], threshold: float) -> Verdicts:
    """The pass-rate heuristic (a baseline, not a gradient rule): flag a candidate whose accuracy is at or below
    the threshold (0: no response passed), whatever its gradient."""
    return [(c.accuracy <= threshold, None) for c in candidates]


def robust_z_scores(values: Sequence[float | None]) -> list[float | None]:
    """(x - median) / (1.4826 MAD) over the values that are not None; None where a value is None, and
    everywhere when the MAD is 0 (fewer than two distinct values in the middle: no spread to measure)."""
    known = [v for v in values if v is not None]
    if len(known) < 2:
        return [None] * len(values)
    median = statistics.median(known)
    mad = statistics.median([abs(v - median) for v in known])
    if mad <= 0:
        return [None] * len(values)
    return [None if v is None else (v - median) / (MAD_TO_SIGMA * mad) for v in values]


# ---- flags per round, and over rounds ---------------------------------------------------------


def flag_round(candidates: Sequence[CandidateSignal], rule: str | FlagRule, threshold: float | None = None) -> list[CandidateFlag]:
    """The rule's verdict on each of one round's candidates, in input order (threshold None: the rule's default)."""
    rule = get_rule(rule)
    t = rule.default_threshold if threshold is None else rule.check_threshold(threshold)
    verdicts = rule.flag_fn(candidates, t)
    return [
        CandidateFlag(c.problem_id, bool(flagged), c.alignment, c.accuracy, c.zero_advantage, z)
        for c, (flagged, z) in zip(candidates, verdicts)
    ]


@dataclass(frozen=True)
class RoundEvidence:
    """What one round said about one problem."""

    round: int
    flagged: bool
    alignment: float | None
    accuracy: float
    zero_advantage: bool
    z: float | None


@dataclass(frozen=True)
class ProblemFlags:
    """A problem flagged in at least one round: its status and the evidence of every round that scored it."""

    problem_id: str
    status: str  # SUSPECT or WATCH
    evidence: tuple[RoundEvidence, ...]  # by round

    @property
    def flagged_rounds(self) -> list[int]:
        return [e.round for e in self.evidence if e.flagged]

    @property
    def worst_alignment(self) -> float | None:
        """The lowest alignment over the rounds it was flagged in."""
        values = [e.alignment for e in self.evidence if e.flagged and e.alignment is not None]
        return min(values) if values else None

    @property
    def mean_accuracy(self) -> float:
        return statistics.fmean(e.accuracy for e in self.evidence)


def status_of(n_flagged: int, min_rounds: int) -> str | None:
    """SUSPECT when flagged in at least min_rounds rounds, WATCH when in fewer but at least one, else None."""
    if min_rounds < 1:
        raise InvalidInputError(f"min_rounds must be >= 1, got {min_rounds}")
    return SUSPECT if n_flagged >= min_rounds else WATCH if n_flagged > 0 else None


def accumulate(rounds: Iterable[tuple[int, Sequence[CandidateFlag]]], min_rounds: int) -> list[ProblemFlags]:
    """Per problem over (round index, that round's flags): the problems flagged at least once, with their status
    and the evidence of every round that scored them; by problem id."""
    status_of(0, min_rounds)  # checks min_rounds
    by_problem: dict[str, list[RoundEvidence]] = {}
    for index, flags in sorted(rounds, key=lambda item: item[0]):
        for f in flags:
            by_problem.setdefault(f.problem_id, []).append(
                RoundEvidence(index, f.flagged, f.alignment, f.accuracy, f.zero_advantage, f.z)
            )
    out = []
    for pid in sorted(by_problem):
        evidence = by_problem[pid]
        status = status_of(sum(e.flagged for e in evidence), min_rounds)
        if status is not None:
            out.append(ProblemFlags(pid, status, tuple(evidence)))
    return out


def flag_rounds(
    rounds: Iterable[tuple[int, Sequence[CandidateSignal]]], rule: str | FlagRule, threshold: float | None, min_rounds: int
) -> list[ProblemFlags]:
    """`flag_round` on every round, then `accumulate`: the whole computation from the rounds' candidates."""
    return accumulate(((index, flag_round(cands, rule, threshold)) for index, cands in rounds), min_rounds)
