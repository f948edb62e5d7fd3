"""Suspect-reward flags (gradalign_common.suspects): the rules on hand-worked rounds, the accumulation over
rounds, which modes carry the alignment, and what is refused."""

from __future__ import annotations

import math

import pytest

from gradalign_common.errors import InvalidInputError
from gradalign_common.suspects import (
    SUSPECT,
    WATCH,
    CandidateSignal,
    accumulate,
    alignment_of,
    flag_round,
    flag_rounds,
    get_rule,
    register_rule,
    robust_z_scores,
    rule_names,
    status_of,
    unavailable_reason,
)


def _c(pid: str, alignment: float | None, accuracy: float = 0.5, zero: bool = False) -> CandidateSignal:
    return CandidateSignal(pid, alignment, accuracy, zero)


def _flagged(flags) -> list[str]:
    return [f.problem_id for f in flags if f.flagged]


def test_the_registered_rules_and_their_defaults():
    assert rule_names() == ["cosine", "pass_rate", "robust_z"]
    assert (get_rule("cosine").default_threshold, get_rule("robust_z").default_threshold, get_rule("pass_rate").default_threshold) == (0.0, 0.0, 0.0)
    assert get_rule("cosine").needs_cosine and not get_rule("robust_z").needs_cosine
    assert not get_rule("pass_rate").needs_alignment
    assert "cos(g_i, g_V)" in get_rule("cosine").description


def test_cosine_flags_non_zero_advantage_candidates_below_the_threshold():
    round_ = [
        _c("a", -0.20),
        _c("b", -0.05),
        _c("c", None, accuracy=1.0, zero=True),  # zero advantage: no gradient, never flagged
        _c("d", 0.30),
        _c("e", None),  # alignment unknown
        _c("f", -0.10),  # exactly at the threshold: not below it
    ]
    assert _flagged(flag_round(round_, "cosine", -0.1)) == ["a"]
    assert _flagged(flag_round(round_, "cosine")) == ["a", "b", "f"]  # default 0: every negative cosine
    assert [f.problem_id for f in flag_round(round_, "cosine")] == ["a", "b", "c", "d", "e", "f"]  # input order kept


def test_robust_z_uses_the_median_and_mad_of_the_round_and_needs_a_negative_alignment():
    # alignments -0.5, 0.0, 0.1, 0.2, 0.3: median 0.1; |x - median| = 0.6, 0.1, 0, 0.1, 0.2: MAD 0.1
    round_ = [_c("a", -0.5), _c("b", 0.0), _c("c", 0.1), _c("d", 0.2), _c("e", 0.3), _c("zero", None, 0.0, zero=True)]
    flags = flag_round(round_, "robust_z", 1.0)
    z = {f.problem_id: f.z for f in flags}
    assert z["a"] == pytest.approx(-0.6 / (1.4826 * 0.1)) and z["b"] == pytest.approx(-0.1 / 0.14826)
    assert z["c"] == pytest.approx(0.0) and z["zero"] is None  # the zero-advantage candidate is not in the median
    assert _flagged(flags) == ["a"]  # z -4.05; b's z is -0.67 > -1
    # z < -0.5 takes b too by its z-score, but b's alignment is 0: it does not point against g_V
    assert _flagged(flag_round(round_, "robust_z", 0.5)) == ["a"]
    # a round shifted down: the same spread, every alignment negative, flags the same relative outlier only
    shifted = [_c(c.problem_id, c.alignment - 0.4) if c.alignment is not None else c for c in round_]
    assert _flagged(flag_round(shifted, "robust_z", 1.0)) == ["a"]
    assert _flagged(flag_round(shifted, "robust_z", 0.5)) == ["a", "b"]  # b is now -0.4 with z -0.67


def test_robust_z_flags_nothing_without_spread():
    assert robust_z_scores([0.2, 0.2, 0.2, -0.9]) == [None] * 4  # MAD 0: three of four equal
    assert robust_z_scores([-0.3]) == [None] and robust_z_scores([]) == []
    assert _flagged(flag_round([_c("a", -0.1), _c("b", -0.1), _c("c", -0.1)], "robust_z", 0.0)) == []


def test_pass_rate_flags_low_accuracy_whatever_the_gradient():
    round_ = [_c("a", 0.4, 0.0, zero=True), _c("b", -0.3, 0.25), _c("c", 0.1, 0.5), _c("d", None, 0.125)]
    assert _flagged(flag_round(round_, "pass_rate")) == ["a"]
    assert _flagged(flag_round(round_, "pass_rate", 0.25)) == ["a", "b", "d"]


