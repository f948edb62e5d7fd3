"""The `torch` training backend: services.trainer.grpo's GRPO loop in this process (CPU or one GPU).

Rollout reuse (`plan.rollouts_paths`): the first step takes its batch's responses from the
scoring stage's rollout shards (services.trainer.reuse). KL reference: `plan.reference` (the
run's initial model, else the starting checkpoint), loaded only when kl_coef > 0 and kept
loaded between requests. Cancellation is checked before every step and once after the last,
so a cancelled request writes no checkpoint. Optimizer state (`plan.export_optimizer_state`):
AdamW's exp_avg_sq after the last step, written with gradalign_common.optimizer_state inside the
new checkpoint at OPTIMIZER_STATE_NAME (a subdirectory, so model loaders that glob *.safetensors
in the checkpoint never see it).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from gradalign_common.artifacts import atomic_path
from gradalign_common.logging_setup import get_logger
from gradalign_common.model_cache import ModelCache
from gradalign_common.modeling import load_model, load_tokenizer, save_checkpoint
from gradalign_common.optimizer_state import state_from_torch_optimizer, write_optimizer_state
from services.trainer.backends.base import Cancellation, TrainOutcome
from services.trainer.grpo import GRPOTrainer, StepMetrics
from services.trainer.marker import write_marker
from services.trainer.plan import TrainPlan
from services.trainer.reuse import first_batch_rollouts

OPTIMIZER_STATE_NAME = "gradalign-optimizer/adam_second_moment.safetensors"

log = get_logger("gradalign.trainer")


def write_checkpoint(
    model, tokenizer, dest: Path, marker: dict, extra: Callable[[Path], None] | None = None
) -> None:
    """Build the checkpoint (+ whatever `extra(staging)` adds) and its marker in a temporary directory,
    then rename it onto dest."""
    with atomic_path(dest) as staging:
        save_checkpoint(model, tokenizer, staging)
        if extra is not None:
            extra(staging)
        write_marker(staging, marker)


def write_optimizer_state_of(model, optimizer, path: Path) -> Path:
    """AdamW's second moments of `model` (gradalign_common.optimizer_state format) to path."""
    state = state_from_torch_optimizer(model, optimizer)
    return write_optimizer_state(path, state.exp_avg_sq, step=state.step, beta2=state.beta2, eps=state.eps)


class TorchBackend:
    """GRPOTrainer on settings.device in settings.dtype; keeps the KL reference model loaded."""

    name = "torch"

    def __init__(self, settings):
        self.settings = settings
        # the KL reference (the run's initial model) is the same every round: keep it loaded
        self._references = ModelCache(device=settings.device, dtype=settings.dtype)

    def adapt(self, plan: TrainPlan) -> TrainPlan:
        """Read the reusable first-batch responses of plan.rollouts_paths (services.trainer.reuse)."""
        if not plan.rollouts_paths:
            return plan
        return replace(plan, reused=first_batch_rollouts(plan.rollouts_paths, plan.problems, plan.config))

    def _reference_model(self, reference: Path):
        with self._references.lock:
            model, _ = self._references.get(reference)
        return model

    def train(self, plan: TrainPlan, cancellation: Cancellation) -> Iterator[StepMetrics | TrainOutcome]:
        config = plan.config
        start = time.perf_counter()
        model = load_model(plan.checkpoint, device=self.settings.device, dtype=self.settings.dtype)
        tokenizer = load_tokenizer(plan.checkpoint)
        ref_model = self._reference_model(plan.reference) if plan.reference is not None else None
        trainer = GRPOTrainer(model, tokenizer, plan.problems, config, ref_model=ref_model, first_batch_rollouts=plan.reused)
        log.info(
            "train_started",
            request_id=plan.request_id,
            backend=self.name,
            checkpoint=str(plan.checkpoint),
            problems=len(plan.problems),
            reused_problems=sum(len(rs) >= config.n_samples for rs in plan.reused.values()),
        )
        history: list[StepMetrics] = []
        for _ in range(config.steps):
            cancellation.stop_if_cancelled(f"{len(history)} of {config.steps} steps done")
            metrics = trainer.step()
            history.append(metrics)
            yield metrics
        cancellation.stop_if_cancelled(f"{len(history)} of {config.steps} steps done")  # cancelled late: no checkpoint
        compute_seconds = time.perf_counter() - start

        state_name = OPTIMIZER_STATE_NAME if plan.export_optimizer_state else None

        def add_optimizer_state(staging: Path) -> None:
            write_optimizer_state_of(model, trainer.optimizer, staging / OPTIMIZER_STATE_NAME)

        marker = plan.marker(self.name, history, compute_seconds, state_name)
        write_checkpoint(model, tokenizer, plan.output, marker, add_optimizer_state if state_name else None)
        yield TrainOutcome(len(history), compute_seconds, state_name)
