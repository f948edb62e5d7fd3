"""Bulk writes that grow with candidates: COPY on PostgreSQL (inserts directly; updates through a
temporary table and one UPDATE ... FROM), executemany elsewhere.

Both run inside the caller's session transaction, so a failed ingest leaves nothing behind.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from sqlalchemy import insert, text, update
from sqlalchemy.orm import Session

from services.scheduler.db import Candidate, PoolProblem

BATCH = 50_000


def _is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def copy_rows(session: Session, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
    """COPY rows into table through the session's own connection (same transaction)."""
    raw = session.connection().connection.driver_connection  # psycopg.Connection
    with raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def insert_pool(session: Session, experiment_id: int, problem_ids: Sequence[str]) -> None:
    """The experiment's candidate pool in round order (position = index in problem_ids)."""
    if _is_postgresql(session):
        copy_rows(
            session,
            PoolProblem.__tablename__,
            ("experiment_id", "position", "problem_id"),
            ((experiment_id, i, pid) for i, pid in enumerate(problem_ids)),
        )
        return
    for start in range(0, len(problem_ids), BATCH):
        session.execute(
            insert(PoolProblem),
            [
                {"experiment_id": experiment_id, "position": start + i, "problem_id": pid}
                for i, pid in enumerate(problem_ids[start : start + BATCH])
            ],
        )


CANDIDATE_COLUMNS = ("round_id", "problem_id", "n_responses", "accuracy", "mean_reward", "mean_response_length", "selected")


def insert_candidates(session: Session, rows: Sequence[dict]) -> None:
    """Candidate rows (dicts with CANDIDATE_COLUMNS; score and rank come later)."""
    if _is_postgresql(session):
        copy_rows(session, Candidate.__tablename__, CANDIDATE_COLUMNS, (tuple(r[c] for c in CANDIDATE_COLUMNS) for r in rows))
        return
    for start in range(0, len(rows), BATCH):
        session.execute(insert(Candidate), list(rows[start : start + BATCH]))


def update_candidates(session: Session, rows: Sequence[dict]) -> None:
    """Bulk UPDATE by primary key: each dict has "id" and the columns to set (the same columns in
    every row). PostgreSQL: COPY into a temporary table, then one UPDATE ... FROM; elsewhere
    executemany."""
    if not rows:
        return
    columns = [c for c in rows[0] if c != "id"]
    if any(set(r) != set(rows[0]) for r in rows):
        raise ValueError("update_candidates: every row must set the same columns")
    unknown = [c for c in columns if c not in Candidate.__table__.c]
    if unknown or "id" not in rows[0]:
        raise ValueError(f"update_candidates: rows need 'id' and candidate columns; unknown: {unknown}")
    if _is_postgresql(session) and columns:
        staging = "gradalign_candidate_updates"
        quoted = [f'"{c}"' for c in columns]
        table = Candidate.__tablename__
        session.execute(text(f"DROP TABLE IF EXISTS {staging}"))
        session.execute(text(
            f"CREATE TEMPORARY TABLE {staging} ON COMMIT DROP AS SELECT id, {', '.join(quoted)} FROM {table} WITH NO DATA"
        ))
        copy_rows(session, staging, ("id", *columns), (tuple(r[c] for c in ("id", *columns)) for r in rows))
        assignments = ", ".join(f"{q} = u.{q}" for q in quoted)
        session.execute(text(f"UPDATE {table} AS c SET {assignments} FROM {staging} AS u WHERE c.id = u.id"))
        session.execute(text(f"DROP TABLE {staging}"))
        return
    for start in range(0, len(rows), BATCH):
        session.execute(update(Candidate), list(rows[start : start + BATCH]))
