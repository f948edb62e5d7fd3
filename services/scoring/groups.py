"""Groups: one problem's rollouts with their GRPO advantages (shared/spec/gradalign-score.md, "Advantages").

A candidate's group gives its loss L_i; the validation groups together give L_V. Also here:
the per-response loss weights A_j / denominator that every gradient path feeds the model, and
fewer-responses' seeded choice of a group's responses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from gradalign_common.advantages import accuracy, grpo_advantages, is_zero_advantage
from gradalign_common.errors import InvalidInputError
from gradalign_common.records import RolloutRecord, group_rollouts


@dataclass(frozen=True)
class Group:
    """One problem's rollouts with their GRPO advantages."""

    problem_id: str
    records: list[RolloutRecord]
    advantages: list[float]
    zero_advantage: bool
    accuracy: float

    @property
    def n_response_tokens(self) -> int:
        return sum(len(r.response_ids) for r in self.records)


def groups_of(rollouts: Sequence[RolloutRecord], what: str) -> list[Group]:
    """Rollouts grouped by problem_id in order of first appearance, with advantages per group;
    InvalidInputError when there are none (`what` names them: candidate, validation)."""
    if not rollouts:
        raise InvalidInputError(f"no {what} rollouts")
    groups = []
    for pid, records in group_rollouts(rollouts).items():
        rewards = [r.reward for r in records]
        advantages = grpo_advantages(rewards)
        groups.append(Group(pid, records, advantages, is_zero_advantage(advantages), accuracy(rewards)))
    return groups


def weighted_responses(groups: Sequence[Group], denominator: int | None) -> Iterator[tuple[int, list, list]]:
    """(key, responses with non-zero advantage, their weights A_j / denominator) per group that has any;
    the denominator is the group's own response tokens (L_i) unless given (L_V's total)."""
    for key, group in enumerate(groups):
        n_tokens = denominator or group.n_response_tokens
        kept = [(r, a / n_tokens) for r, a in zip(group.records, group.advantages) if a != 0.0]
        if kept:
            yield key, [r for r, _ in kept], [w for _, w in kept]


def subsample_indices(problem_id: str, n: int, m: int, seed: int) -> list[int]:
    """fewer-responses: which m of a group's n responses are used (all when m >= n), seeded per problem."""
    if m >= n:
        return list(range(n))
    key = int.from_bytes(hashlib.blake2b(problem_id.encode(), digest_size=8).digest(), "little")
    return sorted(np.random.default_rng([seed, key, 1]).choice(n, size=m, replace=False).tolist())


def subsample(group: Group, m: int | None, seed: int) -> Group:
    """The group with only fewer-responses' m responses (default: half, rounded up); advantages and
    accuracy stay those of the whole group."""
    n = len(group.records)
    chosen = subsample_indices(group.problem_id, n, m if m is not None else (n + 1) // 2, seed)
    return Group(group.problem_id, [group.records[j] for j in chosen], [group.advantages[j] for j in chosen],
                 group.zero_advantage, group.accuracy)
