"""Record types that travel between services through the artifact store, and their file formats.

A *problem* is one training or validation prompt with its reference answer.
A *rollout* is one sampled response to one problem (shared/spec/gradalign-score.md).
A *score* is the per-problem output of the scoring engine.
Rollouts are read from JSONL (the spec's format) or parquet (the artifact store's).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from gradalign_common.artifacts import atomic_write_bytes, atomic_path
from gradalign_common.errors import InvalidInputError, NotFoundError


@dataclass(frozen=True)
class Problem:
    problem_id: str
    prompt: str  # JSON-encoded chat messages; gradalign_common.prompts.render_prompt gives the model text
    data_source: str
    ground_truth: str


@dataclass(frozen=True)
class RolloutRecord:
    problem_id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    reward: float
    correct: bool = False
    text: str = ""
    finish_reason: str = ""


@dataclass(frozen=True)
class ScoreRecord:
    problem_id: str
    score: float
    accuracy: float
    n_responses: int
    zero_advantage: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self))


PROBLEM_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("prompt", pa.string()),
        ("data_source", pa.string()),
        ("ground_truth", pa.string()),
    ]
)

ROLLOUT_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("reward", pa.float64()),
        ("correct", pa.bool_()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
    ]
)


def write_problems(path: str | Path, problems: Sequence[Problem]) -> Path:
    table = pa.Table.from_pylist([asdict(p) for p in problems], schema=PROBLEM_SCHEMA)
    return _write_parquet(path, table)


def read_problems(path: str | Path) -> list[Problem]:
    table = _read_parquet(path, required=PROBLEM_SCHEMA.names)
    return [Problem(**{k: row[k] for k in PROBLEM_SCHEMA.names}) for row in table.to_pylist()]


def write_rollouts(path: str | Path, rollouts: Sequence[RolloutRecord]) -> Path:
    rows = []
    for r in rollouts:
        row = asdict(r)
        row["prompt_ids"] = list(r.prompt_ids)
        row["response_ids"] = list(r.response_ids)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    return _write_parquet(path, table)


def read_rollouts(path: str | Path, problem_ids: Collection[str] | None = None) -> list[RolloutRecord]:
    """Read rollout records from .jsonl (spec format) or .parquet; raise InvalidInputError naming the defect.
    With problem_ids, only those problems' records (a parquet file is filtered as it is read)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"rollout file not found: {path}")
    wanted = None if problem_ids is None else set(problem_ids)
    if path.suffix == ".parquet":
        filters = None if wanted is None else [("problem_id", "in", sorted(wanted))]
        table = _read_parquet(path, required=["problem_id", "prompt_ids", "response_ids", "reward"], filters=filters)
        rows = table.to_pylist()
        return [_rollout_from_dict(row, f"{path} row {i}") for i, row in enumerate(rows)]
    records = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InvalidInputError(f"{where}: expected a JSON object")
            records.append(_rollout_from_dict(obj, where))
    if not records:
        raise InvalidInputError(f"{path}: no rollout records")
    return records if wanted is None else [r for r in records if r.problem_id in wanted]


def write_rollouts_jsonl(path: str | Path, rollouts: Iterable[RolloutRecord]) -> Path:
    lines = []
    for r in rollouts:
        lines.append(
            json.dumps(
                {
                    "problem_id": r.problem_id,
                    "prompt_ids": list(r.prompt_ids),
                    "response_ids": list(r.response_ids),
                    "reward": r.reward,
                }
            )
        )
    return atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def group_rollouts(rollouts: Iterable[RolloutRecord]) -> "OrderedDict[str, list[RolloutRecord]]":
    """Group records by problem_id, groups in order of first appearance."""
    groups: OrderedDict[str, list[RolloutRecord]] = OrderedDict()
    for r in rollouts:
        groups.setdefault(r.problem_id, []).append(r)
    return groups


def write_scores_jsonl(path: str | Path, scores: Iterable[ScoreRecord]) -> Path:
    text = "".join(s.to_json() + "\n" for s in scores)
    return atomic_write_bytes(path, text.encode())


def read_scores_jsonl(path: str | Path) -> list[ScoreRecord]:
    with Path(path).open() as fh:
        return [ScoreRecord(**json.loads(line)) for line in fh if line.strip()]


def _rollout_from_dict(obj: dict, where: str) -> RolloutRecord:
    pid = obj.get("problem_id")
    if pid is None or (isinstance(pid, str) and not pid):
        raise InvalidInputError(f"{where}: missing problem_id")
    for key in ("prompt_ids", "response_ids"):
        ids = obj.get(key)
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidInputError(f"{where}: {key} must be a list of integer token ids")
        if any(t < 0 for t in ids):
            raise InvalidInputError(f"{where}: {key} has a negative token id")
    if not obj["prompt_ids"]:
        raise InvalidInputError(f"{where}: prompt_ids is empty")
    if not obj["response_ids"]:
        raise InvalidInputError(f"{where}: response_ids is empty (a record needs response tokens)")
    reward = obj.get("reward")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise InvalidInputError(f"{where}: reward must be a finite number")
    return RolloutRecord(
        problem_id=str(pid),
        prompt_ids=tuple(obj["prompt_ids"]),
        response_ids=tuple(obj["response_ids"]),
        reward=float(reward),
        correct=bool(obj.get("correct", reward > 0.5)),
        text=str(obj.get("text") or ""),
        finish_reason=str(obj.get("finish_reason") or ""),
    )


def _write_parquet(path: str | Path, table: pa.Table) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _read_parquet(path: str | Path, required: Sequence[str], filters: list | None = None) -> pa.Table:
    """The table at path, checked for the required columns first; `filters` (pyarrow's) select rows as
    they are read, and an "in" filter with no values selects none."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"file not found: {path}")
    try:
        schema = pq.read_schema(path)
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise InvalidInputError(f"{path}: missing column(s) {', '.join(missing)}")
        if filters and any(op == "in" and not values for _, op, values in filters):
            return schema.empty_table()
        return pq.read_table(path, filters=filters)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInputError(f"{path}: not a readable parquet file ({exc})") from None
