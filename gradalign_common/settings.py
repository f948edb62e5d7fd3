"""Settings shared in shape by the worker services; each service subclasses with its own env prefix."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path.home() / ".gradalign"


class WorkerSettings(BaseSettings):
    """Common settings of a gRPC worker. Subclasses set env_prefix, e.g. GRADALIGN_SCORING_."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it")
    artifact_root: Path = DEFAULT_HOME / "artifacts"
    device: str = "cpu"
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    log_level: str = "INFO"
