"""Settings of the rollout service (env prefix GRADALIGN_ROLLOUT_)."""

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gradalign_common.settings import WorkerSettings


class RolloutSettings(WorkerSettings):
    model_config = SettingsConfigDict(env_prefix="GRADALIGN_ROLLOUT_", extra="ignore")

    port: int = Field(default=50051, ge=0, le=65535)
    backend: Literal["hf"] = "hf"
    dtype: str = "float32"
    batch_size: int = Field(default=64, ge=1, description="prompts per generate call (each sampled n times)")
    max_model_len: int = Field(default=4096, ge=8, description="prompt + max_tokens must fit")
