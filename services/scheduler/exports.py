"""An experiment's candidates as a downloadable file: CSV or parquet, one row a candidate.

The rows come from `ExperimentService.export_rows`, as tuples in the order of CANDIDATE_COLUMNS.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Iterable, Literal

import pyarrow as pa
import pyarrow.parquet as pq

ExportFormat = Literal["csv", "parquet"]

CANDIDATE_SCHEMA = pa.schema(
    [
        ("round", pa.int32()), ("problem_id", pa.string()), ("n_responses", pa.int32()), ("accuracy", pa.float64()),
        ("mean_reward", pa.float64()), ("mean_response_length", pa.float64()), ("score", pa.float64()),
        ("zero_advantage", pa.bool_()), ("selected", pa.bool_()), ("rank", pa.int32()),
    ]
)
CANDIDATE_COLUMNS: tuple[str, ...] = tuple(CANDIDATE_SCHEMA.names)


@dataclass(frozen=True)
class ExportFile:
    filename: str
    media_type: str
    content: bytes


def candidates_file(experiment_id: int, rows: Iterable[tuple], fmt: ExportFormat) -> ExportFile:
    filename = f"experiment-{experiment_id}-candidates.{fmt}"
    if fmt == "csv":
        return ExportFile(filename, "text/csv", _csv(rows))
    return ExportFile(filename, "application/vnd.apache.parquet", _parquet(rows))


def _csv(rows: Iterable[tuple]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CANDIDATE_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _parquet(rows: Iterable[tuple]) -> bytes:
    table = pa.Table.from_pylist([dict(zip(CANDIDATE_COLUMNS, r)) for r in rows], schema=CANDIDATE_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
