"""Some problems of a dataset file written back in its own format (gradalign_common.dataset_records): every source
format (VERL JSONL, VERL parquet, normalised parquet) to JSONL and parquet, loading back as the same problems."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradalign_common.dataset_records import subset_records, write_subset
from gradalign_common.datasets import load_problems
from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.prompts import encode_messages
from gradalign_common.records import PROBLEM_SCHEMA, Problem, write_problems


def _record(i: int, index: int | None) -> dict:
    record = {"prompt": [{"role": "user", "content": f"{i}+2="}], "data_source": "arith", "reward_model": {"ground_truth": str(i + 2)}}
    if index is not None:
        record["extra_info"] = {"index": index, "split": "train"}
    return record


# ids: 100, 101, "2" (position), 103, "4" (position), 105
RECORDS = [_record(i, None if i in (2, 4) else 100 + i) for i in range(6)]
WANTED = ["105", "2", "101", "not-there"]


def _roundtrip(tmp_path, subset, fmt):
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(write_subset(subset, fmt))
    return load_problems(out)


def _check(tmp_path, source):
    original = {p.problem_id: p for p in load_problems(source)}
    subset = subset_records(source, WANTED)
    assert subset.problem_ids == ["101", "2", "105"] and subset.indexed  # file order; unknown ids left out
    for fmt in ("jsonl", "parquet"):
        loaded = _roundtrip(tmp_path, subset, fmt)
        assert [p.problem_id for p in loaded] == ["101", "2", "105"]
        assert all(p == original[p.problem_id] for p in loaded)
    return subset


def test_verl_jsonl(tmp_path):
    source = tmp_path / "pool.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" + ("\n" if i == 1 else "") for i, r in enumerate(RECORDS)))  # a blank line
    subset = _check(tmp_path, source)
    assert subset.records[0] == RECORDS[1]  # as it was
    assert subset.records[1]["extra_info"] == {"index": 2}  # the position made explicit, an int like the file's


def test_verl_parquet_with_and_without_indexes(tmp_path):
    source = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), source)
    _check(tmp_path, source)
    indexed = tmp_path / "indexed.parquet"
    pq.write_table(pa.Table.from_pylist([_record(i, 100 + i) for i in range(6)]), indexed)
    subset = subset_records(indexed, ["103"])
    assert not subset.indexed
    table = pq.read_table(io.BytesIO(write_subset(subset, "parquet")))
    assert table.schema.equals(pq.read_schema(indexed)) and table.num_rows == 1  # the file's own schema


def test_normalised_parquet(tmp_path):
    prompts = [encode_messages([{"role": "user", "content": f"{i}+1="}]) for i in range(4)]  # as import_dataset writes them
    source = write_problems(tmp_path / "norm.parquet", [Problem(f"id-{i}", prompts[i], "arith", str(i + 1)) for i in range(4)])
    subset = subset_records(source, ["id-3", "id-1"])
    assert subset.normalised and subset.problem_ids == ["id-1", "id-3"]
    assert pq.read_table(io.BytesIO(write_subset(subset, "parquet"))).schema.equals(PROBLEM_SCHEMA)
    original = {p.problem_id: p for p in load_problems(source)}
    for fmt in ("jsonl", "parquet"):
        assert _roundtrip(tmp_path, subset, fmt) == [original["id-1"], original["id-3"]]
    first = json.loads(write_subset(subset, "jsonl").decode().splitlines()[0])
    assert first == {
        "prompt": [{"role": "user", "content": "1+1="}], "data_source": "arith", "reward_model": {"ground_truth": "2"},
        "extra_info": {"index": "id-1"},
    }


def test_nothing_wanted_and_what_cannot_be_written(tmp_path):
    source = tmp_path / "pool.jsonl"
    mixed = [RECORDS[0], {**RECORDS[1], "prompt": "1+2="}]  # one prompt a chat, one a string: fine in JSONL
    source.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    assert write_subset(subset_records(source, ["nope"]), "jsonl") == b""
    assert pq.read_table(io.BytesIO(write_subset(subset_records(source, []), "parquet"))).num_rows == 0
    both = subset_records(source, ["100", "101"])
    assert len(write_subset(both, "jsonl").splitlines()) == 2
    with pytest.raises(InvalidInputError, match="export them as JSONL"):
        write_subset(both, "parquet")
    with pytest.raises(NotFoundError):
        subset_records(tmp_path / "gone.jsonl", ["1"])
