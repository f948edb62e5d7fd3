"""Reward functions keyed by data_source, like verl's default reward function.

`compute_reward(data_source, response_text, ground_truth)` returns (reward, correct).
A new reward is one function registered with `@register_reward("name", ...)`.
"""

from __future__ import annotations

import re
from typing import Callable

from gradalign_common.errors import InvalidInputError

RewardFn = Callable[[str, str], float]
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(*data_sources: str) -> Callable[[RewardFn], RewardFn]:
    def decorator(fn: RewardFn) -> RewardFn:
        for name in data_sources:
            _REGISTRY[name] = fn
        return fn

    return decorator


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reward_fn(data_source: str) -> RewardFn:
    try:
        return _REGISTRY[data_source]
    except KeyError:
        raise InvalidInputError(
            f"unknown data_source {data_source!r}: no reward function; known: {', '.join(reward_names())}"
        ) from None


def compute_reward(data_source: str, response_text: str, ground_truth: str) -> tuple[float, bool]:
    reward = float(get_reward_fn(data_source)(response_text, ground_truth))
    return reward, reward > 0.5


_INT_RE = re.compile(r"^\s*(-?\d+)")


@register_reward("arith")
def arithmetic_reward(response: str, ground_truth: str) -> float:
    """1 when the response starts with the right integer (and nothing but whitespace follows), else 0."""
    match = _INT_RE.match(response)
    if not match or response[match.end() :].strip():
        return 0.0
    return 1.0 if int(match.group(1)) == int(ground_truth) else 0.0


@register_reward("exact_match")
def exact_match_reward(response: str, ground_truth: str) -> float:
    return 1.0 if response.strip() == ground_truth.strip() else 0.0
