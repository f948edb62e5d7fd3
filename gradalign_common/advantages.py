"""GRPO group-relative advantages (shared/spec/gradalign-score.md, "Advantages")."""

from __future__ import annotations

import math
from typing import Sequence

ADVANTAGE_EPS = 1e-6
ZERO_ADVANTAGE_TOL = 1e-6


def grpo_advantages(rewards: Sequence[float]) -> list[float]:
    """A_j = (r_j - mean(r)) / (std(r) + 1e-6), std with Bessel's correction; 0 for a group of one."""
    n = len(rewards)
    if n == 0:
        return []
    if n == 1:
        return [0.0]
    mean = math.fsum(rewards) / n
    var = math.fsum((r - mean) ** 2 for r in rewards) / (n - 1)
    std = math.sqrt(var)
    return [(r - mean) / (std + ADVANTAGE_EPS) for r in rewards]


def is_zero_advantage(advantages: Sequence[float]) -> bool:
    return all(abs(a) < ZERO_ADVANTAGE_TOL for a in advantages)


def accuracy(rewards: Sequence[float]) -> float:
    """Fraction of responses with reward > 0.5."""
    if not rewards:
        return 0.0
    return sum(1 for r in rewards if r > 0.5) / len(rewards)
