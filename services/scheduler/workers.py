"""gRPC clients of the rollout, scoring and trainer services, as the orchestrator uses them.

Each call has a deadline. UNAVAILABLE / DEADLINE_EXCEEDED become WorkerUnavailable
(retried by the orchestrator with backoff); RESOURCE_EXHAUSTED (the replica is at capacity,
e.g. serving another scheduler replica) and a draining worker's UNAVAILABLE (it refused the
call, or handed it back) become WorkerBusy (queued and retried, not counted as a failed attempt); INVALID_ARGUMENT / NOT_FOUND / ALREADY_EXISTS become WorkerRejected
(not retried: the experiment fails with the worker's message).

Every call runs inside a `CallScope`, the live calls of one experiment: `scope.cancel()`
cancels them on the wire (the worker sees the client go and stops between batches or steps)
and makes them raise CallCancelled; a cancelled scope refuses new calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from gradalign_common.grpc_utils import HANDBACK_DETAIL, REFUSED_DETAIL, channel
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from gradalign_common.pb import training_pb2, training_pb2_grpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class WorkerError(Exception):
    def __init__(self, service: str, address: str, code: grpc.StatusCode, detail: str):
        super().__init__(f"{service} service at {address}: {code.name}: {detail}")
        self.service, self.address, self.code, self.detail = service, address, code, detail


class WorkerUnavailable(WorkerError):
    """The worker could not be reached or timed out: retry later."""


class WorkerBusy(WorkerUnavailable):
    """The worker is at capacity (RESOURCE_EXHAUSTED), or shutting down (it refused the call, or handed it back when
    its drain time ran out): queue and retry, it is not a failure."""


# what a draining worker answers (gradalign_common.grpc_utils): the call is retried, not counted as an attempt
DRAIN_DETAILS = (REFUSED_DETAIL, HANDBACK_DETAIL)


class WorkerRejected(WorkerError):
    """The worker refused the request (bad input) or failed internally: do not retry blindly."""


class CallCancelled(Exception):
    """The call was cancelled by its scope (the experiment was cancelled or deleted, its lease lost)."""


ProgressFn = Callable[[int, int, str], None]


@dataclass
class CallScope:
    """The live worker calls of one experiment, so that they can be cancelled together."""

    reason: str | None = None  # why the scope was cancelled; None while it is live
    _calls: set = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is None:
                self.reason = reason
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def add(self, call) -> None:
        with self._lock:
            if self.reason is not None:
                call.cancel()
                raise CallCancelled(self.reason)
            self._calls.add(call)

    def discard(self, call) -> None:
        with self._lock:
            self._calls.discard(call)


@dataclass
class WorkerCall:
    service: str
    address: str
    deadline_s: float
    scope: CallScope | None = None

    def stream(self, open_stream: Callable[[grpc.Channel], Iterator]) -> Iterator:
        scope = self.scope or CallScope()
        call = None
        try:
            with channel(self.address) as ch:
                call = open_stream(ch)
                scope.add(call)
                yield from call
        except grpc.RpcError as exc:
            code, detail = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.CANCELLED and scope.cancelled:
                raise CallCancelled(scope.reason) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED or (code == grpc.StatusCode.UNAVAILABLE and detail in DRAIN_DETAILS):
                raise WorkerBusy(self.service, self.address, code, detail) from None
            cls = WorkerUnavailable if code in RETRYABLE else WorkerRejected
            raise cls(self.service, self.address, code, detail) from None
        finally:
            if call is not None:
                scope.discard(call)


    def read(self, open_stream: Callable[[grpc.Channel], Iterator], final: str, on: dict[str, Callable | None]):
        """Stream the call, handing each event's payload to `on[its oneof field]`; returns the last `final`
        payload, or WorkerRejected when the stream ended without one."""
        last = None
        for event in self.stream(open_stream):
            kind = event.WhichOneof("event")
            if kind == final:
                last = getattr(event, kind)
            elif on.get(kind):
                on[kind](getattr(event, kind))
        if last is None:
            raise WorkerRejected(self.service, self.address, grpc.StatusCode.INTERNAL, f"stream ended without a {final}")
        return last


def _on_progress(progress: ProgressFn | None) -> Callable | None:
    return progress and (lambda p: progress(p.done, p.total, p.unit))


def generate(address: str, deadline_s: float, request: rollout_pb2.GenerateRequest,
             progress: ProgressFn | None = None, scope: CallScope | None = None) -> rollout_pb2.GenerateResult:
    """Generate: the rollout worker's result; `progress(done, total, unit)` as it reports."""
    call = WorkerCall("rollout", address, deadline_s, scope)
    return call.read(lambda ch: rollout_pb2_grpc.RolloutServiceStub(ch).Generate(request, timeout=deadline_s),
                     "result", {"progress": _on_progress(progress)})


def score(address: str, deadline_s: float, request: scoring_pb2.ScoreRequest, progress: ProgressFn | None = None,
          scope: CallScope | None = None) -> tuple[list[scoring_pb2.ProblemScore], scoring_pb2.ScoreSummary]:
    """Score: every candidate's score and the summary; `progress(done, total, unit)` as it reports."""
    call, scores = WorkerCall("scoring", address, deadline_s, scope), []
    summary = call.read(lambda ch: scoring_pb2_grpc.ScoringServiceStub(ch).Score(request, timeout=deadline_s),
                        "summary", {"progress": _on_progress(progress), "score": scores.append})
    return scores, summary


def train(address: str, deadline_s: float, request: training_pb2.TrainRequest,
          on_step: Callable[[training_pb2.StepMetrics], None] | None = None, scope: CallScope | None = None) -> training_pb2.TrainResult:
    """Train: the trainer's result; `on_step(metrics)` after each GRPO step."""
    call = WorkerCall("trainer", address, deadline_s, scope)
    return call.read(lambda ch: training_pb2_grpc.TrainerServiceStub(ch).Train(request, timeout=deadline_s),
                     "result", {"step": on_step})


def sampling_params(n: int, max_tokens: int, temperature: float, top_p: float, seed: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
