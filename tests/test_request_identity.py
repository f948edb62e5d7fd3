"""Request identity (gradalign_common.request_identity): a request_id reused with a different body is
refused with ALREADY_EXISTS by the trainer (checkpoint marker), rollout and scoring (sidecar beside the
output); the same body is accepted."""

from __future__ import annotations

import json

import grpc
import pytest

from gradalign_common.datasets import load_problems
from gradalign_common.errors import RequestConflictError
from gradalign_common.grpc_utils import channel
from gradalign_common.pb import common_pb2, rollout_pb2, scoring_pb2, scoring_pb2_grpc
from gradalign_common.pb import training_pb2, training_pb2_grpc
from gradalign_common.records import write_problems, write_rollouts
from gradalign_common.request_identity import (
    check_request,
    is_same_request,
    record_request,
    request_fingerprint,
    sidecar_path,
)
from gradalign_common.tiny_task import write_splits
from services.scoring.server import start_server as start_scoring_server
from services.scoring.settings import ScoringSettings
from services.trainer import server as trainer_server
from services.trainer.backends import torch as torch_backend
from services.trainer.server import MARKER_NAME
from services.trainer.settings import TrainerSettings
from rollout_fixtures import serving_rollout
from scoring_fixtures import random_rollouts
from trainer_fixtures import constant_answer_problems


def _sampling(seed=1):
    return common_pb2.SamplingParams(n=2, max_tokens=3, temperature=1.0, top_p=1.0, seed=seed)


def test_the_fingerprint_ignores_the_request_id_and_nothing_else():
    a = rollout_pb2.GenerateRequest(request_id="a", checkpoint="c", problems_path="p", output_path="o", sampling=_sampling())
    b = rollout_pb2.GenerateRequest(request_id="b", checkpoint="c", problems_path="p", output_path="o", sampling=_sampling())
    assert request_fingerprint(a) == request_fingerprint(b) and len(request_fingerprint(a)) == 64
    assert a.request_id == "a"  # the message itself is left alone
    for change in ({"checkpoint": "d"}, {"output_path": "p"}, {"sampling": _sampling(seed=2)}):
        other = rollout_pb2.GenerateRequest()
        other.CopyFrom(a)
        for field, value in change.items():
            if isinstance(value, common_pb2.SamplingParams):
                getattr(other, field).CopyFrom(value)
            else:
                setattr(other, field, value)
        assert request_fingerprint(other) != request_fingerprint(a), change


def test_the_sidecar_rules(tmp_path):
    out = tmp_path / "out.parquet"
    check_request(out, "r", "f1")  # nothing recorded yet
    out.write_bytes(b"x")
    record_request(out, "r", "f1")
    assert json.loads(sidecar_path(out).read_text()) == {"request_id": "r", "fingerprint": "f1"}
    check_request(out, "r", "f1")  # a retry
    check_request(out, "other", "f2")  # another request may replace the output
    with pytest.raises(RequestConflictError, match="'r'"):
        check_request(out, "r", "f2")
    out.unlink()
    check_request(out, "r", "f2")  # a sidecar without its output binds nothing
    assert is_same_request({"request_id": "r"}, "r", "f2", "x")  # recorded before fingerprints: no conflict
    assert not is_same_request({"request_id": "r", "fingerprint": "f1"}, "", "f2", "x")  # no id: no identity


# --- trainer ------------------------------------------------------------------------------------


@pytest.fixture
def trainer(tmp_path):
    artifacts = tmp_path / "artifacts"
    server, _, port = trainer_server.create_server(TrainerSettings(host="127.0.0.1", port=0, artifact_root=artifacts))
    server.start()
    ch = channel(f"127.0.0.1:{port}")
    yield training_pb2_grpc.TrainerServiceStub(ch), artifacts
    ch.close()
    server.stop(None)


def _train_request(checkpoint, problems, output, learning_rate=1e-2, request_id="e/1/train"):
    return training_pb2.TrainRequest(
        request_id=request_id, checkpoint=str(checkpoint), problems_path=str(problems), output_checkpoint=str(output),
        hyperparams=training_pb2.TrainHyperparams(
            steps=1, batch_size=3, learning_rate=learning_rate, micro_batch_size=8, seed=1,
            sampling=common_pb2.SamplingParams(n=4, max_tokens=3, temperature=1.0),
        ),
    )  # fmt: skip


