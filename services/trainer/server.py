"""gRPC TrainerService: Train(TrainRequest) -> stream TrainEvent (protos/gradalign/v1/training.proto).

A request names a starting checkpoint, a parquet file of the selected problems and the
directory to write the next checkpoint to. The service validates everything it can
before touching the model, runs the GRPO loop streaming one StepMetrics per optimizer
step, writes the checkpoint, then sends one TrainResult. Two backends (settings.backend):
`torch` runs services.trainer.grpo in this process; `verl` runs verl's GRPO trainer and
model merger as subprocesses (services.trainer.verl_backend).

Atomicity and retries: the new checkpoint is built in a temporary directory beside
`output_checkpoint` (the model + a `gradalign-train.json` marker holding the request id,
the step metrics and the compute time, + the optimizer state when asked) and renamed
into place only when complete, so a failed or killed trainer leaves nothing at
`output_checkpoint` (a killed trainer's temporaries are swept at the next start-up,
services.trainer.retention). A request whose `request_id` matches the marker of an
existing `output_checkpoint` is answered from the marker (the recorded step metrics,
then the result) without training again. The marker also holds the request body's fingerprint
(gradalign_common.request_identity): the same request_id with a different body is refused with
ALREADY_EXISTS; a marker without a fingerprint (written before fingerprints) is answered as before.

Rollout reuse (`rollouts_paths`, torch backend): the first step takes its batch's
responses from the scoring stage's rollout shards (services.trainer.reuse).
KL reference (torch backend): `reference_checkpoint` (the run's initial model), else the
starting checkpoint; loaded only when kl_coef > 0 and kept loaded between requests. The verl
backend cannot point verl 0.9.1's reference elsewhere: its reference is the starting checkpoint.
Optimizer state (`export_optimizer_state`, torch backend): AdamW's exp_avg_sq after the
last step, written with gradalign_common.optimizer_state inside the new checkpoint at
OPTIMIZER_STATE_NAME (a subdirectory, so model loaders that glob *.safetensors in the
checkpoint never see it); TrainResult.optimizer_state_path names it.

Hyperparameters: proto3 cannot tell an unset number from 0, so 0 means "the default"
for clip_eps (0.2), max_grad_norm (1.0), micro_batch_size (16) and sampling.top_p (1.0);
weight_decay 0 is no decay. steps, batch_size, learning_rate, sampling.n (>= 2),
sampling.max_tokens and sampling.temperature must be set. Per-step sampling seeds derive
from hyperparams.seed; sampling.seed is not used.
TrainResult.compute_seconds is the time spent loading and training (not saving).
One request trains at a time; others wait, up to settings.max_concurrent_requests requests in
all; any more get RESOURCE_EXHAUSTED (gradalign_common.request_gate). A cancelled call stops
before the next step (torch) or ends verl's process group (verl), and writes no checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc

from gradalign_common.artifacts import atomic_path
from gradalign_common.errors import InvalidInputError
from gradalign_common.grpc_utils import build_server, mark_serving, rpc_errors, run_until_signalled, stop_if_cancelled
from gradalign_common.logging_setup import configure_logging, get_logger
from gradalign_common.model_cache import ModelCache
from gradalign_common.modeling import (
    check_model_dir,
    configure_torch_threads,
    load_model,
    load_tokenizer,
    save_checkpoint,
)
from gradalign_common.optimizer_state import state_from_torch_optimizer, write_optimizer_state
from gradalign_common.pb import common_pb2, training_pb2, training_pb2_grpc
from gradalign_common.records import Problem, RolloutRecord, read_problems
from gradalign_common.request_gate import RequestGate
from gradalign_common.request_identity import is_same_request, request_fingerprint
from services.trainer.grpo import GRPOConfig, GRPOTrainer, StepMetrics
from gradalign_common.checkpoint_retention import sweep_stale_checkpoint_temporaries
from services.trainer.reuse import first_batch_rollouts
from services.trainer.settings import TrainerSettings
from services.trainer.verl_backend import (
    VerlRunError,
    check_problems,
    check_verl_request,
    iter_verl,
    new_work_dir,
    prepare_job,
)

SERVICE_NAME = "gradalign.v1.TrainerService"
MARKER_NAME = "gradalign-train.json"
OPTIMIZER_STATE_NAME = "gradalign-optimizer/adam_second_moment.safetensors"

log = get_logger("gradalign.trainer")


def config_from_proto(hp: training_pb2.TrainHyperparams) -> GRPOConfig:
    """GRPOConfig from the request's hyperparameters; InvalidInputError names the bad field."""
    s: common_pb2.SamplingParams = hp.sampling
    required = [
        ("hyperparams.steps", hp.steps >= 1, "must be >= 1"),
        ("hyperparams.batch_size", hp.batch_size >= 1, "must be >= 1"),
        ("hyperparams.learning_rate", hp.learning_rate > 0, "must be > 0"),
        ("hyperparams.sampling.n", s.n >= 2, "must be >= 2 (responses per problem; GRPO compares them)"),
        ("hyperparams.sampling.max_tokens", s.max_tokens >= 1, "must be >= 1"),
        ("hyperparams.sampling.temperature", s.temperature > 0, "must be > 0 (GRPO samples its responses)"),
        ("hyperparams.weight_decay", hp.weight_decay >= 0, "must be >= 0"),
    ]
    for name, ok, rule in required:
        if not ok:
            raise InvalidInputError(f"{name} {rule}")
    defaults = GRPOConfig()
    config = GRPOConfig(
        steps=hp.steps,
        batch_size=hp.batch_size,
        n_samples=s.n,
        learning_rate=hp.learning_rate,
        clip_eps=hp.clip_eps or defaults.clip_eps,
        kl_coef=hp.kl_coef,
        entropy_coef=hp.entropy_coef,
        max_grad_norm=hp.max_grad_norm or defaults.max_grad_norm,
        micro_batch_size=hp.micro_batch_size or defaults.micro_batch_size,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        seed=hp.seed,
        weight_decay=hp.weight_decay,
        stop=tuple(s.stop),
    )
    try:
        config.validate()
    except InvalidInputError as exc:
        raise InvalidInputError(f"hyperparams: {exc}") from None
    return config


