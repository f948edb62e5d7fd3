"""Helpers for scheduler tests: settings over a temp home, a valid experiment body."""

from __future__ import annotations

import time
from pathlib import Path

from services.scheduler.settings import SchedulerSettings
from services.scheduler.status import TERMINAL

TEST_TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


def emptied_database(url: str) -> str:
    """`url` with the scheduler's tables (and Alembic's version row) dropped: a fresh database for a test."""
    from sqlalchemy import create_engine, text

    from services.scheduler.db import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    return url


def make_settings(tmp_path: Path, database_url: str, **overrides) -> SchedulerSettings:
    values = dict(
        database_url=database_url,
        artifact_root=tmp_path / "artifacts",
        data_root=tmp_path,
        run_orchestrator=False,
        poll_interval_s=0.05,
        bootstrap_token=TEST_TOKEN,
    )
    values.update(overrides)
    return SchedulerSettings(**values)


def experiment_body(model_dir: Path, **overrides) -> dict:
    body = {
        "name": "t",
        "model": str(model_dir),
        "train_dataset": "arith-train",
        "val_dataset": "arith-val",
        "chunk_size": 16,
        "k": 4,
        "mode": "sim",
        "num_selections": 2,
        "train_batch_size": 4,
        "iters_per_select": 1,
        "n_samples_train": 4,
        "n_samples_val": 4,
        "max_tokens": 4,
        "seed": 0,
    }
    body.update(overrides)
    return body


def wait_for_experiment(client, exp_id: int, timeout: float = 300.0, poll: float = 0.3) -> dict:
    """Poll GET /api/v1/experiments/{id} until it completes, fails or is cancelled; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    exp: dict = {}
    while time.monotonic() < deadline:
        exp = client.get(f"/api/v1/experiments/{exp_id}").json()
        if exp["status"] in TERMINAL:
            return exp
        time.sleep(poll)
    raise AssertionError(f"experiment {exp_id} did not finish in {timeout}s: {exp}")
