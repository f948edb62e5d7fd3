"""Graceful shutdown of a worker process (gradalign_common.grpc_utils: the drain): on SIGTERM a scoring worker
refuses new requests at once with UNAVAILABLE, reports NOT_SERVING, lets the request in flight finish and
exits; when the drain time (GRADALIGN_SCORING_SHUTDOWN_GRACE_S) runs out first, the request is handed back
(UNAVAILABLE, nothing written) and the process exits. In process: a handler that only yields events (never
checks for a cancel) is handed back at its next event, and an open health Watch does not hold the drain up.

The worker is a real process (gradalign_tools.stack.start_process). A small launcher holds its request at
the first validation-gradient check until the test creates a release file, still calling the real
`stop_if_cancelled` while it waits (so a hand-back stops it there, as it would stop real work between
batches): the request takes exactly as long as the test needs, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradalign_common.grpc_utils import HANDBACK_DETAIL, REFUSED_DETAIL, build_server, channel, drain_and_stop, mark_serving
from gradalign_common.grpc_utils import wait_healthy
from gradalign_common.pb import scoring_pb2, scoring_pb2_grpc
from gradalign_common.records import write_rollouts
from gradalign_common.request_identity import sidecar_path
from gradalign_tools.stack import free_port, start_process
from scoring_fixtures import random_rollouts
from services.scoring.server import SERVICE_NAME

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0  # importing torch on a busy 2-core machine
OLD_GRACE_S = 5.0  # the fixed grace of the shutdown before the drain: the first case holds its request past it
EXIT_AFTER_S = 5.0  # how soon the process must exit once nothing is in flight (or once handed back)

LAUNCHER = """
import sys, time
from pathlib import Path
from services.scoring import server

held, release = Path(sys.argv[1]), Path(sys.argv[2])
real = server.stop_if_cancelled

def stop_if_cancelled(context, where):
    if where.startswith("validation gradient") and not held.exists():
        held.write_text(where)
        while not release.exists():
            real(context, where)  # a cancelled or handed-back call stops here
            time.sleep(0.02)
    real(context, where)

