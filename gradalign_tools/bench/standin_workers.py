"""Stand-in workers for measuring the orchestrator: real gRPC servers of the rollout, scoring and
trainer services whose work is a set sleep, with valid outputs (rollout shards, scores, a checkpoint
directory) so the real orchestrator runs its real rounds against them.

Each servicer logs every call it served (request id, experiment, start, end) so a benchmark or a
test can tell what overlapped, how much worker time each experiment got, and whether a stage ran
twice. A call stops early (writes nothing, and is logged as cancelled) when the client cancels it.
With `capacity`, each server admits that many calls at once and refuses more with
RESOURCE_EXHAUSTED, like the real workers (gradalign_common.request_gate). Used by
`gradalign bench orchestrator` and tests/test_orchestrator_concurrency.py; never by the product.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gradalign_common.grpc_utils import build_server, mark_serving, rpc_errors
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from gradalign_common.pb import training_pb2, training_pb2_grpc
from gradalign_common.records import RolloutRecord, group_rollouts, read_problems, read_rollouts, write_rollouts
from gradalign_common.request_gate import RequestGate


@dataclass(frozen=True)
class Call:
    service: str
    request_id: str
    started: float
    ended: float
    cancelled: bool = False  # the client cancelled it: it stopped at `ended` and wrote nothing

    @property
    def experiment(self) -> str:
        return self.request_id.split("/", 1)[0]

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class CallLog:
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)


class _ClientCancelled(Exception):
    """The client cancelled the call while it slept: it stops and writes nothing."""


def _stand_in_rpc(service: str):
    """A stand-in's RPC: gRPC errors mapped (rpc_errors), admitted through the servicer's gate when it has one,
    and logged once in its CallLog when it ends (as cancelled when the client cancelled it)."""

    def decorator(method):
        @rpc_errors(service)
        @functools.wraps(method)
        def rpc(self, request, context):
            started, cancelled = time.monotonic(), False
            with self.gate.slot() if self.gate is not None else contextlib.nullcontext():
                try:
                    yield from method(self, request, context)
                except _ClientCancelled:
                    cancelled = True
            self.log.add(Call(service, request.request_id, started, time.monotonic(), cancelled=cancelled))

        return rpc

    return decorator


class _StandIn:
    """What the stand-ins share: `seconds` each call (the trainer: each step) takes, the call log, the gate."""

    def __init__(self, seconds: float, log: CallLog, gate: RequestGate | None = None):
        self.seconds, self.log, self.gate = seconds, log, gate

    def _sleep(self, context) -> None:
        """Sleep `seconds` in small steps; _ClientCancelled as soon as the client cancelled the call."""
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if context is not None and not context.is_active():
                raise _ClientCancelled
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


class StandInRollout(_StandIn, rollout_pb2_grpc.RolloutServiceServicer):
    """Generate: n responses per problem, alternating rewards (so no group has zero advantage)."""

    @_stand_in_rpc("rollout")
    def Generate(self, request, context):
        problems = read_problems(request.problems_path)
        self._sleep(context)
        n = max(1, request.sampling.n)
        records = [
            RolloutRecord(p.problem_id, (1, 2), (3, 4, 5), float((i + j) % 2), bool((i + j) % 2), "x")
            for i, p in enumerate(problems) for j in range(n)
        ]
        write_rollouts(request.output_path, records)
        stats = [
            common_pb2.ProblemStats(
                problem_id=pid, n_responses=len(group), accuracy=sum(r.correct for r in group) / len(group),
                mean_reward=sum(r.reward for r in group) / len(group), mean_response_length=3.0,
            )
            for pid, group in group_rollouts(records).items()
        ]
        yield rollout_pb2.GenerateEvent(
            result=rollout_pb2.GenerateResult(
                output_path=request.output_path, stats=stats, n_responses=len(records),
                n_response_tokens=3 * len(records), compute_seconds=self.seconds,
            )
        )


class StandInScoring(_StandIn, scoring_pb2_grpc.ScoringServiceServicer):
    """Score: a deterministic score per candidate problem (from its id)."""

    @_stand_in_rpc("scoring")
    def Score(self, request, context):
        groups = group_rollouts(r for path in request.candidate_paths for r in read_rollouts(path))
        self._sleep(context)
        for pid, group in groups.items():
            yield scoring_pb2.ScoreEvent(
                score=scoring_pb2.ProblemScore(
                    problem_id=pid, score=(hash(pid) % 1000) / 1000.0, accuracy=sum(r.correct for r in group) / len(group),
                    n_responses=len(group), zero_advantage=False,
                )
            )
        yield scoring_pb2.ScoreEvent(
            summary=scoring_pb2.ScoreSummary(n_problems=len(groups), compute_seconds=self.seconds)
        )


class StandInTrainer(_StandIn, training_pb2_grpc.TrainerServiceServicer):
    """Train: one sleep of `seconds` per step, step metrics streamed, then an (empty) checkpoint directory."""

    @_stand_in_rpc("trainer")
    def Train(self, request, context):
        steps = max(1, request.hyperparams.steps)
        for step in range(1, steps + 1):
            self._sleep(context)
            yield training_pb2.TrainEvent(step=training_pb2.StepMetrics(step=step, loss=0.0))
        out = Path(request.output_checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stand-in.txt").write_text(request.request_id)
        yield training_pb2.TrainEvent(
            result=training_pb2.TrainResult(checkpoint=str(out), steps=steps, compute_seconds=steps * self.seconds)
        )


@dataclass
class StandInWorkers:
    """The three stand-in servers on loopback ports; `addresses` maps each role to its address."""

    rollout_s: float = 0.5
    scoring_s: float = 0.3
    train_step_s: float = 0.3
    capacity: int | None = None  # requests each server admits at once; None: no limit
    log: CallLog = field(default_factory=CallLog)
    servers: list = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    gates: dict[str, RequestGate] = field(default_factory=dict)

    def __enter__(self) -> "StandInWorkers":
        def gate(role: str) -> RequestGate | None:
            if not self.capacity:
                return None
            self.gates[role] = RequestGate(role, self.capacity)
            return self.gates[role]

        for role, name, add, servicer in (
            ("rollout", "gradalign.v1.RolloutService", rollout_pb2_grpc.add_RolloutServiceServicer_to_server, StandInRollout(self.rollout_s, self.log, gate("rollout"))),
            ("scoring", "gradalign.v1.ScoringService", scoring_pb2_grpc.add_ScoringServiceServicer_to_server, StandInScoring(self.scoring_s, self.log, gate("scoring"))),
            ("trainer", "gradalign.v1.TrainerService", training_pb2_grpc.add_TrainerServiceServicer_to_server, StandInTrainer(self.train_step_s, self.log, gate("trainer"))),
        ):
            server, health, port = build_server("127.0.0.1", 0, [name], max_workers=16)
            add(servicer, server)
            server.start()
            mark_serving(health, [name])
            self.servers.append(server)
            self.addresses[role] = f"127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        for server in self.servers:
            server.stop(grace=None)



