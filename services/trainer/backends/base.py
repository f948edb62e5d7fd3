"""The interface every training backend implements, and what the server gives and gets back.

The server validates a request into a TrainPlan, lets the backend refuse or adjust it
(`adapt`), then iterates `train`: one StepMetrics per optimizer step, then one TrainOutcome
once `plan.output` is in place. A backend builds the checkpoint in a temporary directory
(gradalign_common.artifacts.atomic_path) with the training marker written last
(services.trainer.marker), so a failed, killed or cancelled run leaves nothing at `plan.output`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from services.trainer.grpo import StepMetrics
from services.trainer.plan import TrainPlan


@dataclass(frozen=True)
class Cancellation:
    """How a backend learns that the caller went away (the server builds it from the gRPC context)."""

    is_cancelled: Callable[[], bool]  # polled while a subprocess runs
    stop_if_cancelled: Callable[[str], None]  # raises RequestCancelled(where) once cancelled; `where` is for the log


@dataclass(frozen=True)
class TrainOutcome:
    """A finished training: the checkpoint is at plan.output with its marker."""

    steps: int
    compute_seconds: float  # loading and training, not saving
    optimizer_state: str | None  # the optimizer state's path relative to the checkpoint, when exported


class TrainBackend(Protocol):
    name: str  # settings.backend; recorded in the marker

    def adapt(self, plan: TrainPlan) -> TrainPlan:
        """Refuse (InvalidInputError) what this backend cannot train, before anything is loaded or
        written; return the plan as this backend will run it."""

    def train(self, plan: TrainPlan, cancellation: Cancellation) -> Iterator[StepMetrics | TrainOutcome]:
        """Train: yield each step's metrics, then one TrainOutcome. A cancelled run writes no checkpoint
        and either raises RequestCancelled or ends without an outcome."""
