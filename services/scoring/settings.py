"""Settings of the scoring service, from GRADALIGN_SCORING_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gradalign_common.settings import WorkerSettings
from services.scoring.batching import DEFAULT_MAX_BATCH_TOKENS


class ScoringSettings(WorkerSettings):
    """The scoring worker's settings: the common worker settings, port 50052, the default model dtype and the
    batch size (rows x width) of the batched exact scorer."""

    model_config = SettingsConfigDict(env_prefix="GRADALIGN_SCORING_", extra="ignore")

    port: int = Field(default=50052, ge=0, le=65535)
    dtype: str = Field(
        default="auto",
        description="model dtype when a request names none: float32, bfloat16, float16, float64, or auto "
        "(bfloat16 on CUDA, float32 on CPU)",
    )
    max_batch_tokens: int = Field(
        default=DEFAULT_MAX_BATCH_TOKENS, ge=1, description="rows x width of one batched forward of the exact scorer"
    )