def test_flags_accumulate_into_suspect_and_watch():
    rounds = [
        (2, flag_round([_c("p", -0.3), _c("q", 0.2)], "cosine")),
        (0, flag_round([_c("p", -0.1), _c("q", -0.2), _c("r", 0.5)], "cosine")),
        (1, flag_round([_c("p", 0.4, 0.75), _c("r", 0.3)], "cosine")),
    ]
    problems = accumulate(rounds, min_rounds=2)
    assert [(p.problem_id, p.status) for p in problems] == [("p", SUSPECT), ("q", WATCH)]  # r was never flagged
    p = problems[0]
    assert [e.round for e in p.evidence] == [0, 1, 2] and p.flagged_rounds == [0, 2]  # the unflagged round 1 is evidence too
    assert p.worst_alignment == -0.3 and p.mean_accuracy == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert [(p.problem_id, p.status) for p in accumulate(rounds, min_rounds=1)] == [("p", SUSPECT), ("q", SUSPECT)]
    assert [(p.problem_id, p.status) for p in accumulate(rounds, min_rounds=3)] == [("p", WATCH), ("q", WATCH)]
    same = flag_rounds([(0, [_c("p", -0.1), _c("q", -0.2)]), (2, [_c("p", -0.3)])], "cosine", None, 2)
    assert [(x.problem_id, x.status) for x in same] == [("p", SUSPECT), ("q", WATCH)]


def test_status_of():
    assert [status_of(n, 2) for n in (0, 1, 2, 5)] == [None, WATCH, SUSPECT, SUSPECT]
    with pytest.raises(InvalidInputError, match="min_rounds"):
        status_of(1, 0)
    with pytest.raises(InvalidInputError, match="min_rounds"):
        accumulate([], min_rounds=0)


def test_alignment_is_read_back_from_each_modes_score():
    assert alignment_of("sim", -0.25, 0.5, False) == -0.25
    assert alignment_of("negsim", 0.125, 0.5, False) == 0.125
    assert alignment_of("simacc", 0.3, 0.25, False) == pytest.approx(0.3 / 0.75)  # 4 * 0.25 * 0.75 = 0.75
    assert alignment_of("simacc", 0.0, 0.0, False) is None  # weight 0: the cosine is lost
    assert alignment_of("dot", -3.5, 0.5, False) == -3.5  # |g_i| cos: its sign
    assert alignment_of("sim", 0.0, 1.0, True) is None and alignment_of("sim", None, 0.5, None) is None
    assert alignment_of("rand", 0.7, 0.5, False) is None and alignment_of("accgreedy", 0.1, 0.4, False) is None
    assert alignment_of("sim", math.nan, 0.5, False) is None


def test_which_modes_and_rules_give_flags():
    for mode in ("sim", "simacc", "negsim"):
        assert unavailable_reason(mode, "cosine") is None and unavailable_reason(mode, "robust_z") is None
    assert unavailable_reason("dot", "robust_z") is None
    assert "robust_z" in unavailable_reason("dot", "cosine")
    for mode in ("rand", "accgreedy", "align"):
        assert "external validation set" in unavailable_reason(mode, "robust_z")
        assert unavailable_reason(mode, "pass_rate") is None  # the heuristic needs no gradient
    with pytest.raises(InvalidInputError, match="unknown selection mode"):
        unavailable_reason("best", "cosine")


@pytest.mark.parametrize(
    "rule, threshold",
    [("cosine", 1.5), ("cosine", -2.0), ("robust_z", -1.0), ("pass_rate", 1.1), ("cosine", math.nan), ("robust_z", math.inf)],
)
def test_a_threshold_outside_the_rules_range_is_refused(rule, threshold):
    with pytest.raises(InvalidInputError, match=f"threshold of rule '{rule}'"):
        flag_round([_c("a", -0.2)], rule, threshold)


def test_unknown_and_duplicate_rules():
    with pytest.raises(InvalidInputError, match="unknown flag rule 'loudest'; valid rules: cosine, pass_rate, robust_z"):
        get_rule("loudest")
    with pytest.raises(ValueError, match="already registered"):
        register_rule("cosine", default_threshold=0.0, threshold_range=(-1, 1), needs_alignment=True, needs_cosine=True)(lambda c, t: [])
    with pytest.raises(ValueError, match="default threshold outside"):
        register_rule("bad", default_threshold=2.0, threshold_range=(-1, 1), needs_alignment=True, needs_cosine=True)
