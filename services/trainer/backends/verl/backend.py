"""VerlBackend: the trainer service's `verl` backend (TrainBackend) over a VerlJob.

verl's trainer runs through the launcher settings.verl_launcher names
(services.trainer.backends.verl.launcher: a local subprocess, or a job on a Ray cluster);
the model merger runs here either way. The checkpoint is the merger's output, written into
the temporary directory of `plan.output` (gradalign_common.artifacts.atomic_path) with the
marker added last; verl's dataset and FSDP checkpoints go to a scratch directory
(settings.verl_work_dir, else beside the output) that is removed afterwards. Locally it is
named like a temporary, so it is swept at start-up if the trainer is killed; with Ray it is
derived from the request (the launcher's work_dir), so that a retried request finds the
running job's files again; it is kept when the launcher lost track of a run that may still be
going (VerlRunDetached: the retried request attaches to it and removes it at its end). A
cancelled call ends verl (its process group, or the Ray job), writes no checkpoint and ends
the call quietly (no TrainOutcome).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from typing import Iterator

from gradalign_common.artifacts import atomic_path
from gradalign_common.errors import InvalidInputError
from gradalign_common.logging_setup import get_logger
from gradalign_common.modeling import load_tokenizer
from services.trainer.backends.base import Cancellation, TrainOutcome
from services.trainer.backends.verl.checks import check_problems, check_verl_request
from services.trainer.backends.verl.job import prepare_job
from services.trainer.backends.verl.launcher import RunIdentity, VerlRunDetached, create_launcher
from services.trainer.backends.verl.process import VerlRunError
from services.trainer.backends.verl.run import iter_verl
from services.trainer.grpo import StepMetrics
from services.trainer.marker import write_marker
from services.trainer.plan import TrainPlan

log = get_logger("gradalign.trainer")


class _Cancelled(Exception):
    """The client went away during a verl run (internal: ends the RPC quietly)."""


class VerlBackend:
    """verl's GRPO trainer (through the configured launcher) and model merger, with the settings' verl_* options."""

    name = "verl"

    def __init__(self, settings):
        self.settings = settings
        self.launcher = create_launcher(settings)

    def adapt(self, plan: TrainPlan) -> TrainPlan:
        """Refuse what verl cannot do (checks); drop rollout reuse, which verl cannot use."""
        check_problems(plan.problems)
        if plan.export_optimizer_state:
            raise InvalidInputError("export_optimizer_state is not supported by the verl backend")
        check_verl_request(plan.config, len(plan.problems), self.settings.verl_options())
        if not plan.rollouts_paths:
            return plan
        log.info("rollout_reuse_ignored", reason="the verl backend samples every step", paths=len(plan.rollouts_paths))
        return replace(plan, rollouts_paths=[])

    def train(self, plan: TrainPlan, cancellation: Cancellation) -> Iterator[StepMetrics | TrainOutcome]:
        settings = self.settings
        options = settings.verl_options()
        start = time.perf_counter()
        history: list[StepMetrics] = []
        work_root = settings.verl_work_dir if settings.verl_work_dir is not None else plan.output.parent
        identity = RunIdentity(plan.request_id, plan.fingerprint)
        work_dir = self.launcher.work_dir(work_root, plan.output.name, identity)
        log.info(
            "train_started",
            request_id=plan.request_id,
            backend=self.name,
            launcher=self.launcher.name,
            work_dir=str(work_dir),
        )
        keep_work_dir = False  # a run the launcher lost track of may still use it
        try:
            with atomic_path(plan.output) as staging:
                job = prepare_job(
                    plan.problems,
                    plan.config,
                    model_path=plan.checkpoint,
                    output_dir=staging,
                    work_dir=work_dir,
                    options=options,
                    reference_path=plan.reference,
                    tokenizer=load_tokenizer(plan.checkpoint),
                    experiment_name=plan.output.name,
                )
                try:
                    for metrics in iter_verl(
                        job,
                        plan.config,
                        options.n_gpus,
                        should_stop=cancellation.is_cancelled,
                        timeout_s=settings.verl_timeout_s,
                        launcher=self.launcher,
                        identity=identity,
                    ):
                        history.append(metrics)
                        yield metrics
                except VerlRunError as exc:
                    keep_work_dir = isinstance(exc, VerlRunDetached)
                    if cancellation.is_cancelled():
                        log.info("train_cancelled", request_id=plan.request_id, steps_done=len(history))
                        raise _Cancelled() from None
                    raise
                compute_seconds = time.perf_counter() - start
                write_marker(staging, plan.marker(self.name, history, compute_seconds, None))
        except _Cancelled:
            return
        finally:
            if keep_work_dir:
                log.warning("verl_work_dir_kept", request_id=plan.request_id, work_dir=str(work_dir))
            else:
                shutil.rmtree(work_dir, ignore_errors=True)
        yield TrainOutcome(len(history), compute_seconds, None)
