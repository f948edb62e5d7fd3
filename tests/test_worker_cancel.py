"""A cancelled call stops the work on the worker: rollout, scoring and trainer stop between slices,
gradient batches and steps, leave no output, free their model lock and request slot, and the next
request is accepted. Timing is bounded generously only (the bench, `gradalign bench cancel`,
measures it)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from gradalign_common.datasets import load_problems
from gradalign_common.grpc_utils import channel, rpc_errors
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from gradalign_common.pb import training_pb2, training_pb2_grpc
from gradalign_common.records import write_problems, write_rollouts
from gradalign_common.request_gate import RequestGate
from gradalign_common.request_identity import sidecar_path
from gradalign_common.tiny_task import write_splits
from services.rollout import server as rollout_server
from services.rollout.backends import create_backend
from services.rollout.server import RolloutServicer
from services.rollout.settings import RolloutSettings
from services.scoring import server as scoring_server
from services.scoring.server import ScoringServicer
from services.scoring.settings import ScoringSettings
from services.trainer import server as trainer_server
from services.trainer.server import TrainerServicer
from services.trainer.settings import TrainerSettings
from scoring_fixtures import random_rollouts, save_tiny_qwen2
from trainer_fixtures import constant_answer_problems
from worker_fixtures import HeldBackend

FREE_WITHIN_S = 30.0


def wait_idle(gate: RequestGate, lock: threading.Lock) -> float:
    """Seconds until the worker has no request in flight and its model lock is free (fails past 30 s)."""
    started = time.monotonic()
    while gate.in_flight() or lock.locked():
        assert time.monotonic() - started < FREE_WITHIN_S, "the worker is still busy after the cancel"
        time.sleep(0.005)
    return time.monotonic() - started


def nothing_at(path: Path) -> bool:
    """No output, no request sidecar and no temporary beside it."""
    beside = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")] if path.parent.exists() else []
    return not path.exists() and not sidecar_path(path).exists() and beside == []


def hold_until_cancelled(monkeypatch, module, when: str) -> threading.Event:
    """Make `module.stop_if_cancelled` wait, at the first check whose `where` starts with `when`, until the
    server has seen the client's cancel; returns an event set when that check is reached. The work then
    meets the cancel at exactly that check (deterministic, no race with the remaining work)."""
    real = module.stop_if_cancelled
    reached = threading.Event()

    def held(context, where):
        if where.startswith(when) and not reached.is_set():
            reached.set()
            deadline = time.monotonic() + FREE_WITHIN_S
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.005)
        real(context, where)

    monkeypatch.setattr(module, "stop_if_cancelled", held)
    return reached


def _served(create):
    server, _, port = create()
    return server, channel(f"127.0.0.1:{port}")


# --- rollout ----------------------------------------------------------------------------------


@pytest.fixture
def rollout(tmp_path):
    settings = RolloutSettings(port=0, artifact_root=tmp_path, batch_size=4, max_model_len=32, reward_workers=0)
    backend = HeldBackend(create_backend(settings))
    backend.release.set()  # generate runs freely unless a test clears it
    servicer = RolloutServicer(settings, backend=backend)

    def create():
        server, health, port = rollout_server.create_server(settings, servicer)
        server.start()
        return server, health, port

    server, ch = _served(create)
    yield rollout_pb2_grpc.RolloutServiceStub(ch), servicer, backend
    backend.release.set()
    ch.close()
    server.stop(0)
    servicer.close()


@pytest.fixture
def problems_path(tmp_path):
    problems = load_problems(write_splits(tmp_path / "data")["val"])[:12]  # 3 slices of 4
    return write_problems(tmp_path / "problems.parquet", problems)


def _generate_request(checkpoint, problems_path, out, request_id="cancel/rollout"):
    return rollout_pb2.GenerateRequest(
        request_id=request_id, checkpoint=str(checkpoint), problems_path=str(problems_path), output_path=str(out),
        sampling=common_pb2.SamplingParams(n=2, max_tokens=3, temperature=1.0, top_p=1.0, seed=1),
    )  # fmt: skip


def test_cancel_between_rollout_slices_stops_the_request(rollout, tiny_model_dir, problems_path, tmp_path, monkeypatch):
    stub, servicer, _ = rollout
    out = tmp_path / "rollouts.parquet"
    reached = hold_until_cancelled(monkeypatch, rollout_server, "4 of 12")
    with capture_logs() as logs:
        call = stub.Generate(_generate_request(tiny_model_dir, problems_path, out), timeout=120)
        first = next(call)
        assert first.progress.done == 4 and first.progress.total == 12
        assert reached.wait(FREE_WITHIN_S)
        call.cancel()
        wait_idle(servicer.gate, servicer.lock)
    assert nothing_at(out)
    cancelled = [e for e in logs if e["event"] == "rollout_cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["request_id"] == "cancel/rollout"
    assert cancelled[0]["detail"] == "4 of 12 problems generated"
    assert not any(e["event"] == "generated" and e.get("request_id") == "cancel/rollout" for e in logs)

    events = list(stub.Generate(_generate_request(tiny_model_dir, problems_path, out), timeout=120))
    assert events[-1].HasField("result") and out.exists()


def test_cancel_while_a_slice_generates_frees_the_worker_at_its_next_event(rollout, tiny_model_dir, problems_path, tmp_path):
    """The client goes away while the worker is inside generate(): grpc closes the stream when the worker next
    yields (GeneratorExit), which releases the model lock and the slot; nothing is written."""
    stub, servicer, backend = rollout
    out = tmp_path / "rollouts.parquet"
    backend.release.clear()
    backend.hold_after = backend.calls + 1  # the request's first slice runs, its second waits
    call = stub.Generate(_generate_request(tiny_model_dir, problems_path, out), timeout=120)
    assert next(call).progress.done == 4
    assert backend.entered.wait(FREE_WITHIN_S)  # the second slice is in generate()
    call.cancel()
    time.sleep(0.2)
    backend.release.set()
    wait_idle(servicer.gate, servicer.lock)
    assert nothing_at(out)
    events = list(stub.Generate(_generate_request(tiny_model_dir, problems_path, tmp_path / "next.parquet"), timeout=120))
    assert events[-1].HasField("result")


# --- scoring ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scoring_model_dir(tmp_path_factory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("cancel-scoring-model"))


def test_cancel_during_the_validation_gradient_stops_it(scoring_model_dir, tmp_path, monkeypatch):
    candidates = write_rollouts(tmp_path / "candidates.parquet", random_rollouts(seed=1, n_problems=8, prefix="c"))
    validation = write_rollouts(tmp_path / "validation.parquet", random_rollouts(seed=2, n_problems=40, prefix="v"))
    # small batches: the validation gradient takes several, with a cancel check after each
    settings = ScoringSettings(host="127.0.0.1", port=0, max_batch_tokens=64)
    servicer = ScoringServicer(settings)
    server, ch = _served(lambda: scoring_server.start_server(settings, servicer))
    stub = scoring_pb2_grpc.ScoringServiceStub(ch)
    out = tmp_path / "scores.jsonl"

    def request(out_path):
        return scoring_pb2.ScoreRequest(
            request_id="cancel/score", checkpoint=str(scoring_model_dir), candidate_paths=[str(candidates)],
            validation_paths=[str(validation)], mode="sim", output_path=str(out_path),
        )  # fmt: skip

    try:
        reached = hold_until_cancelled(monkeypatch, scoring_server, "validation gradient")
        with capture_logs() as logs:
            call = stub.Score(request(out), timeout=120)
            assert next(call).progress.done == 0
            assert reached.wait(FREE_WITHIN_S)
            call.cancel()
            wait_idle(servicer.gate, servicer._lock)
        assert nothing_at(out)
        assert servicer._validation_cache is None  # the gradient stopped part-way: nothing was cached
        cancelled = [e for e in logs if e["event"] == "scoring_cancelled"]
        assert len(cancelled) == 1 and cancelled[0]["detail"].startswith("validation gradient: ")
        done, total = cancelled[0]["detail"].removeprefix("validation gradient: ").split(" groups")[0].split(" of ")
        assert 0 < int(done) < int(total) == 40

        monkeypatch.undo()
        events = list(stub.Score(request(out), timeout=120))
        assert events[-1].HasField("summary") and events[-1].summary.n_problems == 8 and out.exists()
    finally:
        ch.close()
        server.stop(None)


# --- trainer ----------------------------------------------------------------------------------


def test_cancel_between_training_steps_leaves_no_checkpoint(random_tiny_checkpoint, tmp_path, monkeypatch):
    artifacts = tmp_path / "artifacts"
    problems = write_problems(artifacts / "selection.parquet", constant_answer_problems(6))
    settings = TrainerSettings(host="127.0.0.1", port=0, artifact_root=artifacts)
    servicer = TrainerServicer(settings)

    def create():
        server, health, port = trainer_server.create_server(settings, servicer)
        server.start()
        return server, health, port

    server, ch = _served(create)
    stub = training_pb2_grpc.TrainerServiceStub(ch)

    def request(output, steps):
        return training_pb2.TrainRequest(
            request_id="cancel/train", checkpoint=str(random_tiny_checkpoint), problems_path=str(problems),
            output_checkpoint=str(output),
            hyperparams=training_pb2.TrainHyperparams(
                steps=steps, batch_size=3, learning_rate=1e-2, micro_batch_size=8, seed=1,
                sampling=common_pb2.SamplingParams(n=4, max_tokens=3, temperature=1.0),
            ),
        )  # fmt: skip

    output = artifacts / "checkpoints" / "round-00001"
    try:
        reached = hold_until_cancelled(monkeypatch, trainer_server, "1 of 50")
        with capture_logs() as logs:
            call = stub.Train(request(output, 50), timeout=120)
            assert next(call).step.step == 1
            assert reached.wait(FREE_WITHIN_S)
            call.cancel()
            wait_idle(servicer.gate, servicer._lock)
        assert not output.exists()
        assert not output.parent.exists() or list(output.parent.iterdir()) == []  # no temporary directory either
        cancelled = [e for e in logs if e["event"] == "trainer_cancelled"]
        assert len(cancelled) == 1 and cancelled[0]["detail"] == "1 of 50 steps done"

        monkeypatch.undo()
        events = list(stub.Train(request(output, 2), timeout=120))
        assert events[-1].HasField("result") and events[-1].result.steps == 2 and output.is_dir()
    finally:
        ch.close()
        server.stop(None)


# --- rpc_errors' handling of a closed stream ---------------------------------------------------------


def test_a_stream_closed_by_grpc_is_logged_as_cancelled_and_frees_the_slot():
    gate = RequestGate("unit-cancel", 1)

    class Servicer:
        @rpc_errors("unit")
        def Call(self, request, context):
            with gate.slot():
                yield 1
                yield 2

    class Request:
        request_id = "r-1"

    with capture_logs() as logs:
        stream = Servicer().Call(Request(), None)
        assert next(stream) == 1 and gate.in_flight() == 1
        stream.close()
    assert gate.in_flight() == 0
    assert [(e["event"], e["request_id"], e["detail"]) for e in logs] == [("unit_cancelled", "r-1", "stream closed")]


def test_output_is_left_alone_by_a_cancelled_grpc_call_with_a_deadline(rollout, tiny_model_dir, problems_path, tmp_path):
    """A client's deadline ends the call like a cancel: the worker stops and writes nothing."""
    stub, servicer, backend = rollout
    out = tmp_path / "rollouts.parquet"
    backend.release.clear()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(_generate_request(tiny_model_dir, problems_path, out), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    backend.release.set()
    wait_idle(servicer.gate, servicer.lock)
    assert nothing_at(out)
