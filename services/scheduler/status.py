"""The statuses of experiments, rounds and stages, in one place.

They are `StrEnum`s: stored as their plain string in the database and in the API, and equal
to that string, so a row read back compares with the enum directly.
"""

from __future__ import annotations

import enum


class ExperimentStatus(enum.StrEnum):
    PENDING = "pending"  # created, not yet picked up by an orchestrator
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RoundStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"


class StageStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


# an orchestrator drives these; the others have ended
ACTIVE: tuple[ExperimentStatus, ...] = (ExperimentStatus.PENDING, ExperimentStatus.RUNNING)
TERMINAL: tuple[ExperimentStatus, ...] = (ExperimentStatus.COMPLETED, ExperimentStatus.FAILED, ExperimentStatus.CANCELLED)
# a stage in one of these is done for its round
STAGE_DONE: tuple[StageStatus, ...] = (StageStatus.SUCCEEDED, StageStatus.SKIPPED)
