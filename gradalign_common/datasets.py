"""Reading VERL-style problem records from local JSONL or parquet files.

A record: {"prompt": [{"role": "user", "content": ...}] (or a string), "data_source": str,
"reward_model": {"ground_truth": ...}, "extra_info": {"index": ...}}. The problem id is
extra_info.index when present, else the record's position. Errors name the file, the
record and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.prompts import encode_messages, normalize_messages
from gradalign_common.records import Problem
from gradalign_common.rewards import get_reward_fn


def problem_from_record(record: dict, position: int, where: str) -> Problem:
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where}: expected a JSON object")
    if "prompt" not in record:
        raise InvalidInputError(f"{where}: missing field 'prompt'")
    messages = normalize_messages(record["prompt"], f"{where}: prompt")
    data_source = record.get("data_source")
    if not isinstance(data_source, str) or not data_source:
        raise InvalidInputError(f"{where}: missing field 'data_source'")
    try:
        get_reward_fn(data_source)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise InvalidInputError(f"{where}: missing field 'reward_model.ground_truth'")
    extra = record.get("extra_info") if isinstance(record.get("extra_info"), dict) else {}
    index = extra.get("index", position)
    return Problem(
        problem_id=str(index),
        prompt=encode_messages(messages),
        data_source=data_source,
        ground_truth=str(reward_model["ground_truth"]),
    )


def load_problems(path: str | Path) -> list[Problem]:
    """Problems from a .jsonl/.json-lines or .parquet file of VERL records; never empty, ids unique."""
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFoundError(f"dataset file not found: {p}")
    if not p.is_file():
        raise InvalidInputError(f"dataset path is not a file: {p}")
    if p.suffix == ".parquet":
        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidInputError(f"{p}: not a readable parquet file ({exc})") from None
        problems = [problem_from_record(r, i, f"{p} row {i}") for i, r in enumerate(rows)]
    elif p.suffix in (".jsonl", ".json"):
        problems = []
        with p.open() as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidInputError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                problems.append(problem_from_record(record, len(problems), f"{p}:{lineno}"))
    else:
        raise InvalidInputError(f"{p}: unsupported dataset format {p.suffix!r}; use .jsonl or .parquet")
    if not problems:
        raise InvalidInputError(f"{p}: the dataset is empty")
    seen: set[str] = set()
    for prob in problems:
        if prob.problem_id in seen:
            raise InvalidInputError(f"{p}: duplicate problem id {prob.problem_id!r} (extra_info.index)")
        seen.add(prob.problem_id)
    return problems
