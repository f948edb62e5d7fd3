"""Request and response bodies of the scheduler's REST API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from services.scheduler.spec import ExperimentSpec
from services.scheduler.status import ExperimentStatus, RoundStatus, StageStatus

__all__ = ["ExperimentSpec"]  # the body of POST /api/v1/experiments lives with the rest of the spec


def _as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; every stored time is UTC, so say so (RFC 3339 needs an offset)."""
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


UtcDatetime = Annotated[dt.datetime, AfterValidator(_as_utc)]


class StageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    status: StageStatus
    attempts: int
    error: str | None
    progress_done: int
    progress_total: int
    progress_unit: str | None
    compute_seconds: float
    queued_seconds: float
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class RoundOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    status: RoundStatus
    checkpoint_in: str
    checkpoint_out: str | None
    validation_reward: float | None
    candidate_accuracy: float | None
    compute_seconds: float
    overhead_seconds: float | None
    skipped_candidates: int | None = Field(
        default=None, description="dead problems (zero advantage in their recent rounds) left out of this round's chunk by "
        "skip_dead and replaced from the pool; 0 with skipping off; null for rounds from before the count existed",
    )
    rollouts_saved: int | None = Field(default=None, description="responses not generated: skipped_candidates x n_samples_train")
    tokens_saved: float | None = Field(
        default=None, description="generated tokens saved, estimated from the skipped problems' last mean response length",
    )
    chunk_start: int | None = Field(default=None, description="pool position (modulo the pool size) where the round's chunk began")
    chunk_end: int | None = Field(default=None, description="pool position where the next round's chunk begins")
    started_at: UtcDatetime
    finished_at: UtcDatetime | None
    stages: list[StageOut]


class ExperimentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    uid: str = Field(description="the experiment's never-reused identity: it keys its artifacts and every worker request")
    name: str
    status: ExperimentStatus
    config: dict[str, Any]
    current_round: int
    current_stage: str | None
    checkpoint: str
    pool_size: int
    error: str | None
    status_detail: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class ExperimentList(BaseModel):
    items: list[ExperimentOut]
    total: int
    offset: int
    limit: int


class CandidateOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    problem_id: str
    n_responses: int
    accuracy: float
    mean_reward: float
    mean_response_length: float
    score: float | None
    zero_advantage: bool | None
    selected: bool
    rank: int | None


class CandidateList(BaseModel):
    round: int
    items: list[CandidateOut]
    total: int
    offset: int
    limit: int


class TrainStepOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    metrics: dict[str, Any]


class ResponseOut(BaseModel):
    text: str
    reward: float
    correct: bool
    n_tokens: int
    finish_reason: str


class ProblemDetail(BaseModel):
    problem_id: str
    round: int
    prompt: str | None
    ground_truth: str | None
    data_source: str | None
    score: float | None
    accuracy: float
    selected: bool
    rank: int | None
    responses: list[ResponseOut]


class ErrorOut(BaseModel):
    detail: str | list[dict[str, Any]]


class ReadinessOut(BaseModel):
    ready: bool
    checks: dict[str, bool]


DATASET_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
DatasetName = Annotated[str, Field(min_length=1, max_length=128, pattern=DATASET_NAME_PATTERN)]


class DatasetRegister(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DatasetName
    path: str = Field(min_length=1, description="a .jsonl or .parquet file under the scheduler's data root")


class MixSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: DatasetName
    count: int = Field(default=0, ge=0, description="problems to take (0: all)")


class DatasetMix(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DatasetName
    sources: list[MixSource] = Field(min_length=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    n_rows: int
    data_sources: dict[str, int]
    origin: dict[str, Any]
    created_at: UtcDatetime


class SuspectEvidenceOut(BaseModel):
    round: int
    flagged: bool = Field(description="whether the rule flagged the problem in this round")
    score: float | None = Field(description="the candidate's stored score in the experiment's mode")
    alignment: float | None = Field(
        description="cos(g_i, g_V) read back from the score (in mode dot: <g_i, g_V>, the same sign); "
        "null for a zero-advantage candidate"
    )
    z: float | None = Field(description="robust z-score of the alignment within the round (rule robust_z)")
    accuracy: float
    zero_advantage: bool
    problem_path: str = Field(description="the API path of the problem's prompt, responses and rewards in this round")


class SuspectOut(BaseModel):
    problem_id: str
    status: Literal["suspect", "watch"]
    rounds_flagged: list[int]
    rounds_seen: int = Field(description="scored rounds in which the problem was a candidate")
    worst_alignment: float | None = Field(description="the lowest alignment over the rounds it was flagged in")
    mean_accuracy: float
    evidence: list[SuspectEvidenceOut] = Field(description="every scored round in which it was a candidate, by round")


class SuspectCounts(BaseModel):
    suspect: int
    watch: int


class SuspectList(BaseModel):
    experiment_id: int
    mode: str
    available: bool = Field(description="false when the experiment's mode gives no flags (see reason)")
    reason: str | None
    rule: str
    threshold: float
    min_rounds: int = Field(description="flagged in this many rounds makes a problem a suspect; fewer, watch")
    rounds_used: list[int] = Field(description="the rounds whose scores were read")
    rounds_skipped: list[int] = Field(description="scored rounds left out: they fell back to random scores")
    counts: SuspectCounts = Field(description="problems per status, before the status filter")
    items: list[SuspectOut]
    total: int
    offset: int
    limit: int
