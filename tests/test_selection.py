"""The selection-mode registry: flags, score functions, ranking and seeded draws."""

from __future__ import annotations

import pytest

from gradalign_common.errors import InvalidInputError
from gradalign_common.records import ScoreRecord
from gradalign_common.selection import (
    GroupSignals,
    ValidationSource,
    get_mode,
    mode_names,
    rank,
    register_mode,
    seeded_uniform_scores,
    select_top,
)


def _score(pid: str, score: float, acc: float = 0.5) -> ScoreRecord:
    return ScoreRecord(problem_id=pid, score=score, accuracy=acc, n_responses=4, zero_advantage=False)


def test_registered_modes_and_their_flags():
    assert mode_names() == ["accgreedy", "align", "dot", "negsim", "rand", "sim", "simacc", "simgate"]
    expected = {
        # name: (needs_gradients, validation source, highest_first)
        "sim": (True, ValidationSource.EXTERNAL, True),
        "dot": (True, ValidationSource.EXTERNAL, True),
        "align": (True, ValidationSource.CANDIDATES, True),
        "accgreedy": (False, ValidationSource.NONE, False),
        "rand": (False, ValidationSource.NONE, True),
        "simacc": (True, ValidationSource.EXTERNAL, True),
        "negsim": (True, ValidationSource.EXTERNAL, False),
    }
    for name, (needs_gradients, validation, highest_first) in expected.items():
        mode = get_mode(name)
        assert (mode.needs_gradients, mode.validation, mode.highest_first) == (needs_gradients, validation, highest_first)
        assert mode.needs_validation == (validation is ValidationSource.EXTERNAL)


def test_mode_score_functions():
    s = GroupSignals(accuracy=0.25, zero_advantage=False, cosine=0.4, dot=2.5, uniform=0.7)
    assert get_mode("sim").score(s) == 0.4
    assert get_mode("align").score(s) == 0.4
    assert get_mode("negsim").score(s) == 0.4
    assert get_mode("dot").score(s) == 2.5
    assert get_mode("simacc").score(s) == pytest.approx(0.4 * 4 * 0.25 * 0.75)
    assert get_mode("accgreedy").score(s) == 0.25
    assert get_mode("rand").score(s) == 0.7
    zero = GroupSignals(accuracy=1.0, zero_advantage=True)
    for name in ("sim", "dot", "align", "simacc", "negsim"):
        assert get_mode(name).score(zero) == 0.0


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(InvalidInputError, match="unknown selection mode 'bogus'.*accgreedy, align, dot"):
        get_mode("bogus")


def test_register_mode_rejects_duplicates_and_inconsistent_flags():
    with pytest.raises(ValueError, match="already registered"):
        register_mode("sim", needs_gradients=True, validation=ValidationSource.EXTERNAL, highest_first=True)(
            lambda s: 0.0
        )
    with pytest.raises(ValueError, match="validation source"):
        register_mode("never-registered", needs_gradients=False, validation=ValidationSource.EXTERNAL, highest_first=True)
    assert "never-registered" not in mode_names()


def test_rank_highest_first_breaks_ties_by_problem_id():
    scores = [_score("c", 0.5), _score("a", 0.1), _score("b", 0.5), _score("d", 0.9)]
    assert [s.problem_id for s in rank(scores, "sim")] == ["d", "b", "c", "a"]
    assert select_top(scores, "sim", 2) == ["d", "b"]
    assert select_top(scores, "sim", 10) == ["d", "b", "c", "a"]
    assert select_top(scores, "sim", 0) == []


def test_rank_lowest_first_breaks_ties_by_problem_id():
    scores = [_score("c", 0.5), _score("a", 0.1), _score("b", 0.1), _score("d", -0.2)]
    assert [s.problem_id for s in rank(scores, "negsim")] == ["d", "a", "b", "c"]
    accgreedy = [_score("z", 0.0), _score("y", 0.25), _score("x", 0.0), _score("w", 0.5)]
    assert select_top(accgreedy, "accgreedy", 3) == ["x", "z", "y"]


def test_rank_is_independent_of_input_order():
    scores = [_score(f"p{i}", float(i % 3)) for i in range(9)]
    assert rank(scores, "dot") == rank(list(reversed(scores)), "dot")


def test_select_top_rejects_negative_n():
    with pytest.raises(InvalidInputError):
        select_top([_score("a", 1.0)], "sim", -1)


def test_seeded_uniform_scores_are_deterministic_and_order_independent():
    ids = [f"p{i}" for i in range(20)]
    a = seeded_uniform_scores(ids, seed=7)
    assert a == seeded_uniform_scores(list(reversed(ids)), seed=7)
    assert a == seeded_uniform_scores(ids + ids[:5], seed=7)  # repeated ids draw once
    assert a != seeded_uniform_scores(ids, seed=8)
    half = seeded_uniform_scores(ids[::2], seed=7)  # a shard of the round draws the same numbers
    assert half == {pid: a[pid] for pid in ids[::2]}
    assert set(a) == set(ids)
    assert all(0.0 <= u < 1.0 for u in a.values())
    assert len(set(a.values())) == len(ids)
