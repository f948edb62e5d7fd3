"""TrainPlan: one validated train request, resolved to paths, as the server hands it to a backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradalign_common.records import Problem, RolloutRecord
from services.trainer.grpo import GRPOConfig, StepMetrics


@dataclass(frozen=True)
class TrainPlan:
    """A validated request: everything the training needs, resolved to paths."""

    request_id: str
    fingerprint: str  # of the request body (gradalign_common.request_identity)
    config: GRPOConfig
    checkpoint: Path
    reference: Path | None  # the KL reference; None without KL
    problems_path: Path
    problems: list[Problem]
    output: Path
    rollouts_paths: list[Path]
    reused: dict[str, list[RolloutRecord]]  # the first step's reusable responses (torch backend)
    export_optimizer_state: bool

    def marker(self, backend: str, history: list[StepMetrics], compute_seconds: float, optimizer_state: str | None):
        """The training marker (services.trainer.marker) of the checkpoint this plan produced."""
        return {
            "request_id": self.request_id,
            "fingerprint": self.fingerprint,
            "backend": backend,
            "checkpoint": str(self.checkpoint),
            "reference_checkpoint": str(self.reference) if self.reference else None,
            "problems_path": str(self.problems_path),
            "rollouts_paths": [str(p) for p in self.rollouts_paths],
            "reused_problems": sorted(pid for pid, rs in self.reused.items() if len(rs) >= self.config.n_samples),
            "steps": len(history),
            "compute_seconds": compute_seconds,
            "config": {**self.config.__dict__, "stop": list(self.config.stop)},
            "metrics": [m.as_dict() for m in history],
            "optimizer_state": optimizer_state,
        }
