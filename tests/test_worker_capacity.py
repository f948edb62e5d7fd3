"""Worker capacity: the request gate (gradalign_common.request_gate) refuses requests beyond
max_concurrent_requests at once with RESOURCE_EXHAUSTED, and the health service keeps answering
while a worker is saturated."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from pydantic import ValidationError

from gradalign_common.datasets import load_problems
from gradalign_common.errors import WorkerBusyError
from gradalign_common.grpc_utils import channel, mark_serving
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from gradalign_common.pb import training_pb2, training_pb2_grpc
from gradalign_common.records import write_problems
from gradalign_common.request_gate import RequestGate
from gradalign_common.tiny_task import write_splits
from services.rollout.backends import create_backend
from services.rollout.server import SERVICE_NAME as ROLLOUT_SERVICE
from services.rollout.server import RolloutServicer, create_server
from services.rollout.settings import RolloutSettings
from services.scoring.server import ScoringServicer, start_server
from services.scoring.settings import ScoringSettings
from services.trainer.server import TrainerServicer
from services.trainer.server import create_server as create_trainer_server
from services.trainer.settings import TrainerSettings
from worker_fixtures import HeldBackend


def _metric(name: str, service: str) -> float:
    return REGISTRY.get_sample_value(name, {"service": service}) or 0.0


# --- the gate itself ------------------------------------------------------------------------


def test_the_gate_admits_up_to_capacity_and_refuses_the_rest_at_once():
    gate = RequestGate("gate-unit", 2)
    refused = _metric("gradalign_worker_requests_refused_total", "gate-unit")
    with gate.slot():
        with gate.slot():
            assert gate.in_flight() == 2
            assert _metric("gradalign_worker_requests_in_flight", "gate-unit") == 2
            with pytest.raises(WorkerBusyError, match=r"^gate-unit service busy: 2 of 2 request slots in use; retry later$"):
                with gate.slot():
                    raise AssertionError("admitted past capacity")
        assert gate.in_flight() == 1
    assert gate.in_flight() == 0
    assert _metric("gradalign_worker_requests_in_flight", "gate-unit") == 0
    assert _metric("gradalign_worker_requests_refused_total", "gate-unit") == refused + 1
    with pytest.raises(ValueError):
        RequestGate("gate-unit", 0)


def test_a_slot_is_released_however_the_handler_generator_ends():
    gate = RequestGate("gate-unit-2", 1)

    def handler(fail: bool = False):
        with gate.slot():
            yield 1
            if fail:
                raise RuntimeError("boom")
            yield 2

    assert list(handler()) == [1, 2] and gate.in_flight() == 0  # normal end
    with pytest.raises(RuntimeError):
        list(handler(fail=True))
    assert gate.in_flight() == 0  # an error
    stream = handler()
    next(stream)
    assert gate.in_flight() == 1
    stream.close()  # what grpc does (GeneratorExit at the yield) when the client has cancelled
    assert gate.in_flight() == 0


def test_max_concurrent_requests_setting(monkeypatch):
    assert RolloutSettings().max_concurrent_requests == 1
    assert ScoringSettings().max_concurrent_requests == 1
    assert TrainerSettings().max_concurrent_requests == 1
    monkeypatch.setenv("GRADALIGN_ROLLOUT_MAX_CONCURRENT_REQUESTS", "3")
    monkeypatch.setenv("GRADALIGN_SCORING_MAX_CONCURRENT_REQUESTS", "4")
    monkeypatch.setenv("GRADALIGN_TRAINER_MAX_CONCURRENT_REQUESTS", "2")
    assert RolloutSettings().max_concurrent_requests == 3
    assert ScoringSettings().max_concurrent_requests == 4
    assert TrainerSettings().max_concurrent_requests == 2
    with pytest.raises(ValidationError):
        RolloutSettings(max_concurrent_requests=0)
    assert "slots" in RolloutSettings.model_fields["max_concurrent_requests"].description


# --- over gRPC: a rollout worker whose generate calls wait for the test -------------------------


@pytest.fixture
def problems_path(tmp_path):
    problems = load_problems(write_splits(tmp_path / "data")["val"])[:6]
    return write_problems(tmp_path / "problems.parquet", problems)


@pytest.fixture
def held_rollout(tmp_path, request):
    capacity = getattr(request, "param", 1)
    settings = RolloutSettings(
        port=0, artifact_root=tmp_path, batch_size=4, max_model_len=32, reward_workers=0,
        max_concurrent_requests=capacity,
    )  # fmt: skip
    backend = HeldBackend(create_backend(settings))
    servicer = RolloutServicer(settings, backend=backend)
    server, health, port = create_server(settings, servicer)
    server.start()
    mark_serving(health, [ROLLOUT_SERVICE])
    ch = channel(f"127.0.0.1:{port}")
    yield rollout_pb2_grpc.RolloutServiceStub(ch), health_pb2_grpc.HealthStub(ch), servicer, backend
    backend.release.set()
    ch.close()
    server.stop(0)
    servicer.close()


def _request(checkpoint, problems_path, out, request_id="cap/0"):
    return rollout_pb2.GenerateRequest(
        request_id=request_id, checkpoint=str(checkpoint), problems_path=str(problems_path), output_path=str(out),
        sampling=common_pb2.SamplingParams(n=2, max_tokens=3, temperature=1.0, top_p=1.0, seed=1),
    )  # fmt: skip


def _start(stub, req) -> tuple[threading.Thread, list]:
    """Consume a Generate call in a thread; the list gets its events, or the RpcError."""
    got: list = []

    def consume():
        try:
            got.extend(stub.Generate(req, timeout=120))
        except grpc.RpcError as exc:
            got.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return thread, got


def _refused(stub, req) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, timeout=30))
    return info.value


def test_a_request_beyond_capacity_is_refused_at_once_and_accepted_once_the_first_ends(
    held_rollout, tiny_model_dir, problems_path, tmp_path
):
    stub, _, servicer, backend = held_rollout
    thread, first = _start(stub, _request(tiny_model_dir, problems_path, tmp_path / "a.parquet", "cap/a"))
    assert backend.entered.wait(60)
    assert servicer.gate.in_flight() == 1
    refused_before = _metric("gradalign_worker_requests_refused_total", "rollout")

    started = time.monotonic()
    err = _refused(stub, _request(tiny_model_dir, problems_path, tmp_path / "b.parquet", "cap/b"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "rollout service busy: 1 of 1 request slots in use; retry later"
    assert time.monotonic() - started < 10  # answered at once, not after the first request (which is held)
    assert not (tmp_path / "b.parquet").exists()
    assert _metric("gradalign_worker_requests_refused_total", "rollout") == refused_before + 1
    assert _metric("gradalign_worker_requests_in_flight", "rollout") >= 1

    backend.release.set()
    thread.join(60)
    assert first[-1].HasField("result"), first[-1]
    assert servicer.gate.in_flight() == 0
    events = list(stub.Generate(_request(tiny_model_dir, problems_path, tmp_path / "b.parquet", "cap/b"), timeout=60))
    assert events[-1].HasField("result") and (tmp_path / "b.parquet").exists()


def test_health_answers_while_the_worker_is_saturated(held_rollout, tiny_model_dir, problems_path, tmp_path):
    """One request holds the model; 12 more arrive at once (the old 4-thread pool would have been full
    of requests queued on the lock). They are refused, and Check answers within 1 s throughout."""
    stub, health_stub, servicer, backend = held_rollout
    thread, _ = _start(stub, _request(tiny_model_dir, problems_path, tmp_path / "a.parquet", "sat/a"))
    assert backend.entered.wait(60)
    check = health_pb2.HealthCheckRequest(service=ROLLOUT_SERVICE)

    def extra(i):
        try:
            list(stub.Generate(_request(tiny_model_dir, problems_path, tmp_path / f"x{i}.parquet", f"sat/{i}"), timeout=60))
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(12) as pool:
        codes = [pool.submit(extra, i) for i in range(12)]
        for _ in range(5):
            assert health_stub.Check(check, timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING
        codes = [f.result() for f in codes]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 12
    assert servicer.gate.in_flight() == 1
    assert health_stub.Check(check, timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING
    backend.release.set()
    thread.join(60)


@pytest.mark.parametrize("held_rollout", [2], indirect=True)
def test_capacity_two_admits_a_second_request_which_waits_for_the_model(
    held_rollout, tiny_model_dir, problems_path, tmp_path
):
    stub, _, servicer, backend = held_rollout
    first_thread, first = _start(stub, _request(tiny_model_dir, problems_path, tmp_path / "a.parquet", "two/a"))
    assert backend.entered.wait(60)
    second_thread, second = _start(stub, _request(tiny_model_dir, problems_path, tmp_path / "b.parquet", "two/b"))
    deadline = time.monotonic() + 30
    while servicer.gate.in_flight() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert servicer.gate.in_flight() == 2
    err = _refused(stub, _request(tiny_model_dir, problems_path, tmp_path / "c.parquet", "two/c"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 of 2 request slots" in err.details()
    backend.release.set()
    first_thread.join(60)
    second_thread.join(60)
    assert first[-1].HasField("result") and second[-1].HasField("result")


# --- scoring and trainer use their gates too ------------------------------------------------------


def _assert_busy_then_stop(server, port: int, gate: RequestGate, call, message: str) -> None:
    """`call(channel)` (a streaming RPC, consumed) to `server` on `port`, while the test holds every slot of
    its `gate`, is refused: RESOURCE_EXHAUSTED with `message`. The server is stopped whatever happens."""
    try:
        with channel(f"127.0.0.1:{port}") as ch, contextlib.ExitStack() as held:
            for _ in range(gate.capacity):
                held.enter_context(gate.slot())
            with pytest.raises(grpc.RpcError) as info:
                list(call(ch))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == message
    finally:
        server.stop(None)


def test_scoring_and_trainer_refuse_when_their_slots_are_taken(tmp_path):
    scoring = ScoringServicer(ScoringSettings(host="127.0.0.1", port=0))
    server, _, port = start_server(ScoringSettings(host="127.0.0.1", port=0), scoring)
    _assert_busy_then_stop(
        server, port, scoring.gate,
        lambda ch: scoring_pb2_grpc.ScoringServiceStub(ch).Score(scoring_pb2.ScoreRequest(mode="rand"), timeout=30),
        "scoring service busy: 1 of 1 request slots in use; retry later",
    )

    settings = TrainerSettings(host="127.0.0.1", port=0, artifact_root=tmp_path, max_concurrent_requests=2)
    trainer = TrainerServicer(settings)
    server, _, port = create_trainer_server(settings, trainer)
    server.start()
    _assert_busy_then_stop(
        server, port, trainer.gate,
        lambda ch: training_pb2_grpc.TrainerServiceStub(ch).Train(training_pb2.TrainRequest(request_id="t"), timeout=30),
        "trainer service busy: 2 of 2 request slots in use; retry later",
    )
