"""The gRPC TrainerService in process (services/trainer/server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from pydantic import ValidationError

from gradalign_common.errors import InvalidInputError
from gradalign_common.modeling import load_model, load_tokenizer
from gradalign_common.optimizer_state import read_optimizer_state
from gradalign_common.pb import common_pb2, training_pb2, training_pb2_grpc
from gradalign_common.records import write_problems, write_rollouts, write_rollouts_jsonl
from services.trainer.grpo import batch_for_step
from services.trainer.reuse import first_batch_rollouts
from services.trainer import losses
from services.trainer.backends import torch as torch_backend
from services.trainer.backends.torch import OPTIMIZER_STATE_NAME
from services.trainer.marker import MARKER_NAME
from services.trainer.server import config_from_proto, create_server
from services.trainer.settings import TrainerSettings
from trainer_fixtures import build_random_tiny_model, constant_answer_problems, made_up_rollouts


@pytest.fixture
def artifacts(tmp_path):
    return tmp_path / "artifacts"


@pytest.fixture
def stub(artifacts):
    server, _, port = create_server(TrainerSettings(host="127.0.0.1", port=0, artifact_root=artifacts))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield training_pb2_grpc.TrainerServiceStub(channel)
    channel.close()
    server.stop(None)


@pytest.fixture
def problems_path(artifacts):
    return write_problems(artifacts / "selection.parquet", constant_answer_problems(6))


def hyperparams(**overrides) -> training_pb2.TrainHyperparams:
    values = dict(
        steps=2,
        batch_size=3,
        learning_rate=1e-2,
        entropy_coef=0.05,  # moves the weights even when every reward is 0
        micro_batch_size=8,
        sampling=common_pb2.SamplingParams(n=4, max_tokens=3, temperature=1.0),
        seed=1,
    )
    values.update(overrides)
    return training_pb2.TrainHyperparams(**values)


def request(checkpoint, problems, output, request_id="train-1", **overrides) -> training_pb2.TrainRequest:
    return training_pb2.TrainRequest(
        request_id=request_id,
        checkpoint=str(checkpoint),
        problems_path=str(problems),
        output_checkpoint=str(output),
        hyperparams=hyperparams(**overrides),
    )


def split(events):
    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    results = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert len(results) == 1 and events[-1].WhichOneof("event") == "result"
    return steps, results[0]


def test_train_streams_step_metrics_and_writes_a_loadable_checkpoint(
    stub, random_tiny_checkpoint, problems_path, artifacts
):
    output = artifacts / "checkpoints" / "round-00001"
    req = request(random_tiny_checkpoint, problems_path, output, kl_coef=0.1)
    steps, result = split(list(stub.Train(req, timeout=60)))
    assert [s.step for s in steps] == [1, 2]
    assert all(s.response_length > 0 and s.tokens_per_second > 0 and s.grad_norm > 0 for s in steps)
    assert steps[0].kl == pytest.approx(0.0, abs=1e-7) and steps[1].kl > 0
    assert result.checkpoint == str(output) and result.steps == 2 and result.compute_seconds > 0

    trained, initial = load_model(output).state_dict(), load_model(random_tiny_checkpoint).state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    marker = json.loads((output / MARKER_NAME).read_text())
    assert marker["request_id"] == "train-1" and marker["steps"] == 2
    assert [m["step"] for m in marker["metrics"]] == [1, 2]
    assert sorted(p.name for p in output.parent.iterdir()) == ["round-00001"]  # no temporary directories left


def test_a_retry_with_the_same_request_id_returns_the_checkpoint_without_training(
    stub, random_tiny_checkpoint, problems_path, artifacts, monkeypatch
):
    output = artifacts / "ckpt"
    req = request(random_tiny_checkpoint, problems_path, output)
    first = list(stub.Train(req, timeout=60))
    weights = output / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(torch_backend, "GRPOTrainer", no_training)
    again = list(stub.Train(req, timeout=60))
    assert again == first  # the recorded step metrics, then the same result
    assert weights.stat().st_mtime_ns == stamp

    # another request id for the same output trains again and replaces the checkpoint atomically
    monkeypatch.undo()
    retrain = request(random_tiny_checkpoint, problems_path, output, request_id="train-2")
    _, result = split(list(stub.Train(retrain, timeout=60)))
    assert json.loads((output / MARKER_NAME).read_text())["request_id"] == "train-2"
    assert result.checkpoint == str(output)
    assert sorted(p.name for p in output.parent.iterdir()) == sorted(["ckpt", "selection.parquet"])


@pytest.mark.parametrize(
    "case, code, match",
    [
        ("empty selection", grpc.StatusCode.INVALID_ARGUMENT, "empty selection"),
        ("missing checkpoint", grpc.StatusCode.NOT_FOUND, "does not exist"),
        ("missing problems file", grpc.StatusCode.NOT_FOUND, "not found"),
        ("batch larger than selection", grpc.StatusCode.INVALID_ARGUMENT, "larger than the selection"),
        ("no steps", grpc.StatusCode.INVALID_ARGUMENT, "hyperparams.steps must be >= 1"),
        ("one response per problem", grpc.StatusCode.INVALID_ARGUMENT, "hyperparams.sampling.n"),
        ("no output checkpoint", grpc.StatusCode.INVALID_ARGUMENT, "output_checkpoint is required"),
        ("no request id", grpc.StatusCode.INVALID_ARGUMENT, "request_id is required"),
        ("output is the input", grpc.StatusCode.INVALID_ARGUMENT, "must differ from checkpoint"),
    ],
)
def test_a_bad_request_is_refused_and_writes_nothing(
    stub, random_tiny_checkpoint, problems_path, artifacts, case, code, match
):
    output = artifacts / "out" / "ckpt"
    req = request(random_tiny_checkpoint, problems_path, output)
    if case == "empty selection":
        req.problems_path = str(write_problems(artifacts / "empty.parquet", []))
    elif case == "missing checkpoint":
        req.checkpoint = str(artifacts / "no-such-checkpoint")
    elif case == "missing problems file":
        req.problems_path = str(artifacts / "no-such.parquet")
    elif case == "batch larger than selection":
        req.hyperparams.batch_size = 7
    elif case == "no steps":
        req.hyperparams.steps = 0
    elif case == "one response per problem":
        req.hyperparams.sampling.n = 1
    elif case == "no output checkpoint":
        req.output_checkpoint = ""
    elif case == "no request id":
        req.request_id = ""
    elif case == "output is the input":
        req.output_checkpoint = str(random_tiny_checkpoint)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(req, timeout=60))
    assert info.value.code() == code
    assert match in info.value.details()
    assert not (artifacts / "out").exists()


def test_a_crash_while_saving_leaves_no_checkpoint(stub, random_tiny_checkpoint, problems_path, artifacts, monkeypatch):
    real_save = torch_backend.save_checkpoint

    def save_then_crash(model, tokenizer, dest):
        real_save(model, tokenizer, dest)  # the weights are on disk, the marker is not yet
        raise OSError("disk full")

    monkeypatch.setattr(torch_backend, "save_checkpoint", save_then_crash)
    output = artifacts / "checkpoints" / "round-00002"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(request(random_tiny_checkpoint, problems_path, output), timeout=60))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "disk full" in info.value.details()
    assert not output.exists()
    assert list(output.parent.iterdir()) == []  # nor a temporary directory beside it


def test_the_policy_loss_setting_is_checked_at_start_up_and_used(
    random_tiny_checkpoint, problems_path, artifacts, monkeypatch
):
    monkeypatch.setenv("GRADALIGN_TRAINER_POLICY_LOSS", "nope")
    with pytest.raises(ValidationError, match="unknown policy loss 'nope'; valid policy losses: vanilla"):
        TrainerSettings()  # what serve() reads at start-up
    monkeypatch.delenv("GRADALIGN_TRAINER_POLICY_LOSS")

    calls = []

    def counted(*args):  # a second registered loss: the clipped surrogate, counting its calls
        calls.append(1)
        return losses.vanilla_policy_loss(*args)

    monkeypatch.setitem(losses.POLICY_LOSSES.entries, "counted", counted)
    settings = TrainerSettings(host="127.0.0.1", port=0, artifact_root=artifacts, policy_loss="counted")
    server, _, port = create_server(settings)
    server.start()
    output = artifacts / "checkpoints" / "round-00001"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = training_pb2_grpc.TrainerServiceStub(channel)
            events = list(stub.Train(request(random_tiny_checkpoint, problems_path, output, steps=1), timeout=60))
    finally:
        server.stop(None)
    _, result = split(events)
    assert result.steps == 1 and calls  # the trainer's policy loss was the registered one the setting named
    assert json.loads((output / MARKER_NAME).read_text())["config"]["policy_loss"] == "counted"


def test_hyperparams_zero_means_the_default():
    config = config_from_proto(hyperparams(clip_eps=0, max_grad_norm=0, micro_batch_size=0))
    assert (config.clip_eps, config.max_grad_norm, config.micro_batch_size, config.top_p) == (0.2, 1.0, 16, 1.0)
    assert (config.steps, config.batch_size, config.n_samples, config.max_tokens, config.seed) == (2, 3, 4, 3, 1)


def test_settings_defaults_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADALIGN_TRAINER_ARTIFACT_ROOT", str(tmp_path))
    settings = TrainerSettings()
    assert settings.port == 50053
    assert settings.checkpoint_path("ckpt/a") == tmp_path / "ckpt" / "a"
    assert TrainerSettings(checkpoint_root=tmp_path / "c").checkpoint_path("a") == tmp_path / "c" / "a"
    assert settings.checkpoint_path("/abs/a").as_posix() == "/abs/a"


def test_weight_decay_and_its_check():
    assert config_from_proto(hyperparams(weight_decay=0.1)).weight_decay == 0.1
    assert config_from_proto(hyperparams()).weight_decay == 0.0
    with pytest.raises(InvalidInputError, match="hyperparams.weight_decay must be >= 0"):
        config_from_proto(hyperparams(weight_decay=-0.5))


def test_the_first_step_reuses_the_scoring_stage_rollouts(stub, random_tiny_checkpoint, problems_path, artifacts):
    tokenizer = load_tokenizer(random_tiny_checkpoint)
    selection = constant_answer_problems(6)
    outside = constant_answer_problems(9)[6:]  # a shard holds the whole chunk, not only the selection
    made_up = made_up_rollouts(tokenizer, selection + outside, 4)
    # two shards: the first two responses of each problem in a parquet shard, the rest in a JSONL one
    shard_a = write_rollouts(artifacts / "rollout" / "rollouts-0000.parquet", [r for rs in made_up.values() for r in rs[:2]])
    shard_b = write_rollouts_jsonl(artifacts / "rollout" / "rollouts-0001.jsonl", [r for rs in made_up.values() for r in rs[2:]])
    output = artifacts / "ckpt"
    req = request(random_tiny_checkpoint, problems_path, output, steps=2, entropy_coef=0.0)
    req.rollouts_paths.extend([str(shard_a), "rollout/rollouts-0001.jsonl"])  # relative = under the artifact root
    steps, _ = split(list(stub.Train(req, timeout=60)))
    assert steps[0].mean_reward == 0.5  # the made-up rewards: two right, two wrong per problem
    assert steps[0].response_length == pytest.approx(1.5)  # "7" and "xy"
    assert steps[1].mean_reward < 0.5  # sampled by the random policy
    marker = json.loads((output / MARKER_NAME).read_text())
    first_batch = [p.problem_id for p in batch_for_step(selection, 3, seed=1, step=0)]
    assert marker["reused_problems"] == sorted(first_batch)
    assert marker["rollouts_paths"] == [str(shard_a), str(shard_b)]


def test_reused_rollouts_for_only_some_problems_and_a_missing_shard(
    stub, random_tiny_checkpoint, problems_path, artifacts
):
    assert first_batch_rollouts([], constant_answer_problems(6), config_from_proto(hyperparams())) == {}
    tokenizer = load_tokenizer(random_tiny_checkpoint)
    first = batch_for_step(constant_answer_problems(6), 3, seed=1, step=0)
    made_up = made_up_rollouts(tokenizer, first[:1], 4)  # one problem of the batch; the others are sampled
    shard = write_rollouts(artifacts / "rollouts.parquet", made_up[first[0].problem_id])
    reused = first_batch_rollouts([shard], constant_answer_problems(6), config_from_proto(hyperparams()))
    assert list(reused) == [first[0].problem_id] and len(reused[first[0].problem_id]) == 4

    output = artifacts / "out" / "ckpt"
    req = request(random_tiny_checkpoint, problems_path, output)
    req.rollouts_paths.append(str(artifacts / "no-such-rollouts.parquet"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(req, timeout=60))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-rollouts" in info.value.details()
    assert not (artifacts / "out").exists()


def test_kl_to_a_separate_reference_checkpoint(stub, random_tiny_checkpoint, problems_path, artifacts, tmp_path):
    reference = build_random_tiny_model(tmp_path / "initial", seed=1)
    output = artifacts / "ckpt"
    req = request(random_tiny_checkpoint, problems_path, output, steps=1, kl_coef=0.1)
    req.reference_checkpoint = str(reference)
    steps, _ = split(list(stub.Train(req, timeout=60)))
    assert steps[0].kl > 0.01  # the policy differs from this reference before its first update
    assert json.loads((output / MARKER_NAME).read_text())["reference_checkpoint"] == str(reference)

    req = request(random_tiny_checkpoint, problems_path, artifacts / "out" / "ckpt", kl_coef=0.1)
    req.reference_checkpoint = str(tmp_path / "no-such-model")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Train(req, timeout=60))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (artifacts / "out").exists()


def test_export_the_optimizer_second_moments(stub, random_tiny_checkpoint, problems_path, artifacts):
    output = artifacts / "checkpoints" / "round-00001"
    req = request(random_tiny_checkpoint, problems_path, output, weight_decay=0.01)
    req.export_optimizer_state = True
    events = list(stub.Train(req, timeout=60))
    _, result = split(events)
    state_path = Path(result.optimizer_state_path)
    assert state_path == output / OPTIMIZER_STATE_NAME and state_path.is_file()
    state = read_optimizer_state(state_path)
    assert state.step == 2 and state.beta2 == 0.999 and state.eps == 1e-8
    model = load_model(output)
    names = [([n], p) for n, p in model.named_parameters()]
    assert len(state.inverse_denominators(names)) == len(names)  # every parameter, with its shape
    assert any(float(v.abs().sum()) > 0 for v in state.exp_avg_sq.values())
    assert list(stub.Train(req, timeout=60)) == events  # a retry names the same file
    assert [p.name for p in output.glob("*.safetensors")] == ["model.safetensors"]  # loaders that glob see only the model
