"""The `simgate` selection mode: the gradient cosine as a gate (> 0), accuracy closest to 0.5 as the order
among the gated-in candidates, ties by cosine; the rest by cosine after them."""

from __future__ import annotations

import pytest

from gradalign_common.records import ScoreRecord
from gradalign_common.selection import GroupSignals, ValidationSource, get_mode, select_top


def _signals(acc: float, cos: float, zero: bool = False) -> GroupSignals:
    return GroupSignals(accuracy=acc, zero_advantage=zero, cosine=0.0 if zero else cos, dot=0.0)


def test_flags_match_sim():
    mode = get_mode("simgate")
    assert (mode.needs_gradients, mode.validation, mode.highest_first) == (True, ValidationSource.EXTERNAL, True)
    assert mode.needs_validation


def test_score_values():
    score = get_mode("simgate").score
    assert score(_signals(0.5, 0.2)) == pytest.approx(2.0 + 0.0002)
    assert score(_signals(0.25, 0.9)) == pytest.approx(1.75 + 0.0009)
    assert score(_signals(0.875, 0.01)) == pytest.approx(1.625 + 0.00001)
    assert score(_signals(0.5, -0.3)) == -0.3  # pointing against the validation gradient: its cosine
    assert score(_signals(1.0, 0.0, zero=True)) == 0.0  # zero advantage: no gradient, 0
    assert score(_signals(0.5, 0.0)) == 0.0  # cos exactly 0 is not aligned


def test_aligned_candidates_rank_by_accuracy_band_then_cosine():
    mode = get_mode("simgate")
    cases = {  # problem_id: (accuracy, cosine, zero_advantage)
        "a-far-but-very-aligned": (0.875, 0.95, False),
        "b-mid-weakly-aligned": (0.5, 0.01, False),
        "c-mid-more-aligned": (0.5, 0.30, False),
        "d-quarter": (0.25, 0.10, False),
        "e-against": (0.5, -0.40, False),
        "f-zero-advantage": (1.0, 0.0, True),
        "g-slightly-against": (0.375, -0.05, False),
    }
    records = [
        ScoreRecord(problem_id=pid, score=mode.score(_signals(acc, cos, zero)), accuracy=acc, n_responses=8, zero_advantage=zero)
        for pid, (acc, cos, zero) in cases.items()
    ]
    order = select_top(records, mode, len(records))
    assert order == [
        "c-mid-more-aligned", "b-mid-weakly-aligned", "d-quarter", "a-far-but-very-aligned",
        "f-zero-advantage", "g-slightly-against", "e-against",
    ]
    # sim would have taken the far-but-aligned one first: the two modes differ exactly in the order among the aligned
    sim = get_mode("sim")
    sim_records = [
        ScoreRecord(problem_id=pid, score=sim.score(_signals(acc, cos, zero)), accuracy=acc, n_responses=8, zero_advantage=zero)
        for pid, (acc, cos, zero) in cases.items()
    ]
    assert select_top(sim_records, sim, 1) == ["a-far-but-very-aligned"]


def test_cosine_tie_break_never_crosses_an_accuracy_step():
    score = get_mode("simgate").score
    # accuracy steps of a group of 64 responses are 1/64 apart; the cosine term is at most 0.001
    for n in (2, 4, 8, 16, 32, 64):
        for i in range(n // 2):
            farther, nearer = i / n, (i + 1) / n  # both below 0.5; `nearer` is closer to 0.5
            assert score(_signals(nearer, 1e-9)) > score(_signals(farther, 1.0))
