"""gRPC TrainerService: Train(TrainRequest) -> stream TrainEvent (protos/gradalign/v1/training.proto).

A request names a starting checkpoint, a parquet file of the selected problems and the
directory to write the next checkpoint to. The service validates everything it can
before touching the model, runs the GRPO loop (services.trainer.grpo) streaming one
StepMetrics per optimizer step, writes the checkpoint, then sends one TrainResult.

Atomicity and retries: the new checkpoint is built in a temporary directory beside
`output_checkpoint` (save_checkpoint + a `gradalign-train.json` marker holding the
request id, the step metrics and the compute time) and renamed into place only when
complete, so a failed or killed trainer leaves nothing at `output_checkpoint`. A request
whose `request_id` matches the marker of an existing `output_checkpoint` is answered from
the marker (the recorded step metrics, then the result) without training again.

Hyperparameters: proto3 cannot tell an unset number from 0, so 0 means "the default"
for clip_eps (0.2), max_grad_norm (1.0), micro_batch_size (16) and sampling.top_p (1.0).
steps, batch_size, learning_rate, sampling.n (>= 2), sampling.max_tokens and
sampling.temperature must be set. Per-step sampling seeds derive from hyperparams.seed;
sampling.seed is not used. With kl_coef > 0 the reference model is the starting checkpoint.
TrainResult.compute_seconds is the time spent loading and training (not saving).
One request trains at a time; others wait.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc

from gradalign_common.artifacts import atomic_path
from gradalign_common.errors import InvalidInputError
from gradalign_common.grpc_utils import build_server, mark_serving, rpc_errors, run_until_signalled
from gradalign_common.logging_setup import configure_logging, get_logger
from gradalign_common.modeling import (
    check_model_dir,
    configure_torch_threads,
    load_model,
    load_tokenizer,
    save_checkpoint,
)
from gradalign_common.pb import common_pb2, training_pb2, training_pb2_grpc
from gradalign_common.records import read_problems
from services.trainer.grpo import GRPOConfig, GRPOTrainer, StepMetrics
from services.trainer.settings import TrainerSettings

SERVICE_NAME = "gradalign.v1.TrainerService"
MARKER_NAME = "gradalign-train.json"

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


def result_event(checkpoint: str, steps: int, compute_seconds: float) -> training_pb2.TrainEvent:
    return training_pb2.TrainEvent(
        result=training_pb2.TrainResult(checkpoint=checkpoint, steps=steps, compute_seconds=compute_seconds)
    )


def read_marker(checkpoint_dir: Path) -> dict | None:
    """The training marker of a finished checkpoint directory, or None when absent or unreadable."""
    try:
        marker = json.loads((checkpoint_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def write_checkpoint(model, tokenizer, dest: Path, marker: dict) -> None:
    """Build the checkpoint plus its marker in a temporary directory and rename it onto dest."""
    with atomic_path(dest) as staging:
        save_checkpoint(model, tokenizer, staging)
        with open(staging / MARKER_NAME, "w") as fh:
            json.dump(marker, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())


class TrainerServicer(training_pb2_grpc.TrainerServiceServicer):
    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        self._lock = threading.Lock()  # one training at a time: it uses the whole device

    @rpc_errors("trainer")
    def Train(
        self, request: training_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> Iterator[training_pb2.TrainEvent]:
        if not request.request_id:
            raise InvalidInputError("request_id is required (it makes a retried request idempotent)")
        if not request.output_checkpoint:
            raise InvalidInputError("output_checkpoint is required")
        output = self.settings.checkpoint_path(request.output_checkpoint)
        done = read_marker(output)
        if done is not None and done.get("request_id") == request.request_id:
            log.info("train_already_done", request_id=request.request_id, checkpoint=str(output))
            for metrics in done.get("metrics", []):
                yield step_event(metrics)
            yield result_event(str(output), int(done["steps"]), float(done["compute_seconds"]))
            return

        if not request.checkpoint:
            raise InvalidInputError("checkpoint is required")
        if not request.problems_path:
            raise InvalidInputError("problems_path is required")
        config = config_from_proto(request.hyperparams)
        checkpoint = check_model_dir(self.settings.checkpoint_path(request.checkpoint))
        if output.resolve() == checkpoint:
            raise InvalidInputError(f"output_checkpoint must differ from checkpoint ({checkpoint})")
        problems_path = self.settings.artifact_path(request.problems_path)
        problems = read_problems(problems_path)
        if not problems:
            raise InvalidInputError(f"empty selection: {problems_path} has no problems")
        if config.batch_size > len(problems):
            raise InvalidInputError(
                f"hyperparams.batch_size {config.batch_size} is larger than the selection ({len(problems)} problems)"
            )

        with self._lock:
            start = time.perf_counter()
            model = load_model(checkpoint, device=self.settings.device, dtype=self.settings.dtype)
            tokenizer = load_tokenizer(checkpoint)
            ref_model = None
            if config.kl_coef > 0:
                ref_model = load_model(checkpoint, device=self.settings.device, dtype=self.settings.dtype)
            trainer = GRPOTrainer(model, tokenizer, problems, config, ref_model=ref_model)
            log.info(
                "train_started", request_id=request.request_id, checkpoint=str(checkpoint), problems=len(problems)
            )
            history: list[StepMetrics] = []
            for _ in range(config.steps):
                if not context.is_active():
                    log.info("train_cancelled", request_id=request.request_id, steps_done=len(history))
                    return
                metrics = trainer.step()
                history.append(metrics)
                yield step_event(metrics)
            compute_seconds = time.perf_counter() - start
            marker = {
                "request_id": request.request_id,
                "checkpoint": str(checkpoint),
                "problems_path": str(problems_path),
                "steps": len(history),
                "compute_seconds": compute_seconds,
                "config": {**config.__dict__, "stop": list(config.stop)},
                "metrics": [m.as_dict() for m in history],
            }
            write_checkpoint(model, tokenizer, output, marker)
        log.info(
            "trained",
            request_id=request.request_id,
            output=str(output),
            steps=len(history),
            seconds=round(compute_seconds, 3),
        )
        yield result_event(str(output), len(history), compute_seconds)


def create_server(settings: TrainerSettings):
    """A server with the TrainerService and health registered (not started); returns (server, health, port)."""
    server, health, port = build_server(settings.host, settings.port, [SERVICE_NAME])
    training_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(settings), server)
    return server, health, port


def serve(settings: TrainerSettings) -> None:
    configure_logging("trainer", settings.log_level)
    configure_torch_threads(settings.torch_threads)
    server, health, port = create_server(settings)
    server.start()
    mark_serving(health, [SERVICE_NAME])
    log.info("serving", address=f"{settings.host}:{port}")
    run_until_signalled(server, health, settings.metrics_host, settings.metrics_port)


def main() -> None:
    serve(TrainerSettings())


if __name__ == "__main__":
    main()
