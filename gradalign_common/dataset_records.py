"""Some problems of a dataset file, written back in the file's own record format (to fix or drop them).

`subset_records` reads a dataset file (as gradalign_common.datasets.load_problems reads it) and
returns the raw records of the named problems, in file order, with a problem's id derived as the
loader derives it: a VERL record's extra_info.index, else its position among the file's records;
a normalised parquet's (import_dataset's output) problem_id column.

`write_subset` writes those records as JSONL or parquet so that they load back, with the loader,
as the same problems with the same ids:
- VERL records (JSONL or parquet) are written as they are; a record whose id was its position
  gets extra_info.index set to that position, since out of its file its position changes;
- a parquet source written as parquet keeps the file's schema when no record needed an index;
- a normalised parquet's rows stay normalised rows in parquet, and become VERL records in JSONL
  (prompt: the chat messages, reward_model.ground_truth, extra_info.index: the problem id), the
  JSONL form the loader reads.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.records import PROBLEM_SCHEMA

RecordFormat = Literal["jsonl", "parquet"]


@dataclass(frozen=True)
class RecordSubset:
    """Raw records of some problems of one dataset file, in file order."""

    records: list[dict[str, Any]]
    problem_ids: list[str]
    normalised: bool  # the file is a normalised parquet (problem_id, prompt, data_source, ground_truth)
    schema: pa.Schema | None  # a parquet file's schema, kept when the records can be written with it
    indexed: bool  # some record got extra_info.index (its id was its position)


def _record_id(record: Any, position: int) -> tuple[str, bool]:
    """(problem id, whether it came from the position) of a VERL record, as the loader derives it."""
    extra = record.get("extra_info") if isinstance(record, dict) else None
    if isinstance(extra, dict) and "index" in extra:
        return str(extra["index"]), False
    return str(position), True


def _with_index(record: dict[str, Any], index: int | str) -> dict[str, Any]:
    extra = record.get("extra_info")
    return {**record, "extra_info": {**(extra if isinstance(extra, dict) else {}), "index": index}}


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="strict").strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path.name}:{lineno}: not valid JSON ({exc.msg})") from None


def _parquet_rows(pf: pq.ParquetFile) -> Iterator[dict[str, Any]]:
    for batch in pf.iter_batches(batch_size=1024, use_threads=False):
        yield from batch.to_pylist()


def subset_records(path: str | Path, problem_ids: Collection[str]) -> RecordSubset:
    """The raw records of `problem_ids` in the dataset file at `path` (ids it lacks are left out)."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"dataset file not found: {p.name}")
    wanted = set(problem_ids)
    records, ids, positional_at = [], [], []
    schema, normalised = None, False
    try:
        if p.suffix == ".parquet":
            pf = pq.ParquetFile(p)
            schema = pf.schema_arrow
            normalised = set(schema.names) == set(PROBLEM_SCHEMA.names)
            rows: Iterator[dict[str, Any]] = _parquet_rows(pf)
        elif p.suffix in (".jsonl", ".json"):
            rows = _jsonl_records(p)
        else:
            raise InvalidInputError(f"{p.name}: unsupported dataset format {p.suffix!r}")
        for position, row in enumerate(rows):
            pid, positional = (str(row.get("problem_id")), False) if normalised else _record_id(row, position)
            if pid not in wanted:
                continue
            if positional:
                positional_at.append(len(records))
            records.append(row)
            ids.append(pid)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{p.name}: cannot be read ({exc})") from None
    # an index added where the id was the position takes the type the file's own indexes have (one column type)
    positional = set(positional_at)
    explicit = [records[i]["extra_info"]["index"] for i in range(len(records)) if i not in positional and not normalised]
    as_text = any(isinstance(index, str) for index in explicit)
    for i in positional_at:
        records[i] = _with_index(records[i], ids[i] if as_text else int(ids[i]))
    return RecordSubset(records, ids, normalised, schema, bool(positional_at))


def _as_verl(row: dict[str, Any]) -> dict[str, Any]:
    """A normalised row as the VERL record the JSONL loader reads back into the same problem."""
    try:
        prompt = json.loads(row["prompt"])
    except (TypeError, ValueError):
        prompt = row["prompt"]
    return {
        "prompt": prompt,
        "data_source": row["data_source"],
        "reward_model": {"ground_truth": row["ground_truth"]},
        "extra_info": {"index": row["problem_id"]},
    }


def write_subset(subset: RecordSubset, fmt: RecordFormat) -> bytes:
    """The subset's records as a JSONL or parquet file's bytes (see the module doc)."""
    if fmt == "jsonl":
        rows = [_as_verl(r) for r in subset.records] if subset.normalised else subset.records
        return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows).encode()
    keep_schema = subset.schema is not None and (subset.normalised or not subset.indexed)
    try:
        if keep_schema:
            table = pa.Table.from_pylist(subset.records, schema=subset.schema)
        elif subset.records:
            table = pa.Table.from_pylist(subset.records)
        else:
            table = pa.table({})
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InvalidInputError(f"these records cannot be written as one parquet table ({exc}); export them as JSONL") from None
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
