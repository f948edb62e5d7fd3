"""The gRPC ScoringService: Score(ScoreRequest) -> stream of ScoreEvent (protos/gradalign/v1/scoring.proto).

The service keeps one model loaded and swaps it only when a request names a different
checkpoint (its path, or the mtime of its config or weights, changed). It caches the
last validation gradient, keyed on (checkpoint, dtype, validation files and their mtimes,
the method's gradient space, the optimizer state file and its mtime). Requests that need
the model run one at a time, each within its memory budget (the request's, else the service's
memory_budget setting; gradalign_common.memory_budget). A request's `method` defaults to exact;
approximate methods are used only when named. With `optimizer_state_path`, gradients are preconditioned by the
trainer's Adam second moments (gradalign_common.optimizer_state).

For align (validation = the candidates' own rollouts) a sharded round passes every
shard's candidate files as validation_paths, so each shard uses the whole round's g_V
and sharded scores equal single-replica ones; without validation_paths the request's
own candidates form g_V.

Capacity, cancel and identity: at most settings.max_concurrent_requests requests are admitted at
once, any more get RESOURCE_EXHAUSTED (gradalign_common.request_gate). A cancelled call stops
within a batch of the validation gradient or at its next score event, releases the model lock and
writes no scores file. Beside `output_path`, `<output_path>.request.json` records the request id
and body fingerprint; a request reusing that id with a different body is refused with
ALREADY_EXISTS (gradalign_common.request_identity).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc
import torch
from grpc_health.v1 import health

from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.grpc_utils import build_service_server, mark_serving, rpc_errors, serve_until_signalled, stop_if_cancelled
from gradalign_common.logging_setup import get_logger
from gradalign_common.pb import common_pb2, scoring_pb2, scoring_pb2_grpc
from gradalign_common.records import RolloutRecord, ScoreRecord, group_rollouts, read_rollouts, write_scores_jsonl
from gradalign_common.request_gate import RequestGate
from gradalign_common.request_identity import check_request, record_request, request_fingerprint
from gradalign_common.modeling import checkpoint_fingerprint, configure_torch_threads, dtype_on
from gradalign_common.optimizer_state import file_fingerprint, read_optimizer_state
from gradalign_common.scoring_methods import MethodSpec, parse_method
from gradalign_common.selection import get_mode
from services.scoring.engine import Preconditioner, ScoringEngine
from services.scoring.gradient_source import GradientSource, gradient_source
from gradalign_common.memory_budget import parse_memory_budget
from services.scoring.score_request import score_request
from services.scoring.settings import ScoringSettings

SERVICE_NAME = "gradalign.v1.ScoringService"
PROGRESS_UNIT = "groups"

log = get_logger("gradalign.scoring")


FileStamp = tuple[str, int, int]  # (resolved path, mtime_ns, size)


def _stamp(path: Path) -> FileStamp:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def rollout_files_fingerprint(paths: Sequence[str]) -> tuple[FileStamp, ...]:
    """Identifies a list of rollout files' contents by path, mtime and size (in the given order)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise NotFoundError(f"rollout file not found: {missing[0]}")
    return tuple(_stamp(Path(p)) for p in paths)


def read_all_rollouts(paths: Sequence[str], what: str) -> list[RolloutRecord]:
    """The records of every file in `paths`, concatenated in order."""
    if not paths:
        raise InvalidInputError(f"no {what} paths given")
    records: list[RolloutRecord] = []
    for path in paths:
        records.extend(read_rollouts(path))
    return records


@dataclass
class _LoadedModel:
    fingerprint: tuple
    engine: ScoringEngine


@dataclass
class _CachedValidationGradient:
    key: tuple
    gradient: torch.Tensor


