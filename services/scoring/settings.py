"""Settings of the scoring service, from GRADALIGN_SCORING_* environment variables."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from gradalign_common.settings import WorkerSettings
from gradalign_common.memory_budget import DEFAULT_MEMORY_BUDGET, parse_memory_budget


class ScoringSettings(WorkerSettings):
    """The scoring worker's settings: the common worker settings, port 50052, the default model dtype, the
    memory budget of a scoring pass and, as an override, the batch size (rows x width) of the exact scorer."""

    model_config = SettingsConfigDict(env_prefix="GRADALIGN_SCORING_", extra="ignore")

    port: int = Field(default=50052, ge=0, le=65535)
    dtype: str = Field(
        default="auto",
        description="model dtype when a request names none: float32, bfloat16, float16, float64, or auto "
        "(bfloat16 on CUDA, float32 on CPU)",
    )
    memory_budget: str = Field(
        default=DEFAULT_MEMORY_BUDGET,
        description="working memory of a scoring pass on top of the loaded model, when a request names none: bytes "
        "(24GiB, 512MB) or a fraction of the device's memory (0.8, 80%); batches are planned to stay within it",
    )
    target_batch_tokens: Optional[int] = Field(
        default=None, ge=0,
        description="rows x width batches are packed to at most within the memory budget (a group is never split "
        "for it): unset, the device's default (on CPU the tokens whose activations take 768 MiB, where larger "
        "batches are no faster; none on CUDA); 0, none: batches fill the budget",
    )
    max_batch_tokens: Optional[int] = Field(
        default=None, ge=1,
        description="override: rows x width of one batched forward of the exact scorer, instead of the memory budget",
    )

    @field_validator("memory_budget")
    @classmethod
    def _is_a_memory_budget(cls, value: str) -> str:
        parse_memory_budget(value)  # InvalidInputError is a ValueError: pydantic reports it on the field
        return value
