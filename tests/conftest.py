"""The tests' fixtures, in one place: models (the demo's warm-started tiny model, a random tiny model
for the trainer, a random tiny Qwen2 for scoring), rollouts for the scoring tests, and the
database and Redis URLs. Plain helpers (builders, expected values) live in the *_fixtures.py
modules and are imported where used.

PostgreSQL and Redis tests run whenever GRADALIGN_TEST_DATABASE_URL / GRADALIGN_TEST_REDIS_URL
are set (.ci/run sets them and fails if the servers are down).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from gradalign_common.tiny_model import TinyModelSpec, build_and_save
from scheduler_fixtures import emptied_database
from scoring_fixtures import random_rollouts, save_tiny_qwen2, tiny_qwen2
from trainer_fixtures import build_random_tiny_model

ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def models_root(tmp_path_factory) -> Iterator[Path]:
    """The scheduler's models root in every test (in-process settings and started stacks read it from the
    environment): pytest's base temporary directory, under which every test model is built."""
    root = tmp_path_factory.getbasetemp()
    previous = os.environ.get("GRADALIGN_SCHEDULER_MODELS_ROOT")
    os.environ["GRADALIGN_SCHEDULER_MODELS_ROOT"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("GRADALIGN_SCHEDULER_MODELS_ROOT", None)
    else:
        os.environ["GRADALIGN_SCHEDULER_MODELS_ROOT"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The warm-started tiny arithmetic model (the demo's) as a HF directory (built once per test session)."""
    out = tmp_path_factory.mktemp("models") / "tiny-arith"
    return build_and_save(out, TinyModelSpec())


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny model of the demo's architecture (no warm start): instant to build."""
    return build_random_tiny_model(tmp_path_factory.mktemp("trainer-model") / "tiny")


@pytest.fixture(scope="session")
def random_qwen2_dir(tmp_path_factory) -> Path:
    """The scoring tests' random tiny Qwen2 (scoring_fixtures.tiny_qwen2, seed 0) as a HF directory."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def model():
    """The scoring tests' random tiny Qwen2, in memory."""
    return tiny_qwen2(seed=0)


@pytest.fixture(scope="module")
def candidates():
    return random_rollouts(seed=1, n_problems=8, prefix="c")


@pytest.fixture(scope="module")
def validation():
    return random_rollouts(seed=2, n_problems=5, prefix="v")


def _database_urls() -> list:
    urls = [pytest.param("sqlite", id="sqlite")]
    pg = os.environ.get("GRADALIGN_TEST_DATABASE_URL")
    urls.append(pytest.param(pg, id="postgresql") if pg else pytest.param(None, id="postgresql", marks=pytest.mark.skip(reason="GRADALIGN_TEST_DATABASE_URL not set")))
    return urls


@pytest.fixture(params=_database_urls())
def database_url(request, tmp_path) -> str:
    """A clean database: a fresh SQLite file, or the test PostgreSQL with our tables dropped."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scheduler.db'}"
    return emptied_database(request.param)


@pytest.fixture
def postgresql_url() -> str:
    """The test PostgreSQL with our tables dropped, for tests that exist only for PostgreSQL; fails (never skips)
    without GRADALIGN_TEST_DATABASE_URL, which .ci/run always sets."""
    url = os.environ.get("GRADALIGN_TEST_DATABASE_URL")
    if not url:
        pytest.fail("GRADALIGN_TEST_DATABASE_URL is not set: this test needs PostgreSQL", pytrace=False)
    return emptied_database(url)


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("GRADALIGN_TEST_REDIS_URL")
    if not url:
        pytest.skip("GRADALIGN_TEST_REDIS_URL not set")
    return url
