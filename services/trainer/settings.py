"""Settings of the trainer service, from GRADALIGN_TRAINER_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gradalign_common.settings import WorkerSettings


class TrainerSettings(WorkerSettings):
    """The trainer worker's settings: the common worker settings, port 50053, where checkpoints go."""

    model_config = SettingsConfigDict(env_prefix="GRADALIGN_TRAINER_", extra="ignore")

    port: int = Field(default=50053, ge=0, le=65535)
    dtype: str = Field(default="float32", description="dtype the model is loaded and trained in")
    checkpoint_root: Path | None = Field(
        default=None, description="base of relative checkpoint paths in requests; None = artifact_root"
    )

    def resolved_checkpoint_root(self) -> Path:
        return self.checkpoint_root if self.checkpoint_root is not None else self.artifact_root

    def checkpoint_path(self, path: str) -> Path:
        """A request's checkpoint path: absolute as given, relative under the checkpoint root."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.resolved_checkpoint_root() / p

    def artifact_path(self, path: str) -> Path:
        """A request's data file path: absolute as given, relative under the artifact root."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.artifact_root / p
