"""ExperimentSpec: what an experiment is, the one place its defaults and validation live.

The API takes an `ExperimentSpec` as the body of POST /api/v1/experiments. The experiment
service resolves its references (model directory, dataset files) and stores a `StoredSpec`
(the spec plus the resolved paths) as JSON; the orchestrator parses the stored JSON back
into a `StoredSpec`, so every stage reads typed fields and the defaults are never restated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from gradalign_common.memory_budget import parse_memory_budget
from gradalign_common.round_policy import DEFAULT_SKIP_BASE, DEFAULT_SKIP_CAP, SkipDead
from gradalign_common.scoring_methods import parse_method
from gradalign_common.selection import mode_names


class ExperimentSpec(BaseModel):
    """An experiment as a user asks for it: the reference's knobs (shared/seed/) plus a few of the trainer's."""

    # NaN and infinities (JSON's non-standard NaN/Infinity, or 1e400) are refused with the field named
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(default="experiment", min_length=1, max_length=200)
    model: str = Field(min_length=1, max_length=4096, description="local Hugging Face model directory of the starting checkpoint")
    train_dataset: str = Field(min_length=1, max_length=4096, description="built-in name (arith-train) or a local .jsonl/.parquet file")
    val_dataset: str = Field(min_length=1, max_length=4096, description="built-in name (arith-val) or a local .jsonl/.parquet file")
    chunk_size: int = Field(ge=1, le=1_000_000, description="M: candidate problems per round")
    k: int = Field(ge=1, description="keep M/k candidates per round")
    mode: str = Field(default="sim", description="selection mode", json_schema_extra={"enum": mode_names()})
    num_selections: int = Field(ge=1, le=100_000, description="rounds")
    train_batch_size: int = Field(ge=1, le=100_000, description="problems per GRPO step")
    iters_per_select: int = Field(ge=1, le=100_000, description="GRPO steps per round")
    n_samples_train: int = Field(default=8, ge=1, le=1024, description="k_r: responses per candidate")
    n_samples_val: int = Field(default=8, ge=1, le=1024, description="k_v: responses per validation problem")
    max_tokens: int = Field(
        default=8, ge=1, le=1_000_000, description="response tokens; with the longest prompt it must fit the model's context"
    )
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    clip_eps: float = Field(default=0.2, gt=0.0, le=1.0)
    kl_coef: float = Field(default=0.0, ge=0.0, le=100.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=1e6, description="GRPO steps clip the gradient to this norm")
    micro_batch_size: int = Field(default=64, ge=1, le=65_536)
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
    scoring_memory_budget: str | None = Field(
        default=None, max_length=32,
        description="working memory of a scoring pass on top of the model: bytes (24GiB, 512MB) or a fraction of the "
        "scoring device's memory (0.8, 80%); batches are planned within it; None: the scoring service's setting",
    )
    skip_dead: bool = Field(
        default=False,
        description="skip dead problems before rollout (after GRESO): a candidate scored with zero advantage in its recent "
        "rounds is left out of the next chunk with probability min(skip_dead_cap, 1 - (1 - skip_dead_base) ** streak) "
        "and the chunk is filled from the pool instead; off by default",
    )
    skip_dead_base: float = Field(
        default=DEFAULT_SKIP_BASE, gt=0.0, le=1.0,
        description="with skip_dead: the skip probability after one zero-advantage round (it grows with the streak)",
    )
    skip_dead_cap: float = Field(
        default=DEFAULT_SKIP_CAP, ge=0.0, lt=1.0,
        description="with skip_dead: the largest skip probability, below 1 so a dead problem is re-tried now and then",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _storable_text(cls, v):
        """A NUL byte or a lone surrogate cannot be stored (PostgreSQL) nor named as a file: refused, field named."""
        if isinstance(v, str):
            if "\x00" in v:
                raise ValueError("contains a NUL byte")
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not valid Unicode (a lone surrogate)") from None
        return v

    @field_validator("scoring_method")
    @classmethod
    def _known_scoring_method(cls, v: str) -> str:
        return parse_method(v).name  # InvalidInputError is a ValueError: pydantic reports it on the field

    @field_validator("scoring_memory_budget")
    @classmethod
    def _is_a_memory_budget(cls, v: str | None) -> str | None:
        if v is not None:
            parse_memory_budget(v)
            v = v.strip()
        return v

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

    def skip_setting(self) -> SkipDead:
        """The round policy's skip setting (gradalign_common.round_policy.draw_chunk)."""
        return SkipDead(enabled=self.skip_dead, base=self.skip_dead_base, cap=self.skip_dead_cap)

    def scoring_dtype_request(self) -> str:
        """The dtype to put in score requests: "" leaves it to the scoring service's setting (auto)."""
        return "" if self.scoring_dtype == "auto" else self.scoring_dtype


class StoredSpec(ExperimentSpec):
    """The spec as stored with the experiment: `model` resolved to its directory, the datasets to their files."""

    train_dataset_path: str = Field(min_length=1)
    val_dataset_path: str = Field(min_length=1)
