"""Settings of the trainer service, from GRADALIGN_TRAINER_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from gradalign_common.settings import WorkerSettings


class TrainerSettings(WorkerSettings):
    """The trainer worker's settings: the common worker settings, port 50053, where checkpoints go.

    backend: `torch` trains in this process (CPU or one GPU); `verl` runs verl's GRPO trainer
    for GPU clusters (services/trainer/backends/verl), with the `verl_*` knobs below
    (services.trainer.backends chooses between them).
    verl_launcher: where verl's trainer runs (services.trainer.backends.verl.launcher): `local`,
    a subprocess of this service (one node); `ray`, a job on the Ray cluster at `ray_address`
    (Ray's Job Submission API, several nodes), with the `ray_*` knobs below. Either way the
    model merger runs here, and with `ray` the scratch directory (verl_work_dir, else beside the
    output) and the checkpoints must be on the artifact store that the Ray pods mount at the
    same path.
    policy_loss: the GRPO policy loss, a name registered in services.trainer.losses (verl's
    `loss_mode` of the same name with the verl backend); an unknown name fails at start-up.
    """

    model_config = SettingsConfigDict(env_prefix="GRADALIGN_TRAINER_", extra="ignore")

    port: int = Field(default=50053, ge=0, le=65535)
    dtype: str = Field(default="float32", description="dtype the model is loaded and trained in")
    checkpoint_root: Path | None = Field(
        default=None, description="base of relative checkpoint paths in requests; None = artifact_root"
    )
    backend: Literal["torch", "verl"] = "torch"
    policy_loss: str = Field(default="vanilla", description="policy loss (services.trainer.losses registry)")

    # checkpoint housekeeping (gradalign_common/checkpoint_retention.py). The trainer itself only sweeps
    # stale temporaries at start-up; pruning is the scheduler's (its run spec's keep_*_checkpoints),
    # so keep_last and keep_best are not read by the trainer.
    keep_last: int = Field(default=3, ge=1, description="retention: keep the latest N round checkpoints")
    keep_best: int = Field(default=1, ge=0, description="retention: also keep the N best by validation reward")
    stale_temp_minutes: float | None = Field(
        default=60.0,
        ge=0,
        description="at start-up remove temporaries under the checkpoint root untouched this long; None = never",
    )

    # verl backend
    verl_python: str = Field(default="python3", description="the interpreter that has verl installed")
    verl_n_gpus_per_node: int = Field(default=1, ge=1)
    verl_nnodes: int = Field(default=1, ge=1)
    verl_tensor_parallel_size: int = Field(default=1, ge=1, description="vLLM rollout tensor parallelism")
    verl_gpu_memory_utilization: float = Field(default=0.6, gt=0, le=1, description="vLLM's share of each GPU")
    verl_micro_batch_size_per_gpu: int = Field(default=4, ge=1, description="responses per forward/backward per GPU")
    verl_max_prompt_length: int = Field(default=1024, ge=1, description="at least; raised to the longest prompt")
    verl_attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="attention of verl's FSDP actor/reference; flash_attention_2 needs flash-attn in verl's environment",
    )
    verl_extra_overrides: list[str] = Field(default_factory=list, description="Hydra overrides appended last")
    verl_work_dir: Path | None = Field(
        default=None, description="scratch for verl's dataset and FSDP checkpoints; None = beside the output"
    )
    verl_timeout_s: float | None = Field(default=None, gt=0, description="limit of one verl run; None = none")
    verl_launcher: Literal["local", "ray"] = Field(
        default="local", description="local = a subprocess here; ray = a job on the Ray cluster at ray_address"
    )

    # verl on a Ray cluster (verl_launcher=ray; services/trainer/backends/verl/ray_launcher.py)
    ray_address: str | None = Field(
        default=None, description="the Ray head's job-submission (dashboard) address, e.g. http://raycluster-head-svc:8265"
    )
    ray_entrypoint_python: str = Field(
        default="python3", description="the interpreter, on the Ray cluster, that has verl installed"
    )
    ray_working_dir: str | None = Field(
        default=None,
        description="the job's runtime_env working_dir (a local directory Ray uploads, or a remote URI); "
        "None = our package is installed in the Ray image at the same path",
    )
    ray_env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment variables of the Ray job, added to verl's own"
    )
    ray_stop_timeout_s: float = Field(
        default=20.0, gt=0, description="how long a cancel waits for the Ray job to reach STOPPED"
    )

    @field_validator("policy_loss")
    @classmethod
    def _registered_policy_loss(cls, name: str) -> str:
        from services.trainer.losses import get_policy_loss  # torch: imported only when a trainer is configured

        get_policy_loss(name)  # InvalidInputError (a ValueError) naming the known losses
        return name

    @model_validator(mode="after")
    def _ray_launcher_is_complete(self) -> "TrainerSettings":
        if self.verl_launcher != "ray":
            return self
        if self.backend != "verl":
            raise ValueError(
                "GRADALIGN_TRAINER_VERL_LAUNCHER=ray needs GRADALIGN_TRAINER_BACKEND=verl "
                f"(the backend is {self.backend!r}, which launches nothing)"
            )
        if not self.ray_address:
            raise ValueError(
                "GRADALIGN_TRAINER_VERL_LAUNCHER=ray needs GRADALIGN_TRAINER_RAY_ADDRESS, the Ray head's "
                "job-submission address (e.g. http://raycluster-head-svc:8265)"
            )
        if not self.ray_address.startswith(("http://", "https://")):
            raise ValueError(
                f"GRADALIGN_TRAINER_RAY_ADDRESS must be the head's http(s) job-submission address "
                f"(e.g. http://raycluster-head-svc:8265), got {self.ray_address!r}"
            )
        return self

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

    def verl_options(self):
        """The verl_* settings as services.trainer.backends.verl.options.VerlOptions: each option is the
        setting of the same name with the `verl_` prefix."""
        from dataclasses import fields

        from services.trainer.backends.verl.options import VerlOptions

        values = {f.name: getattr(self, f"verl_{f.name}") for f in fields(VerlOptions)}
        return VerlOptions(**{**values, "extra_overrides": tuple(values["extra_overrides"])})