@dataclass
class _CachedPreconditioner:
    key: tuple
    engine: ScoringEngine
    preconditioner: Preconditioner


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    """Implements gradalign.v1.ScoringService."""

    def __init__(self, settings: ScoringSettings):
        self.settings = settings
        self._lock = threading.Lock()  # one model-using request at a time
        self.gate = RequestGate("scoring", settings.max_concurrent_requests)
        self._loaded: _LoadedModel | None = None
        self._validation_cache: _CachedValidationGradient | None = None
        self._preconditioner_cache: _CachedPreconditioner | None = None

    @rpc_errors("scoring")
    def Score(self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext) -> Iterator[scoring_pb2.ScoreEvent]:
        with self.gate.slot():
            yield from self._score(request, context)

    def _score(self, request: scoring_pb2.ScoreRequest, context: grpc.ServicerContext) -> Iterator[scoring_pb2.ScoreEvent]:
        started = time.perf_counter()
        mode = get_mode(request.mode)
        method = parse_method(request.method or "exact")
        dtype = dtype_on(request.dtype or self.settings.dtype, self.settings.device)
        memory_budget = parse_memory_budget(request.memory_budget or self.settings.memory_budget)
        source = gradient_source(mode, bool(request.validation_paths), "validation_paths")
        needs_model = source is not GradientSource.NONE
        if needs_model and not request.checkpoint:
            raise InvalidInputError(f"mode {mode.name!r} needs a checkpoint")
        fingerprint = request_fingerprint(request)
        if request.output_path:
            check_request(request.output_path, request.request_id, fingerprint)
        candidates = read_all_rollouts(request.candidate_paths, "candidate")
        total = len(group_rollouts(candidates))
        yield _progress_event(0, total)

        scores: list[ScoreRecord] = []
        cached: list[bool] = [False]  # whether g_V came from the cache

        def engine() -> ScoringEngine:
            loaded = self._engine(request.checkpoint, dtype)
            loaded.set_memory_budget(memory_budget)
            stop_if_cancelled(context, "after loading the checkpoint")
            return loaded

        def validation_gradient(loaded: ScoringEngine, spec: MethodSpec, p: Preconditioner | None) -> torch.Tensor:
            g_v, cached[0] = self._validation_gradient(
                request.validation_paths, spec, p,
                progress=lambda done, total: stop_if_cancelled(context, f"validation gradient: {done} of {total} groups"),
            )
            return g_v

        with self._lock if needs_model else contextlib.nullcontext():  # one model-using request at a time
            for record in score_request(
                candidates, mode, engine=engine,
                validation_gradient=validation_gradient if request.validation_paths else None,
                preconditioner=lambda loaded: self._preconditioner(loaded, request.optimizer_state_path),
                method=method, seed=request.seed, validation_name="validation_paths",
            ):
                scores.append(record)
                yield _score_event(record)
                yield _progress_event(len(scores), total)

        stop_if_cancelled(context, f"{len(scores)} of {total} groups scored")  # cancelled late: no scores file
        if request.output_path:
            write_scores_jsonl(request.output_path, scores)
            record_request(request.output_path, request.request_id, fingerprint)
        seconds = time.perf_counter() - started
        log.info("scored", request_id=request.request_id, mode=mode.name, method=method.name, n_problems=len(scores),
                 seconds=round(seconds, 3), validation_gradient_cached=cached[0])
        yield scoring_pb2.ScoreEvent(
            summary=scoring_pb2.ScoreSummary(
                output_path=request.output_path,
                n_problems=len(scores),
                compute_seconds=seconds,
                validation_gradient_cached=cached[0],
            )
        )

    def _engine(self, checkpoint: str, dtype: torch.dtype) -> ScoringEngine:
        """The loaded engine, reloaded if the checkpoint (or its files, or the dtype) changed."""
        fingerprint = (checkpoint_fingerprint(checkpoint), dtype)
        if self._loaded is None or self._loaded.fingerprint != fingerprint:
            self._loaded = None
            self._validation_cache = None
            log.info("loading_checkpoint", checkpoint=checkpoint, dtype=str(dtype))
            engine = ScoringEngine.from_pretrained(
                checkpoint, device=self.settings.device, dtype=dtype, memory_budget=self.settings.memory_budget,
                max_batch_tokens=self.settings.max_batch_tokens, target_batch_tokens=self.settings.target_batch_tokens,
            )
            self._loaded = _LoadedModel(fingerprint, engine)
        return self._loaded.engine

    def _preconditioner(self, engine: ScoringEngine, path: str) -> Preconditioner | None:
        """The preconditioner from the optimizer state file at `path` (None when empty), reused while unchanged."""
        if not path:
            return None
        key = file_fingerprint(path)
        cached = self._preconditioner_cache
        if cached is not None and cached.key == key and cached.engine is engine:
            return cached.preconditioner
        self._preconditioner_cache = None
        preconditioner = engine.preconditioner(read_optimizer_state(path), key=key)
        self._preconditioner_cache = _CachedPreconditioner(key, engine, preconditioner)
        return preconditioner

    def _validation_gradient(
        self, paths: Sequence[str], method: MethodSpec, preconditioner: Preconditioner | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """(g_V, whether it came from the cache) of the loaded model for the validation rollouts in `paths`;
        `progress(done, total)` is called after each batch of groups (it may raise RequestCancelled to stop)."""
        assert self._loaded is not None, "load the checkpoint first"
        key = (
            self._loaded.fingerprint,
            rollout_files_fingerprint(paths),
            method.gradient_space,
            None if preconditioner is None else preconditioner.key,
        )
        if self._validation_cache is not None and self._validation_cache.key == key:
            return self._validation_cache.gradient, True
        self._validation_cache = None
        gradient = self._loaded.engine.validation_gradient(
            read_all_rollouts(paths, "validation"), progress, method=method, preconditioner=preconditioner
        )
        self._validation_cache = _CachedValidationGradient(key, gradient)
        return gradient, False


def _progress_event(done: int, total: int) -> scoring_pb2.ScoreEvent:
    return scoring_pb2.ScoreEvent(progress=common_pb2.Progress(done=done, total=total, unit=PROGRESS_UNIT))


def _score_event(record: ScoreRecord) -> scoring_pb2.ScoreEvent:
    return scoring_pb2.ScoreEvent(
        score=scoring_pb2.ProblemScore(
            problem_id=record.problem_id, score=record.score, accuracy=record.accuracy,
            n_responses=record.n_responses, zero_advantage=record.zero_advantage,
        )
    )


def create_server(settings: ScoringSettings, servicer: ScoringServicer | None = None):
    """A server with the ScoringService (`servicer`, or a new one) and health registered (not started);
    returns (server, health, port)."""
    servicer = servicer or ScoringServicer(settings)
    return build_service_server(settings, SERVICE_NAME, scoring_pb2_grpc.add_ScoringServiceServicer_to_server, servicer)


def start_server(
    settings: ScoringSettings, servicer: ScoringServicer | None = None
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """create_server in this process (torch's threads set from settings, as serve does), started and marked
    serving; returns (server, health, bound port)."""
    configure_torch_threads(settings.torch_threads)
    server, health_servicer, port = create_server(settings, servicer)
    server.start()
    mark_serving(health_servicer, [SERVICE_NAME])
    return server, health_servicer, port


def serve(settings: ScoringSettings) -> None:
    """Run the scoring service until SIGTERM/SIGINT."""
    settings.configure_process("scoring")
    serve_until_signalled(settings, SERVICE_NAME, *create_server(settings))


def main() -> None:
    serve(ScoringSettings())


if __name__ == "__main__":
    main()