def test_the_trainer_refuses_a_known_request_id_with_a_different_body(trainer, random_tiny_checkpoint, monkeypatch):
    stub, artifacts = trainer
    problems = write_problems(artifacts / "selection.parquet", constant_answer_problems(6))
    output = artifacts / "checkpoints" / "round-00001"
    first = list(stub.Train(_train_request(random_tiny_checkpoint, problems, output), timeout=60))
    marker = json.loads((output / MARKER_NAME).read_text())
    assert marker["fingerprint"] == request_fingerprint(_train_request(random_tiny_checkpoint, problems, output))
    stamp = (output / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(torch_backend, "GRPOTrainer", no_training)
    # same id, same body: answered from the marker
    assert list(stub.Train(_train_request(random_tiny_checkpoint, problems, output), timeout=60)) == first
    # same id, another body: refused, the checkpoint untouched
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(_train_request(random_tiny_checkpoint, problems, output, learning_rate=5e-3), timeout=60))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'e/1/train'" in info.value.details() and "different request body" in info.value.details()
    assert (output / "model.safetensors").stat().st_mtime_ns == stamp

    # a marker written before fingerprints existed: the id alone decides, as before
    del marker["fingerprint"]
    (output / MARKER_NAME).write_text(json.dumps(marker))
    again = list(stub.Train(_train_request(random_tiny_checkpoint, problems, output, learning_rate=5e-3), timeout=60))
    assert again[-1].result.checkpoint == str(output) and again[-1].result.steps == 1


# --- rollout and scoring --------------------------------------------------------------------------


@pytest.fixture
def rollout(tmp_path):
    with serving_rollout(tmp_path, reward_workers=0) as (stub, _):
        yield stub


def test_rollout_refuses_a_known_request_id_with_a_different_body(rollout, tiny_model_dir, tmp_path):
    problems = write_problems(tmp_path / "problems.parquet", load_problems(write_splits(tmp_path / "data")["val"])[:4])
    out = tmp_path / "rollouts.parquet"

    def generate(request_id, seed):
        request = rollout_pb2.GenerateRequest(
            request_id=request_id, checkpoint=str(tiny_model_dir), problems_path=str(problems), output_path=str(out),
            sampling=_sampling(seed),
        )  # fmt: skip
        return list(rollout.Generate(request, timeout=60))

    assert generate("e/0/rollout_train/0", seed=1)[-1].HasField("result")
    assert json.loads(sidecar_path(out).read_text())["request_id"] == "e/0/rollout_train/0"
    assert generate("e/0/rollout_train/0", seed=1)[-1].HasField("result")  # a retry recomputes
    written = out.read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        generate("e/0/rollout_train/0", seed=2)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "'e/0/rollout_train/0'" in info.value.details()
    assert out.read_bytes() == written
    assert generate("e/1/rollout_train/0", seed=2)[-1].HasField("result")  # a new id may replace it
    assert json.loads(sidecar_path(out).read_text())["request_id"] == "e/1/rollout_train/0"


def test_scoring_refuses_a_known_request_id_with_a_different_body(tmp_path):
    candidates = write_rollouts(tmp_path / "candidates.parquet", random_rollouts(seed=1, n_problems=4, prefix="c"))
    out = tmp_path / "scores.jsonl"
    server, _, port = start_scoring_server(ScoringSettings(host="127.0.0.1", port=0))
    try:
        with channel(f"127.0.0.1:{port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)

            def score(seed):
                request = scoring_pb2.ScoreRequest(
                    request_id="e/0/score/0", candidate_paths=[str(candidates)], mode="rand", seed=seed,
                    output_path=str(out),
                )  # fmt: skip
                return list(stub.Score(request, timeout=60))

            assert score(1)[-1].HasField("summary") and score(1)[-1].HasField("summary")
            with pytest.raises(grpc.RpcError) as info:
                score(2)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "e/0/score/0" in info.value.details()
    finally:
        server.stop(None)
