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
    max_concurrent_requests: int = Field(
        default=1,
        ge=1,
        description="requests this worker takes at once (running, or waiting for the model); any more are refused "
        "at once with RESOURCE_EXHAUSTED (gradalign_common.request_gate). Must be >= the scheduler's slots setting "
        "for this service (GRADALIGN_SCHEDULER_ROLLOUT_SLOTS / _SCORING_SLOTS / _TRAINER_SLOTS), or the scheduler's "
        "extra requests are refused and retried",
    )
    def configure_process(self, service: str):
        """Structured logging at log_level and, when torch_threads is set, torch's intra-op threads; the logger."""
        from gradalign_common.logging_setup import configure_logging
        from gradalign_common.modeling import configure_torch_threads

        configure_torch_threads(self.torch_threads)
        return configure_logging(service, self.log_level)

    shutdown_grace_s: float = Field(
        default=3600.0,
        ge=0,
        description="drain time on SIGTERM/SIGINT (gradalign_common.grpc_utils): new requests are refused at once "
        "with UNAVAILABLE and health turns NOT_SERVING, the requests in flight get up to this many seconds to finish; "
        "what is still running then is handed back (cancelled, nothing written, UNAVAILABLE: the scheduler retries "
        "it on another replica). 0 hands back at once. A second signal cuts the drain short. In Kubernetes the "
        "pod's terminationGracePeriodSeconds must be longer (the chart derives it from <worker>.shutdownGraceSeconds)",
    )
