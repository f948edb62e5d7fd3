"""gRPC TrainerService: Train(TrainRequest) -> stream TrainEvent (protos/gradalign/v1/training.proto).

A request names a starting checkpoint, a parquet file of the selected problems and the
directory to write the next checkpoint to. The service validates everything it can
before touching the model, then a training backend (settings.backend, services.trainer.backends)
runs GRPO, streaming one StepMetrics per optimizer step, writes the checkpoint, and the service
sends one TrainResult. `torch` runs services.trainer.grpo in this process
(services.trainer.backends.torch); `verl` runs verl's GRPO trainer and model merger as
subprocesses, or verl's trainer as a job on a Ray cluster (settings.verl_launcher=ray),
then the merger here (services.trainer.backends.verl).

Atomicity and retries: the new checkpoint is built in a temporary directory beside
`output_checkpoint` (the model + a `gradalign-train.json` marker holding the request id,
the step metrics and the compute time, services.trainer.marker, + the optimizer state when
asked) and renamed into place only when complete, so a failed or killed trainer leaves nothing
at `output_checkpoint` (a killed trainer's temporaries are swept at the next start-up,
gradalign_common.checkpoint_retention.sweep_stale_checkpoint_temporaries). A request whose
`request_id` matches the marker of an existing `output_checkpoint` is answered from the marker
(the recorded step metrics, then the result) without training again. The marker also holds the
request body's fingerprint (gradalign_common.request_identity): the same request_id with a
different body is refused with ALREADY_EXISTS; a marker without a fingerprint (written before
fingerprints) is answered as before.

Rollout reuse (`rollouts_paths`, torch backend): the first step takes its batch's
responses from the scoring stage's rollout shards (services.trainer.reuse).
KL reference (torch backend): `reference_checkpoint` (the run's initial model), else the
starting checkpoint; loaded only when kl_coef > 0 and kept loaded between requests. The verl
backend cannot point verl 0.9.1's reference elsewhere: its reference is the starting checkpoint.
Optimizer state (`export_optimizer_state`, torch backend): AdamW's exp_avg_sq after the
last step, inside the new checkpoint; TrainResult.optimizer_state_path names it.

Hyperparameters: proto3 cannot tell an unset number from 0, so 0 means "the default"
for clip_eps (0.2), max_grad_norm (1.0), micro_batch_size (16) and sampling.top_p (1.0);
weight_decay 0 is no decay. steps, batch_size, learning_rate, sampling.n (>= 2),
sampling.max_tokens and sampling.temperature must be set. Per-step sampling seeds derive
from hyperparams.seed; sampling.seed is not used. The policy loss is the service's
(settings.policy_loss, a name in services.trainer.losses), not the request's.
TrainResult.compute_seconds is the time spent loading and training (not saving).
One request trains at a time; others wait, up to settings.max_concurrent_requests requests in
all; any more get RESOURCE_EXHAUSTED (gradalign_common.request_gate). A cancelled call stops
before the next step (torch) or ends verl's process group (verl), and writes no checkpoint.
"""

from __future__ import annotations

import threading
from contextlib import closing
from pathlib import Path
from typing import Iterator

import grpc

from gradalign_common.checkpoint_retention import sweep_stale_checkpoint_temporaries
from gradalign_common.errors import InvalidInputError
from gradalign_common.grpc_utils import build_service_server, rpc_errors, serve_until_signalled, stop_if_cancelled
from gradalign_common.logging_setup import get_logger
from gradalign_common.modeling import check_model_dir
from gradalign_common.pb import common_pb2, training_pb2, training_pb2_grpc
from gradalign_common.records import read_problems
from gradalign_common.request_gate import RequestGate
from gradalign_common.request_identity import is_same_request, request_fingerprint
from services.trainer.backends import Cancellation, TrainOutcome, create_backend
from services.trainer.grpo import GRPOConfig, StepMetrics
from services.trainer.marker import MARKER_NAME, read_marker
from services.trainer.plan import TrainPlan
from services.trainer.settings import TrainerSettings

__all__ = ["MARKER_NAME", "SERVICE_NAME", "TrainerServicer", "config_from_proto", "create_server", "main", "serve"]

