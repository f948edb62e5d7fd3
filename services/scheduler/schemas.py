"""Request and response bodies of the scheduler's REST API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from gradalign_common.errors import InvalidInputError
from gradalign_common.scoring_methods import parse_method
from gradalign_common.selection import mode_names


def _as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; every stored time is UTC, so say so (RFC 3339 needs an offset)."""
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


UtcDatetime = Annotated[dt.datetime, AfterValidator(_as_utc)]


class ExperimentCreate(BaseModel):
    """An experiment: the reference's knobs (shared/seed/) plus a few of the trainer's."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="experiment", min_length=1, max_length=200)
    model: str = Field(min_length=1, description="local Hugging Face model directory of the starting checkpoint")
    train_dataset: str = Field(min_length=1, description="built-in name (arith-train) or a local .jsonl/.parquet file")
    val_dataset: str = Field(min_length=1, description="built-in name (arith-val) or a local .jsonl/.parquet file")
    chunk_size: int = Field(ge=1, description="M: candidate problems per round")
    k: int = Field(ge=1, description="keep M/k candidates per round")
    mode: str = Field(default="sim", description="selection mode")
    num_selections: int = Field(ge=1, le=100_000, description="rounds")
    train_batch_size: int = Field(ge=1, description="problems per GRPO step")
    iters_per_select: int = Field(ge=1, description="GRPO steps per round")
    n_samples_train: int = Field(default=8, ge=1, le=4096, description="k_r: responses per candidate")
    n_samples_val: int = Field(default=8, ge=1, le=4096, description="k_v: responses per validation problem")
    max_tokens: int = Field(default=8, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    clip_eps: float = Field(default=0.2, gt=0.0, le=1.0)
    kl_coef: float = Field(default=0.0, ge=0.0)
    micro_batch_size: int = Field(default=64, ge=1)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    reuse_rollouts: bool = Field(
        default=True, description="the first GRPO step of a round reuses the selected problems' scoring rollouts"
    )
    keep_last_checkpoints: int | None = Field(
        default=None, ge=1, description="keep only the last N round checkpoints (plus keep_best_checkpoints); None keeps all"
    )
    keep_best_checkpoints: int = Field(default=1, ge=0, description="with keep_last_checkpoints: also keep the N best by validation reward")
    priority: float = Field(
        default=1.0, gt=0.0, le=100.0,
        description="share of contended worker time: an experiment of priority 2 gets about twice the worker time of one of priority 1",
    )
    scoring_method: str = Field(
        default="exact",
        description="how scoring computes the gradients: exact (the spec), exact-loop, or an approximation "
        "project[-K], top-layers[-N], fewer-responses[-M]",
    )
    scoring_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="model dtype for scoring; auto: the scoring service's setting (bfloat16 on CUDA, float32 on CPU)"
    )

    @field_validator("scoring_method")
    @classmethod
    def _known_scoring_method(cls, v: str) -> str:
        try:
            return parse_method(v).name
        except InvalidInputError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        if v not in mode_names():
            raise ValueError(f"unknown mode {v!r}; choose one of {', '.join(mode_names())}")
        return v

    @field_validator("k")
    @classmethod
    def _k_fits_chunk(cls, v: int, info: ValidationInfo) -> int:
        m = info.data.get("chunk_size")
        if m is not None and v > m:
            raise ValueError(f"k={v} keeps fewer than one of chunk_size={m} candidates per round")
        return v

    @field_validator("train_batch_size")
    @classmethod
    def _batch_fits_selection(cls, v: int, info: ValidationInfo) -> int:
        m, k = info.data.get("chunk_size"), info.data.get("k")
        if m is not None and k is not None and v > m // k:
            raise ValueError(f"train_batch_size={v} is larger than the {m // k} problems selected per round (chunk_size/k)")
        return v

    @field_validator("iters_per_select")
    @classmethod
    def _reference_constraint(cls, v: int, info: ValidationInfo) -> int:
        m, k, b = info.data.get("chunk_size"), info.data.get("k"), info.data.get("train_batch_size")
        if None not in (m, k, b) and (k * b * v) % m != 0:
            raise ValueError(
                f"(k * train_batch_size * iters_per_select) % chunk_size must be 0; got ({k} * {b} * {v}) % {m} = {(k * b * v) % m}"
            )
        return v


class StageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    status: str
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
    status: str
    checkpoint_in: str
    checkpoint_out: str | None
    validation_reward: float | None
    candidate_accuracy: float | None
    compute_seconds: float
    overhead_seconds: float | None
    started_at: UtcDatetime
    finished_at: UtcDatetime | None
    stages: list[StageOut]


class ExperimentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    status: str
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


DatasetName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]


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
