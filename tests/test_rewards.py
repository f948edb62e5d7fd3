"""Each reward type on real examples: math-verify (LaTeX, \\boxed{}, numbers), multiple choice,
yes/no, exact match, arithmetic; the registry, batch scoring and the process pool."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import yaml

from gradalign_common.errors import InvalidInputError
from gradalign_common.rewards import (
    JudgeRequiredError,
    RewardItem,
    compute_reward,
    extract_choice,
    get_reward_fn,
    math_reward,
    reward_names,
    score_batch,
)


@pytest.mark.parametrize(
    "response, ground_truth, expected",
    [
        ("The answer is $\\frac{1}{2}$.", "0.5", 1.0),
        ("So $x = 0.5$", "\\frac{1}{2}", 1.0),
        ("Thus the probability is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
        ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("Expanding, we get \\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("Natalia sold 48/2 = 24 clips in May, 48+24 = 72 in total.\n#### 72", "72", 1.0),
        ("First I thought 3, but the final answer is \\boxed{4}", "3", 0.0),
        ("The answer is \\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("I don't know.", "42", 0.0),
        ("\\boxed{(1,2)}", "(1, 2)", 1.0),
    ],
)
def test_math_verify(response, ground_truth, expected):
    assert math_reward(response, ground_truth) == expected
    for source in ("math", "math500", "aime24", "aime25", "gsm8k", "deepscaler", "dapo", "webinstruct"):
        assert get_reward_fn(source) is math_reward


def test_math_boolean_reference_and_non_main_thread():
    assert compute_reward("theoremqa", "Hence the statement holds: \\boxed{True}", "True") == (1.0, True)
    assert compute_reward("theoremqa", "The answer is no.", "True") == (0.0, False)
    out = []  # math-verify's signal timeouts cannot run off the main thread: it must still verify there
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{\\frac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


@pytest.mark.parametrize(
    "response, choice",
    [
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("After eliminating the others, \\boxed{\\text{B}}", "B"),
        ("(A)", "A"),
        ("E", "E"),
        ("I am unsure; (B) looks best.", "B"),
        ("None of these seem right", None),
    ],
)
def test_extract_choice(response, choice):
    assert extract_choice(response) == choice


def _reward_cases() -> list:
    """The compute_reward cases of tests/data/reward_cases.yaml (multiple choice, yes/no, exact match, arithmetic)."""
    cases = yaml.safe_load((Path(__file__).resolve().parent / "data" / "reward_cases.yaml").read_text())
    assert isinstance(cases, list) and cases, "tests/data/reward_cases.yaml holds no cases"
    return [pytest.param(c, id=f"{c['source']}:{c['response']!r}->{c['ground_truth']!r}") for c in cases]


@pytest.mark.parametrize("case", _reward_cases())
def test_multiple_choice_yes_no_exact_match_and_arithmetic(case):
    assert compute_reward(case["source"], case["response"], case["ground_truth"]) == (case["reward"], case["correct"])


def test_registry_names_unknown_sources():
    names = reward_names()
    for source in ("arith", "exact_match", "math", "mmlupro", "strategyqa", "judge"):
        assert source in names
    with pytest.raises(InvalidInputError, match="unknown data_source 'nope'"):
        compute_reward("nope", "1", "1")


class _FakeJudge:
    def __init__(self):
        self.calls = []

    def score(self, items):
        self.calls.append(list(items))
        return [1.0 if it.response.strip() == it.ground_truth else 0.0 for it in items]


def test_score_batch_routes_judged_sources_and_keeps_order():
    items = [
        RewardItem("arith", "82", "82"),
        RewardItem("judge", "Paris", "Paris", prompt="Capital of France?"),
        RewardItem("math", "\\boxed{0.5}", "\\frac12"),
        RewardItem("webinstruct", "Lyon", "Paris"),
        RewardItem("judge", "Rome", "Paris"),
    ]
    judge = _FakeJudge()
    scores = score_batch(items, judge=judge, judge_sources={"webinstruct"})
    assert scores == [(1.0, True), (1.0, True), (1.0, True), (0.0, False), (0.0, False)]
    assert [len(c) for c in judge.calls] == [3]  # one concurrent batch for the judge
    with pytest.raises(JudgeRequiredError, match="'judge'.*JUDGE_BASE_URL"):
        score_batch(items)
    with pytest.raises(InvalidInputError, match="unknown data_source"):
        score_batch([RewardItem("nope", "1", "1")], judge=judge)


def test_score_batch_in_a_process_pool():
    items = [RewardItem("math", "\\boxed{\\frac{1}{2}}", "0.5"), RewardItem("arith", "3", "4"), RewardItem("math", "7", "8")]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert score_batch(items, pool=pool) == [(1.0, True), (0.0, False), (0.0, False)]