SERVICE_NAME = "gradalign.v1.TrainerService"

log = get_logger("gradalign.trainer")


def config_from_proto(hp: training_pb2.TrainHyperparams, policy_loss: str | None = None) -> GRPOConfig:
    """GRPOConfig from the request's hyperparameters (and the service's policy loss, default GRPOConfig's);
    InvalidInputError names the bad field."""
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
        policy_loss=policy_loss or defaults.policy_loss,
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


def startup_housekeeping(settings: TrainerSettings) -> list[Path]:
    """Remove the temporaries a killed trainer left (checkpoint root, verl scratch); returns them."""
    if settings.stale_temp_minutes is None:
        return []
    older_than_s = settings.stale_temp_minutes * 60.0
    removed = sweep_stale_checkpoint_temporaries(settings.resolved_checkpoint_root(), older_than_s)
    if settings.verl_work_dir is not None:
        removed += sweep_stale_checkpoint_temporaries(settings.verl_work_dir, older_than_s)
    return removed


def cancellation_of(context: grpc.ServicerContext) -> Cancellation:
    """The backend's view of the call's cancellation (stop_if_cancelled of gradalign_common.grpc_utils)."""
    return Cancellation(
        is_cancelled=lambda: not context.is_active(),
        stop_if_cancelled=lambda where: stop_if_cancelled(context, where),
    )


class TrainerServicer(training_pb2_grpc.TrainerServiceServicer):
    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        self._lock = threading.Lock()  # one training at a time: it uses the whole device
        self.gate = RequestGate("trainer", settings.max_concurrent_requests)
        self.backend = create_backend(settings)

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

        plan = self.backend.adapt(self._plan(request, output, fingerprint))
        # closing: a call that ends early (cancelled, failed) ends the backend's run too, under the lock
        with self._lock, closing(self.backend.train(plan, cancellation_of(context))) as training:
            for item in training:
                yield self._finished(plan, item) if isinstance(item, TrainOutcome) else step_event(item)

    def _plan(self, request: training_pb2.TrainRequest, output: Path, fingerprint: str) -> TrainPlan:
        """Validate the request (raising InvalidInputError/NotFoundError) before anything is loaded or written;
        the backend's own checks follow (TrainBackend.adapt)."""
        if not request.checkpoint:
            raise InvalidInputError("checkpoint is required")
        if not request.problems_path:
            raise InvalidInputError("problems_path is required")
        config = config_from_proto(request.hyperparams, self.settings.policy_loss)
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
        return TrainPlan(
            request_id=request.request_id, fingerprint=fingerprint, config=config,
            checkpoint=checkpoint, reference=reference, output=output,
            problems_path=problems_path, problems=problems,
            rollouts_paths=[self.settings.artifact_path(p) for p in request.rollouts_paths if p],
            reused={},
            export_optimizer_state=request.export_optimizer_state,
        )

    def _finished(self, plan: TrainPlan, outcome: TrainOutcome) -> training_pb2.TrainEvent:
        log.info(
            "trained",
            request_id=plan.request_id,
            output=str(plan.output),
            steps=outcome.steps,
            seconds=round(outcome.compute_seconds, 3),
        )
        state_path = str(plan.output / outcome.optimizer_state) if outcome.optimizer_state else ""
        return result_event(str(plan.output), outcome.steps, outcome.compute_seconds, state_path)


def create_server(settings: TrainerSettings, servicer: TrainerServicer | None = None):
    """A server with the TrainerService (`servicer`, or a new one) and health registered (not started);
    returns (server, health, port)."""
    servicer = servicer or TrainerServicer(settings)
    return build_service_server(settings, SERVICE_NAME, training_pb2_grpc.add_TrainerServiceServicer_to_server, servicer)


def serve(settings: TrainerSettings) -> None:
    settings.configure_process("trainer")
    startup_housekeeping(settings)
    serve_until_signalled(settings, SERVICE_NAME, *create_server(settings), backend=settings.backend)


def main() -> None:
    serve(TrainerSettings())


if __name__ == "__main__":
    main()
