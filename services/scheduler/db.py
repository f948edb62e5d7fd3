"""The scheduler's database: experiments, rounds, stages, candidates, selections, training metrics.

SQLAlchemy 2 models; SQLite on one machine, PostgreSQL by URL. Rows grow with
candidates, never with responses or tokens (ARCHITECTURE.md).
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_uid() -> str:
    return uuid.uuid4().hex


def parent_key(table: str):
    """A child row's key to its parent in `table`: indexed, and the child is deleted with the parent."""
    return mapped_column(ForeignKey(f"{table}.id", ondelete="CASCADE"), index=True)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: DateTime(timezone=True)}

    id: Mapped[int] = mapped_column(primary_key=True, sort_order=-1)  # every table's surrogate key, its first column


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (UniqueConstraint("uid", name="uq_experiments_uid"),)

    # never reused (SQLite hands a deleted row's id to the next one): keys the artifact directory and every
    # worker request id, so no experiment can meet another's outputs
    uid: Mapped[str] = mapped_column(String(36), default=new_uid)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), index=True)  # services.scheduler.status.ExperimentStatus
    config: Mapped[dict[str, Any]]
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    current_stage: Mapped[str | None] = mapped_column(String(40), nullable=True)
    checkpoint: Mapped[str] = mapped_column(Text)  # the checkpoint the next round starts from
    pool_size: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    status_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # which scheduler replica drives this experiment, until when (renewed while it works)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)

    rounds: Mapped[list["Round"]] = relationship(back_populates="experiment", order_by="Round.index", cascade="all, delete-orphan")


class PoolProblem(Base):
    """The experiment's candidate pool in round order: chunk r is positions [r*M, (r+1)*M) mod pool size."""

    __tablename__ = "pool_problems"
    __table_args__ = (UniqueConstraint("experiment_id", "position"),)

    experiment_id: Mapped[int] = parent_key("experiments")
    position: Mapped[int] = mapped_column(Integer)
    problem_id: Mapped[str] = mapped_column(String(200))


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("experiment_id", "index"),)

    experiment_id: Mapped[int] = parent_key("experiments")
    index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20))  # services.scheduler.status.RoundStatus
    checkpoint_in: Mapped[str] = mapped_column(Text)
    checkpoint_out: Mapped[str | None] = mapped_column(Text, nullable=True)
    validation_reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    candidate_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    overhead_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the round's walk over the pool (gradalign_common.round_policy.draw_chunk): start and next cursor (modulo the
    # pool size), candidates skipped as dead and what that saved; null for rounds stored before migration 0004
    chunk_start: Mapped[int | None] = mapped_column(Integer, nullable=True)
    chunk_end: Mapped[int | None] = mapped_column(Integer, nullable=True)
    skipped_candidates: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rollouts_saved: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_saved: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)

    experiment: Mapped[Experiment] = relationship(back_populates="rounds")
    stages: Mapped[list["Stage"]] = relationship(back_populates="round", order_by="Stage.id", cascade="all, delete-orphan")


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("round_id", "name"),)

    round_id: Mapped[int] = parent_key("rounds")
    name: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))  # services.scheduler.status.StageStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_unit: Mapped[str | None] = mapped_column(String(20), nullable=True)
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # waiting at the scheduler for a worker slot (the longest wait of the stage's parallel requests)
    queued_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    result: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)

    round: Mapped[Round] = relationship(back_populates="stages")


class Candidate(Base):
    """One candidate problem of one round: rollout aggregates, score and selection."""

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("round_id", "problem_id"),)

    round_id: Mapped[int] = parent_key("rounds")
    problem_id: Mapped[str] = mapped_column(String(200))
    n_responses: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Float)
    mean_reward: Mapped[float] = mapped_column(Float)
    mean_response_length: Mapped[float] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    zero_advantage: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    selected: Mapped[bool] = mapped_column(Boolean, default=False)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)


class TrainStep(Base):
    __tablename__ = "train_steps"
    __table_args__ = (UniqueConstraint("round_id", "step"),)

    round_id: Mapped[int] = parent_key("rounds")
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]


class ApiToken(Base):
    """A bearer token for mutating (and optionally reading) the API; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class Dataset(Base):
    """A registered dataset: a parquet/JSONL file of problem records and its summary."""

    __tablename__ = "datasets"

    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    n_rows: Mapped[int] = mapped_column(Integer)
    data_sources: Mapped[dict[str, Any]]  # data_source -> row count
    origin: Mapped[dict[str, Any]]  # how it was made: upload, register, mix
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[1] if "///" in url else ""
        if db_path and db_path != ":memory:":
            Path(db_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # foreign keys + WAL for concurrent API reads
            cur = conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
