"""Settings of the scheduler (env prefix GRADALIGN_SCHEDULER_)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gradalign_common.errors import InvalidInputError
from gradalign_common.settings import DEFAULT_HOME
from gradalign_common.suspects import get_rule, rule_names


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRADALIGN_SCHEDULER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    database_url: str = f"sqlite:///{DEFAULT_HOME / 'scheduler.db'}"
    redis_url: str | None = Field(default=None, description="Redis for live events; None: in-process bus")
    artifact_root: Path = DEFAULT_HOME / "artifacts"
    data_root: Path = Field(
        default=DEFAULT_HOME / "data", description="dataset files named by path must lie under it (or the artifact store)"
    )
    models_root: Path = Field(
        default=DEFAULT_HOME / "models",
        description="model directories experiments name must lie under it (or the artifact store, which holds "
        "checkpoints); a relative `model` is taken relative to it",
    )
    rollout_addresses: list[str] = ["127.0.0.1:50051"]
    scoring_addresses: list[str] = ["127.0.0.1:50052"]
    trainer_address: str = "127.0.0.1:50053"
    max_upload_bytes: int = Field(default=1 << 30, ge=1, description="largest dataset upload accepted (bytes as sent)")
    max_dataset_rows: int = Field(default=1_000_000, ge=1, description="most rows a dataset (upload, register, mix) may have")
    max_dataset_bytes: int = Field(
        default=2 << 30, ge=1, description="most bytes a dataset's rows may take once decompressed and decoded"
    )
    max_field_chars: int = Field(default=1 << 20, ge=1, description="longest string one field of a dataset row may hold")
    max_event_streams: int = Field(default=256, ge=1, description="live event streams open at once; more get 429")
    max_event_streams_per_client: int = Field(default=16, ge=1, description="live event streams one client address may hold")
    max_generated_tokens_per_experiment: int = Field(
        default=10**10, ge=1,
        description="budget: responses x max_tokens summed over an experiment's rounds (rollouts and training samples)",
    )
    max_train_steps_per_experiment: int = Field(default=10**6, ge=1, description="budget: GRPO steps over all rounds")
    discovery: Literal["static", "kubernetes"] = Field(
        default="static", description="static: the address lists above; kubernetes: ready pods from EndpointSlices"
    )
    discovery_namespace: str | None = None
    rollout_service: str | None = None
    scoring_service: str | None = None
    trainer_service: str | None = None
    discovery_port_name: str = "grpc"
    discovery_refresh_s: float = Field(default=5.0, gt=0)
    worker_deadline_s: float = Field(default=3600.0, gt=0, description="deadline of one worker call")
    retry_limit: int = Field(default=20, ge=0, description="retries of a stage whose worker is unavailable")
    retry_backoff_s: float = Field(default=1.0, ge=0, description="first backoff; doubles up to retry_backoff_max_s")
    retry_backoff_max_s: float = Field(default=30.0, ge=0)
    poll_interval_s: float = Field(default=0.5, gt=0)
    cancel_poll_s: float = Field(
        default=0.5, gt=0, description="how often the experiments being driven are checked for a cancel or delete "
        "(from any replica); their in-flight worker calls are then cancelled"
    )
    max_parallel_experiments: int = Field(
        default=8, ge=1, description="experiments this replica advances at the same time (each in its own thread)"
    )
    rollout_slots: int = Field(default=1, ge=1, description="requests each rollout replica serves at once; the rest queue here")
    scoring_slots: int = Field(default=1, ge=1, description="requests each scoring replica serves at once; the rest queue here")
    trainer_slots: int = Field(default=1, ge=1, description="requests the trainer serves at once; the rest queue here")
    run_orchestrator: bool = True
    replica_id: str | None = Field(
        default=None, description="this replica's lease owner id; default hostname:port, so a restarted replica resumes its leases at once"
    )
    lease_ttl_s: float = Field(default=30.0, gt=0, description="a dead replica's experiments move to another after this")
    auth_enabled: bool = Field(default=True, description="mutating requests need a bearer token")
    read_requires_token: bool = Field(
        default=False, description="reads need a bearer token too (the API's GETs, /openapi.json, /docs and the event stream)"
    )
    metrics_requires_token: bool = Field(default=False, description="/metrics needs a bearer token")
    bootstrap_token: str | None = Field(default=None, description="a token made valid at start (name 'bootstrap')")
    forwarded_allow_ips: str = Field(
        default="127.0.0.1",
        description="proxies trusted to name the client in X-Forwarded-For (comma-separated addresses or networks, "
        "'*' for any): behind an Ingress, the controller's, so that per-client limits count clients, not the proxy",
    )
    docs_enabled: bool = Field(
        default=False, description="serve Swagger UI at /docs and ReDoc at /redoc (their assets come from a CDN)"
    )
    log_level: str = "INFO"
    suspect_rule: str = Field(
        default="robust_z", json_schema_extra={"enum": rule_names()},
        description="suspect-reward flags (gradalign_common.suspects): the rule that flags a round's candidates whose "
        "gradient points against the validation gradient; the API's `rule` overrides it per request",
    )
    suspect_threshold: float | None = Field(
        default=None, allow_inf_nan=False, description="the rule's threshold; None: the rule's default"
    )
    suspect_min_rounds: int = Field(
        default=2, ge=1, description="a problem flagged in this many rounds is 'suspect'; flagged in fewer, 'watch'"
    )

    @field_validator("suspect_rule")
    @classmethod
    def _known_rule(cls, v: str) -> str:
        return get_rule(v).name  # InvalidInputError is a ValueError: pydantic reports it on the field

    @model_validator(mode="after")
    def _threshold_fits_rule(self) -> "SchedulerSettings":
        if self.suspect_threshold is not None:
            try:
                get_rule(self.suspect_rule).check_threshold(self.suspect_threshold)
            except InvalidInputError as exc:
                raise ValueError(f"suspect_threshold: {exc}") from None
        return self

    def lease_owner(self) -> str:
        return self.replica_id or f"{socket.gethostname()}:{self.port}"
