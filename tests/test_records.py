"""gradalign_common.records.read_rollouts with a problem filter (parquet filtered as read, JSONL after parsing)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradalign_common.errors import InvalidInputError
from gradalign_common.records import RolloutRecord, read_rollouts, write_rollouts, write_rollouts_jsonl

ROLLOUTS = [RolloutRecord(f"p{i % 3}", (1, 2), (3, i + 4), float(i % 2), bool(i % 2)) for i in range(7)]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_only_the_wanted_problems_in_file_order(tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    (write_rollouts if suffix == ".parquet" else write_rollouts_jsonl)(path, ROLLOUTS)
    everything = read_rollouts(path)
    assert [r.problem_id for r in everything] == [r.problem_id for r in ROLLOUTS]
    wanted = read_rollouts(path, {"p0", "p2", "absent"})
    assert wanted == [r for r in everything if r.problem_id in {"p0", "p2"}]
    assert read_rollouts(path, set()) == []


def test_a_parquet_file_missing_a_column_is_refused_with_or_without_a_filter(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt_ids": [[1]], "response_ids": [[2]], "reward": [1.0]}), path)
    for problem_ids in (None, {"p0"}, set()):
        with pytest.raises(InvalidInputError, match="missing column.*problem_id"):
            read_rollouts(path, problem_ids)


def test_an_empty_jsonl_file_is_refused_even_with_a_filter(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(InvalidInputError, match="no rollout records"):
        read_rollouts(path, {"p0"})
