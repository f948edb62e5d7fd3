"""The selected problems as a parquet file in verl's RL dataset format.

One row per problem: data_source, prompt = chat messages, ability, reward_model =
{style: "rule", ground_truth}, extra_info = {index: our problem id, split}. The same file
serves as data.val_files, which verl requires but we never run (trainer.test_freq=-1,
trainer.val_before_train=False; services.trainer.backends.verl.command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from gradalign_common.artifacts import atomic_path
from gradalign_common.errors import InvalidInputError
from gradalign_common.prompts import decode_messages
from gradalign_common.records import Problem
from gradalign_common.rewards import MATH_DATA_SOURCES

VERL_DATASET_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.string()), ("split", pa.string())])),
    ]
)



def ability_of(data_source: str) -> str:
    """verl's `ability` column (informational only): "math" for math data sources, else the data source."""
    return "math" if data_source in MATH_DATA_SOURCES or data_source == "arith" else data_source


def verl_record(problem: Problem, split: str = "train") -> dict:
    """One problem as a row of verl's RL dataset; extra_info.index is our problem id."""
    return {
        "data_source": problem.data_source,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in decode_messages(problem.prompt)],
        "ability": ability_of(problem.data_source),
        "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
        "extra_info": {"index": problem.problem_id, "split": split},
    }


def write_verl_dataset(path: str | Path, problems: Sequence[Problem], split: str = "train") -> Path:
    """Write problems as verl's RL dataset parquet (atomically); returns path."""
    if not problems:
        raise InvalidInputError("no problems to write")
    table = pa.Table.from_pylist([verl_record(p, split) for p in problems], schema=VERL_DATASET_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)
