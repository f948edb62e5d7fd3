"""gRPC clients of the rollout, scoring and trainer services, as the orchestrator uses them.

Each call has a deadline. UNAVAILABLE / DEADLINE_EXCEEDED become WorkerUnavailable
(retried by the orchestrator with backoff); INVALID_ARGUMENT / NOT_FOUND become
WorkerRejected (not retried: the experiment fails with the worker's message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import grpc

from gradalign_common.grpc_utils import channel
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from gradalign_common.pb import training_pb2, training_pb2_grpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class WorkerError(Exception):
    def __init__(self, service: str, address: str, code: grpc.StatusCode, detail: str):
        super().__init__(f"{service} service at {address}: {code.name}: {detail}")
        self.service, self.address, self.code, self.detail = service, address, code, detail


class WorkerUnavailable(WorkerError):
    """The worker could not be reached or timed out: retry later."""


class WorkerRejected(WorkerError):
    """The worker refused the request (bad input) or failed internally: do not retry blindly."""


ProgressFn = Callable[[int, int, str], None]


@dataclass
class WorkerCall:
    service: str
    address: str
    deadline_s: float

    def stream(self, open_stream: Callable[[grpc.Channel], Iterator]) -> Iterator:
        try:
            with channel(self.address) as ch:
                yield from open_stream(ch)
        except grpc.RpcError as exc:
            code, detail = exc.code(), exc.details() or ""
            cls = WorkerUnavailable if code in RETRYABLE else WorkerRejected
            raise cls(self.service, self.address, code, detail) from None


def generate(
    address: str, deadline_s: float, request: rollout_pb2.GenerateRequest, progress: ProgressFn | None = None
) -> rollout_pb2.GenerateResult:
    call = WorkerCall("rollout", address, deadline_s)
    result = None
    for event in call.stream(lambda ch: rollout_pb2_grpc.RolloutServiceStub(ch).Generate(request, timeout=deadline_s)):
        if event.HasField("progress") and progress:
            progress(event.progress.done, event.progress.total, event.progress.unit)
        elif event.HasField("result"):
            result = event.result
    if result is None:
        raise WorkerRejected("rollout", address, grpc.StatusCode.INTERNAL, "stream ended without a result")
    return result


def score(
    address: str, deadline_s: float, request: scoring_pb2.ScoreRequest, progress: ProgressFn | None = None
) -> tuple[list[scoring_pb2.ProblemScore], scoring_pb2.ScoreSummary]:
    call = WorkerCall("scoring", address, deadline_s)
    scores, summary = [], None
    for event in call.stream(lambda ch: scoring_pb2_grpc.ScoringServiceStub(ch).Score(request, timeout=deadline_s)):
        if event.HasField("progress") and progress:
            progress(event.progress.done, event.progress.total, event.progress.unit)
        elif event.HasField("score"):
            scores.append(event.score)
        elif event.HasField("summary"):
            summary = event.summary
    if summary is None:
        raise WorkerRejected("scoring", address, grpc.StatusCode.INTERNAL, "stream ended without a summary")
    return scores, summary


def train(
    address: str,
    deadline_s: float,
    request: training_pb2.TrainRequest,
    on_step: Callable[[training_pb2.StepMetrics], None] | None = None,
) -> training_pb2.TrainResult:
    call = WorkerCall("trainer", address, deadline_s)
    result = None
    for event in call.stream(lambda ch: training_pb2_grpc.TrainerServiceStub(ch).Train(request, timeout=deadline_s)):
        if event.HasField("step") and on_step:
            on_step(event.step)
        elif event.HasField("result"):
            result = event.result
    if result is None:
        raise WorkerRejected("trainer", address, grpc.StatusCode.INTERNAL, "stream ended without a result")
    return result


def sampling_params(n: int, max_tokens: int, temperature: float, top_p: float, seed: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
