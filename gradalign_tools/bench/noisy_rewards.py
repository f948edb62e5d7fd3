"""Noisy reward functions for the arithmetic task families: rewards that teach the wrong thing.

Registered in gradalign_common.rewards' registry (import this module to register them):

- `arith_inverted`: an inverted label. Any response other than the reference answer gets 1;
  the reference answer gets 0. A model that mostly answers right sees its right answers
  penalised and its mistakes rewarded.
- `arith_near_miss_judge`: a judge fooled by near misses. It accepts an answer off by one in
  a single digit (off by exactly 1, 10 or 100: a slipped digit or a dropped carry, the
  mistakes the warm-started tiny model makes most) and rejects everything else, the right
  answer included.

A wrong answer the model never produces changes nothing (every response of the group scores
the same, so the group has zero advantage); both rewards are built so that answers the
model does produce are rewarded. Validation and test problems always use `arith`.
"""

from __future__ import annotations

import re

from gradalign_common.rewards import register_reward

INVERTED = "arith_inverted"
NEAR_MISS_JUDGE = "arith_near_miss_judge"
NOISY_DATA_SOURCES = (INVERTED, NEAR_MISS_JUDGE)
NEAR_MISS_DISTANCES = (1, 10, 100)

_INT_RE = re.compile(r"^\s*(-?\d+)\s*$")


def parse_answer(response: str) -> int | None:
    """The integer a response answers (nothing else but whitespace around it), else None."""
    match = _INT_RE.match(response)
    return int(match.group(1)) if match else None


def is_near_miss(answer: int, reference: int) -> bool:
    """Whether a non-negative `answer` is off from `reference` by exactly 1, 10 or 100."""
    return answer >= 0 and abs(answer - reference) in NEAR_MISS_DISTANCES


@register_reward(INVERTED)
def inverted_arith_reward(response: str, ground_truth: str) -> float:
    """0 for the reference answer, 1 for any other response (the label inverted)."""
    return 0.0 if parse_answer(response) == int(ground_truth) else 1.0


@register_reward(NEAR_MISS_JUDGE)
def near_miss_judge_reward(response: str, ground_truth: str) -> float:
    """1 for an answer off from the reference by exactly 1, 10 or 100; 0 otherwise (the right answer included)."""
    answer = parse_answer(response)
    return 1.0 if answer is not None and is_near_miss(answer, int(ground_truth)) else 0.0


# A third kind, added for the quality sweep (benchmarks/quality/sweep/): a reward unrelated to correctness.
# Not in NOISY_DATA_SOURCES (that tuple names the two kinds the shipped regimes use).
COINFLIP = "arith_coinflip"


def coinflip(response: str, ground_truth: str) -> float:
    """A fixed coin flip per (ground truth, answer): the same answer to the same problem always gets the same
    reward, but whether it is 1 has nothing to do with whether it is right (a judge that guesses)."""
    import hashlib

    answer = parse_answer(response)
    key = f"{ground_truth}|{answer if answer is not None else response.strip()}"
    return float(hashlib.blake2b(key.encode(), digest_size=8).digest()[0] & 1)


@register_reward(COINFLIP)
def coinflip_reward(response: str, ground_truth: str) -> float:
    """1 or 0 by a seeded coin flip on (ground truth, parsed answer), independent of correctness."""
    return coinflip(response, ground_truth)
