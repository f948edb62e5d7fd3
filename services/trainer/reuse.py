"""Rollout reuse: the scoring stage's responses as the first GRPO step's batch.

The rollout stage of a round already sampled n responses per candidate with the round's
checkpoint; the trainer starts from that same checkpoint, so for the problems its first
step draws those responses are on-policy samples and the step can skip a rollout pass.

`first_batch_rollouts` reads only what the first step can use: the rows of the problems
in that step's batch (`grpo.batch_for_step(..., step=0)`), at most n per problem, in
file order across the given shards (`records.read_rollouts(path, problem_ids)`). A parquet
shard is read with a row filter on problem_id, so a shard of a whole chunk is never materialised in Python; JSONL shards
(the spec's format) are read whole. A problem with fewer than n responses in the shards
is sampled afresh by the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from gradalign_common.records import Problem, RolloutRecord, read_rollouts
from services.trainer.grpo import GRPOConfig, batch_for_step


def first_batch_rollouts(
    paths: Sequence[str | Path], problems: Sequence[Problem], config: GRPOConfig
) -> dict[str, list[RolloutRecord]]:
    """problem id -> up to n_samples reusable responses, for the problems of the first step's batch."""
    wanted = {p.problem_id for p in batch_for_step(problems, config.batch_size, config.seed, 0)}
    n = config.n_samples
    groups: dict[str, list[RolloutRecord]] = {}
    for path in paths:
        for record in read_rollouts(path, wanted):
            group = groups.setdefault(record.problem_id, [])
            if len(group) < n:
                group.append(record)
    return groups
