"""Rollout reuse: the scoring stage's responses as the first GRPO step's batch.

The rollout stage of a round already sampled n responses per candidate with the round's
checkpoint; the trainer starts from that same checkpoint, so for the problems its first
step draws those responses are on-policy samples and the step can skip a rollout pass.

`first_batch_rollouts` reads only what the first step can use: the rows of the problems
in that step's batch (`grpo.batch_for_step(..., step=0)`), at most n per problem, in
file order across the given shards. A parquet shard is read with a row filter on
problem_id, so a shard of a whole chunk is never materialised in Python; JSONL shards
(the spec's format) are read whole. A problem with fewer than n responses in the shards
is sampled afresh by the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.records import Problem, RolloutRecord, rollout_from_dict, read_rollouts
from services.trainer.grpo import GRPOConfig, batch_for_step

_REQUIRED = ("problem_id", "prompt_ids", "response_ids", "reward")


def first_batch_rollouts(
    paths: Sequence[str | Path], problems: Sequence[Problem], config: GRPOConfig
) -> dict[str, list[RolloutRecord]]:
    """problem id -> up to n_samples reusable responses, for the problems of the first step's batch."""
    wanted = {p.problem_id for p in batch_for_step(problems, config.batch_size, config.seed, 0)}
    n = config.n_samples
    groups: dict[str, list[RolloutRecord]] = {}
    for path in paths:
        for record in _read_filtered(Path(path), wanted):
            group = groups.setdefault(record.problem_id, [])
            if len(group) < n:
                group.append(record)
    return groups


def _read_filtered(path: Path, wanted: set[str]) -> list[RolloutRecord]:
    if not path.exists():
        raise NotFoundError(f"rollout file not found: {path}")
    if path.suffix != ".parquet":
        return [r for r in read_rollouts(path) if r.problem_id in wanted]
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInputError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in _REQUIRED if c not in schema.names]
    if missing:
        raise InvalidInputError(f"{path}: missing column(s) {', '.join(missing)}")
    if not wanted:
        return []
    try:
        table = pq.read_table(path, filters=[("problem_id", "in", sorted(wanted))])
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInputError(f"{path}: not a readable parquet file ({exc})") from None
    return [rollout_from_dict(row, f"{path} row {i}") for i, row in enumerate(table.to_pylist())]