server.stop_if_cancelled = stop_if_cancelled
server.main()
"""


class Worker:
    """A scoring worker process with the holding launcher; `release()` lets its held request go on."""

    def __init__(self, tmp_path: Path, grace_s: float):
        self.held, self._release = tmp_path / "held", tmp_path / "release"
        self.log = tmp_path / "scoring.log"
        launcher = tmp_path / "launch_scoring.py"
        launcher.write_text(LAUNCHER)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
            "GRADALIGN_SCORING_HOST": "127.0.0.1", "GRADALIGN_SCORING_PORT": str(port),
            "GRADALIGN_SCORING_METRICS_PORT": "0", "GRADALIGN_SCORING_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
            "GRADALIGN_SCORING_TORCH_THREADS": "1", "GRADALIGN_SCORING_MAX_BATCH_TOKENS": "64",
            "GRADALIGN_SCORING_SHUTDOWN_GRACE_S": str(grace_s),
        }  # fmt: skip
        self.proc = start_process([sys.executable, str(launcher), str(self.held), str(self._release)], env, self.log)
        if not wait_healthy(self.address, timeout=START_TIMEOUT_S):
            self.stop()
            pytest.fail(f"the scoring worker did not become healthy:\n{self.log.read_text()[-3000:]}")
        self.channel = channel(self.address)
        self.stub = scoring_pb2_grpc.ScoringServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def release(self) -> None:
        self._release.write_text("go")

    def wait_held(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.held.exists():
            assert self.proc.poll() is None, f"the worker died:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the request never reached its validation gradient"
            time.sleep(0.02)

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0).status

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def stop(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def worker(tmp_path):
    made: list[Worker] = []

    def make(grace_s: float) -> Worker:
        made.append(Worker(tmp_path, grace_s))
        return made[-1]

    yield make
    for w in made:
        w.stop()


@pytest.fixture
def score_request(tmp_path, random_qwen2_dir):
    candidates = write_rollouts(tmp_path / "candidates.parquet", random_rollouts(seed=1, n_problems=4, prefix="c"))
    validation = write_rollouts(tmp_path / "validation.parquet", random_rollouts(seed=2, n_problems=8, prefix="v"))

    def make(out: Path, request_id: str) -> scoring_pb2.ScoreRequest:
        return scoring_pb2.ScoreRequest(
            request_id=request_id, checkpoint=str(random_qwen2_dir), candidate_paths=[str(candidates)],
            validation_paths=[str(validation)], mode="sim", output_path=str(out),
        )  # fmt: skip

    return make


def nothing_at(path: Path) -> bool:
    """No output, no request sidecar and no temporary beside it."""
    beside = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")] if path.parent.exists() else []
    return not path.exists() and not sidecar_path(path).exists() and beside == []


def refused_while_draining(w: Worker, score_request, out: Path) -> None:
    """A new request is refused at once with UNAVAILABLE, and health reports NOT_SERVING."""
    assert w.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert w.health_status(SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        list(w.stub.Score(score_request(out, "drain/new"), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert refused.value.details() == REFUSED_DETAIL
    assert time.monotonic() - started < 2.0, "the refusal was not immediate"
    assert nothing_at(out)


def test_sigterm_lets_the_request_in_flight_finish_and_refuses_new_ones(worker, score_request, tmp_path):
    w = worker(grace_s=120)
    out = tmp_path / "scores.jsonl"
    call = w.stub.Score(score_request(out, "drain/running"), timeout=120)
    assert next(call).progress.done == 0
    w.wait_held()

    signalled = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # the signal handler runs in the worker's main thread
    refused_while_draining(w, score_request, tmp_path / "refused.jsonl")
    # hold the request past the old fixed 5 s grace: it must still be running, and the worker still up
    time.sleep(max(0.0, signalled + OLD_GRACE_S + 1.0 - time.monotonic()))
    assert w.proc.poll() is None, "the worker exited with a request in flight"
    assert w.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING

    w.release()
    events = list(call)
    finished = time.monotonic()
    assert events[-1].HasField("summary"), events[-1]
    assert events[-1].summary.n_problems == 4 and events[-1].summary.output_path == str(out)
    assert len(out.read_text().splitlines()) == 4 and sidecar_path(out).exists()

    assert w.proc.wait(timeout=EXIT_AFTER_S + 10) == 0
    exited_after = time.monotonic() - finished
    assert exited_after < EXIT_AFTER_S, f"exited {exited_after:.1f} s after the request finished"
    names = [e.get("event") for e in w.events()]
    assert "drain_started" in names and "drain_finished" in names and "drain_timeout" not in names, names
    assert "request_refused_draining" in names


def test_a_request_outlasting_the_drain_time_is_handed_back(worker, score_request, tmp_path):
    grace_s = 2.0
    w = worker(grace_s=grace_s)
    out = tmp_path / "scores.jsonl"
    call = w.stub.Score(score_request(out, "drain/handed-back"), timeout=120)
    assert next(call).progress.done == 0
    w.wait_held()  # and never released: it would run forever

    signalled = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused_while_draining(w, score_request, tmp_path / "refused.jsonl")
    with pytest.raises(grpc.RpcError) as handed_back:
        list(call)
    ended = time.monotonic() - signalled
    assert handed_back.value.code() == grpc.StatusCode.UNAVAILABLE, handed_back.value
    assert handed_back.value.details() == HANDBACK_DETAIL
    assert grace_s - 0.5 <= ended < grace_s + 3.0, f"handed back {ended:.1f} s after SIGTERM"
    assert w.proc.wait(timeout=grace_s + EXIT_AFTER_S + 10) == 0
    exited = time.monotonic() - signalled
    assert exited < grace_s + EXIT_AFTER_S, f"exited {exited:.1f} s after SIGTERM (drain time {grace_s} s)"
    assert nothing_at(out)
    events = w.events()
    timeout = [e for e in events if e.get("event") == "drain_timeout"]
    back = [e for e in events if e.get("event") == "drain_handed_back"]
    assert len(timeout) == 1 and timeout[0]["in_flight"] == 1
    assert len(back) == 1 and back[0]["handed_back"] == 1 and back[0]["still_running"] == 0
    assert not any(e.get("event") == "scored" for e in events)


def test_a_handler_that_only_yields_is_handed_back_at_its_next_event():
    closed = threading.Event()

    def endless(request, context):  # never checks for a cancel itself
        try:
            while True:
                time.sleep(0.05)
                yield b"event"
        finally:
            closed.set()

    server, health, port = build_server("127.0.0.1", 0, ["t.Endless"])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Endless", {
        "Run": grpc.unary_stream_rpc_method_handler(endless),
    }),))  # fmt: skip
    server.start()
    mark_serving(health, ["t.Endless"])
    with channel(f"127.0.0.1:{port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # an open stream of the health service
        call = ch.unary_stream("/t.Endless/Run")(b"", timeout=30)
        assert next(call) == b"event"
        started = time.monotonic()
        drained = threading.Thread(target=drain_and_stop, args=(server, health, 0.5))
        drained.start()
        with pytest.raises(grpc.RpcError) as handed_back:
            for _ in call:
                pass
        assert handed_back.value.code() == grpc.StatusCode.UNAVAILABLE and handed_back.value.details() == HANDBACK_DETAIL
        assert closed.wait(5), "the handler was not closed"
        drained.join(10)
        assert not drained.is_alive() and time.monotonic() - started < 5.0
        watch.cancel()


@pytest.mark.parametrize("detail, busy", [(REFUSED_DETAIL, True), (HANDBACK_DETAIL, True), ("connection refused", False)])
def test_the_scheduler_retries_a_draining_worker_without_counting_an_attempt(detail, busy):
    """A draining worker's refusal or hand-back is WorkerBusy for the scheduler (queued again, no attempt used up);
    any other UNAVAILABLE stays a counted WorkerUnavailable."""
    from services.scheduler.workers import WorkerBusy, WorkerCall, WorkerUnavailable

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return detail

    def open_stream(_channel):
        raise Unavailable()

    with pytest.raises(WorkerUnavailable) as info:
        list(WorkerCall("scoring", "127.0.0.1:1", 5.0).stream(open_stream))
    assert isinstance(info.value, WorkerBusy) is busy
