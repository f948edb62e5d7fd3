"""Shared helpers and fixtures of the trainer tests (import the fixtures a test module uses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradalign_common.prompts import encode_messages
from gradalign_common.records import Problem
from gradalign_common.tiny_model import TinyModelSpec, build_and_save

ANSWER = "7"


def constant_answer_problems(n: int, answer: str = ANSWER) -> list[Problem]:
    """n distinct prompts ("0:", "1:", ...) that all have the same exact-match answer."""
    return [
        Problem(
            problem_id=str(i),
            prompt=encode_messages([{"role": "user", "content": f"{i}:"}]),
            data_source="exact_match",
            ground_truth=answer,
        )
        for i in range(n)
    ]


def build_random_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model (no warm start): instant to build."""
    return build_and_save(out_dir, TinyModelSpec(warmup_steps=0, seed=seed))


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory) -> Path:
    return build_random_tiny_model(tmp_path_factory.mktemp("trainer-model") / "tiny")