def step_event(metrics: StepMetrics | dict) -> training_pb2.TrainEvent:
    values = metrics.as_dict() if isinstance(metrics, StepMetrics) else metrics
    return training_pb2.TrainEvent(step=training_pb2.StepMetrics(**values))


def result_event(
    checkpoint: str, steps: int, compute_seconds: float, optimizer_state_path: str = ""
) -> training_pb2.TrainEvent:
    return training_pb2.TrainEvent(
        result=training_pb2.TrainResult(
            checkpoint=checkpoint,
            steps=steps,
            compute_seconds=compute_seconds,
            optimizer_state_path=optimizer_state_path,
        )
    )


def read_marker(checkpoint_dir: Path) -> dict | None:
    """The training marker of a finished checkpoint directory, or None when absent or unreadable."""
    try:
        marker = json.loads((checkpoint_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(staging: Path, marker: dict) -> None:
    with open(staging / MARKER_NAME, "w") as fh:
        json.dump(marker, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def write_checkpoint(
    model, tokenizer, dest: Path, marker: dict, extra: Callable[[Path], None] | None = None
) -> None:
    """Build the checkpoint (+ whatever `extra(staging)` adds) and its marker in a temporary directory,
    then rename it onto dest."""
    with atomic_path(dest) as staging:
        save_checkpoint(model, tokenizer, staging)
        if extra is not None:
            extra(staging)
        _write_marker(staging, marker)


def write_optimizer_state_of(model, optimizer, path: Path) -> Path:
    """AdamW's second moments of `model` (gradalign_common.optimizer_state format) to path."""
    state = state_from_torch_optimizer(model, optimizer)
    return write_optimizer_state(path, state.exp_avg_sq, step=state.step, beta2=state.beta2, eps=state.eps)


def startup_housekeeping(settings: TrainerSettings) -> list[Path]:
    """Remove the temporaries a killed trainer left (checkpoint root, verl scratch); returns them."""
    if settings.stale_temp_minutes is None:
        return []
    older_than_s = settings.stale_temp_minutes * 60.0
    removed = sweep_stale_checkpoint_temporaries(settings.resolved_checkpoint_root(), older_than_s)
    if settings.verl_work_dir is not None:
        removed += sweep_stale_checkpoint_temporaries(settings.verl_work_dir, older_than_s)
    return removed


@dataclass
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
    reused: dict[str, list[RolloutRecord]]
    export_optimizer_state: bool

    def marker(self, backend: str, history: list[StepMetrics], compute_seconds: float, optimizer_state: str | None):
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


class TrainerServicer(training_pb2_grpc.TrainerServiceServicer):
    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        self._lock = threading.Lock()  # one training at a time: it uses the whole device
        self.gate = RequestGate("trainer", settings.max_concurrent_requests)
        # the KL reference (the run's initial model) is the same every round: keep it loaded
        self._references = ModelCache(device=settings.device, dtype=settings.dtype)

    @rpc_errors("trainer")
    def Train(
        self, request: training_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> Iterator[training_pb2.TrainEvent]:
        with self.gate.slot():
            yield from self._train(request, context)

    def _train(
        self, request: training_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> Iterator[training_pb2.TrainEvent]:
        if not request.request_id:
            raise InvalidInputError("request_id is required (it makes a retried request idempotent)")
        if not request.output_checkpoint:
            raise InvalidInputError("output_checkpoint is required")
        output = self.settings.checkpoint_path(request.output_checkpoint)
        fingerprint = request_fingerprint(request)
        done = read_marker(output)
        if is_same_request(done, request.request_id, fingerprint, str(output)):
            log.info("train_already_done", request_id=request.request_id, checkpoint=str(output))
            for metrics in done.get("metrics", []):
                yield step_event(metrics)
            state = done.get("optimizer_state")
            yield result_event(
                str(output), int(done["steps"]), float(done["compute_seconds"]), str(output / state) if state else ""
            )
            return

        plan = self._plan(request, output, fingerprint)
        with self._lock:
            if self.settings.backend == "verl":
                yield from self._train_verl(plan, context)
            else:
                yield from self._train_torch(plan, context)

    def _plan(self, request: training_pb2.TrainRequest, output: Path, fingerprint: str) -> TrainPlan:
        """Validate the request (raising InvalidInputError/NotFoundError) before anything is loaded or written."""
        if not request.checkpoint:
            raise InvalidInputError("checkpoint is required")
        if not request.problems_path:
            raise InvalidInputError("problems_path is required")
        config = config_from_proto(request.hyperparams)
        checkpoint = check_model_dir(self.settings.checkpoint_path(request.checkpoint))
        if output.resolve() == checkpoint:
            raise InvalidInputError(f"output_checkpoint must differ from checkpoint ({checkpoint})")
        reference = None
        if config.kl_coef > 0:
            reference = checkpoint
            if request.reference_checkpoint:
                reference = check_model_dir(self.settings.checkpoint_path(request.reference_checkpoint))
        problems_path = self.settings.artifact_path(request.problems_path)
        problems = read_problems(problems_path)
        if not problems:
            raise InvalidInputError(f"empty selection: {problems_path} has no problems")
        if config.batch_size > len(problems):
            raise InvalidInputError(
                f"hyperparams.batch_size {config.batch_size} is larger than the selection ({len(problems)} problems)"
            )
        rollouts_paths = [self.settings.artifact_path(p) for p in request.rollouts_paths if p]
        reused: dict[str, list[RolloutRecord]] = {}
        if self.settings.backend == "verl":
            check_problems(problems)
            if request.export_optimizer_state:
                raise InvalidInputError("export_optimizer_state is not supported by the verl backend")
            check_verl_request(config, len(problems), self.settings.verl_options())
            if rollouts_paths:
                log.info("rollout_reuse_ignored", reason="the verl backend samples every step", paths=len(rollouts_paths))
                rollouts_paths = []
        elif rollouts_paths:
            reused = first_batch_rollouts(rollouts_paths, problems, config)
        return TrainPlan(
            request_id=request.request_id,
            fingerprint=fingerprint,
            config=config,
            checkpoint=checkpoint,
            reference=reference,
            problems_path=problems_path,
            problems=problems,
            output=output,
            rollouts_paths=rollouts_paths,
            reused=reused,
            export_optimizer_state=request.export_optimizer_state,
        )

    def _reference_model(self, reference: Path):
        with self._references.lock:
            model, _ = self._references.get(reference)
        return model

    def _train_torch(self, plan: TrainPlan, context: grpc.ServicerContext) -> Iterator[training_pb2.TrainEvent]:
        config = plan.config
        start = time.perf_counter()
        model = load_model(plan.checkpoint, device=self.settings.device, dtype=self.settings.dtype)
        tokenizer = load_tokenizer(plan.checkpoint)
        ref_model = self._reference_model(plan.reference) if plan.reference is not None else None
        trainer = GRPOTrainer(model, tokenizer, plan.problems, config, ref_model=ref_model, first_batch_rollouts=plan.reused)
        log.info(
            "train_started",
            request_id=plan.request_id,
            backend="torch",
            checkpoint=str(plan.checkpoint),
            problems=len(plan.problems),
            reused_problems=sum(len(rs) >= config.n_samples for rs in plan.reused.values()),
        )
        history: list[StepMetrics] = []
        for _ in range(config.steps):
            stop_if_cancelled(context, f"{len(history)} of {config.steps} steps done")
            metrics = trainer.step()
            history.append(metrics)
            yield step_event(metrics)
        stop_if_cancelled(context, f"{len(history)} of {config.steps} steps done")  # cancelled late: no checkpoint
        compute_seconds = time.perf_counter() - start

        state_name = OPTIMIZER_STATE_NAME if plan.export_optimizer_state else None

        def add_optimizer_state(staging: Path) -> None:
            write_optimizer_state_of(model, trainer.optimizer, staging / OPTIMIZER_STATE_NAME)

        marker = plan.marker("torch", history, compute_seconds, state_name)
        write_checkpoint(model, tokenizer, plan.output, marker, add_optimizer_state if state_name else None)
        yield self._finished(plan, history, compute_seconds, state_name)

    def _train_verl(self, plan: TrainPlan, context: grpc.ServicerContext) -> Iterator[training_pb2.TrainEvent]:
        settings = self.settings
        options = settings.verl_options()
        start = time.perf_counter()
        history: list[StepMetrics] = []
        work_root = settings.verl_work_dir if settings.verl_work_dir is not None else plan.output.parent
        work_dir = new_work_dir(work_root, plan.output.name)
        log.info("train_started", request_id=plan.request_id, backend="verl", work_dir=str(work_dir))
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
                        should_stop=lambda: not context.is_active(),
                        timeout_s=settings.verl_timeout_s,
                    ):
                        history.append(metrics)
                        yield step_event(metrics)
                except VerlRunError:
                    if not context.is_active():
                        log.info("train_cancelled", request_id=plan.request_id, steps_done=len(history))
                        raise _Cancelled() from None
                    raise
                compute_seconds = time.perf_counter() - start
                _write_marker(staging, plan.marker("verl", history, compute_seconds, None))
        except _Cancelled:
            return
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        yield self._finished(plan, history, compute_seconds, None)

    def _finished(
        self, plan: TrainPlan, history: list[StepMetrics], compute_seconds: float, state_name: str | None
    ) -> training_pb2.TrainEvent:
        log.info(
            "trained",
            request_id=plan.request_id,
            output=str(plan.output),
            steps=len(history),
            seconds=round(compute_seconds, 3),
        )
        state_path = str(plan.output / state_name) if state_name else ""
        return result_event(str(plan.output), len(history), compute_seconds, state_path)


class _Cancelled(Exception):
    """The client went away during a verl run (internal: ends the RPC quietly)."""


def create_server(settings: TrainerSettings, servicer: TrainerServicer | None = None):
    """A server with the TrainerService (`servicer`, or a new one) and health registered (not started);
    returns (server, health, port)."""
    server, health, port = build_server(
        settings.host, settings.port, [SERVICE_NAME], capacity=settings.max_concurrent_requests
    )
    training_pb2_grpc.add_TrainerServiceServicer_to_server(servicer or TrainerServicer(settings), server)
    return server, health, port


def serve(settings: TrainerSettings) -> None:
    configure_logging("trainer", settings.log_level)
    configure_torch_threads(settings.torch_threads)
    startup_housekeeping(settings)
    server, health, port = create_server(settings)
    server.start()
    mark_serving(health, [SERVICE_NAME])
    log.info("serving", address=f"{settings.host}:{port}", backend=settings.backend)
    run_until_signalled(server, health, settings.metrics_host, settings.metrics_port)


def main() -> None:
    serve(TrainerSettings())


if __name__ == "__main__":
    main()
