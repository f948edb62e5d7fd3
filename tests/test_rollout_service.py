"""The rollout service over real gRPC (in-process server): shards, determinism, swaps, errors."""

from __future__ import annotations

import grpc
import pytest

from gradalign_common.datasets import load_problems
from gradalign_common.grpc_utils import channel
from gradalign_common.modeling import load_model, save_checkpoint, load_tokenizer
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
from gradalign_common.records import Problem, read_rollouts, write_problems
from gradalign_common.tiny_task import write_splits
from services.rollout.server import create_server
from services.rollout.settings import RolloutSettings


@pytest.fixture
def rollout(tmp_path):
    server, health, port = create_server(RolloutSettings(port=0, artifact_root=tmp_path, batch_size=8, max_model_len=32))
    server.start()
    ch = channel(f"127.0.0.1:{port}")
    yield rollout_pb2_grpc.RolloutServiceStub(ch), server
    ch.close()
    server.stop(0)


@pytest.fixture
def problems_path(tmp_path):
    problems = load_problems(write_splits(tmp_path / "data")["val"])[:12]
    return write_problems(tmp_path / "problems.parquet", problems)


def _generate(stub, checkpoint, problems_path, out, n=4, seed=1, max_tokens=4):
    req = rollout_pb2.GenerateRequest(
        request_id="e/0/rollout/0",
        checkpoint=str(checkpoint),
        problems_path=str(problems_path),
        sampling=common_pb2.SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=seed),
        output_path=str(out),
    )
    events = list(stub.Generate(req))
    assert events[-1].HasField("result") and all(e.HasField("progress") for e in events[:-1])
    return events[-1].result


def test_generate_writes_rewarded_shard(rollout, tiny_model_dir, problems_path, tmp_path):
    stub, _ = rollout
    result = _generate(stub, tiny_model_dir, problems_path, tmp_path / "out.parquet")
    records = read_rollouts(result.output_path)
    assert len(records) == 12 * 4 == result.n_responses
    assert [s.problem_id for s in result.stats] == list(dict.fromkeys(r.problem_id for r in records))
    assert all(r.reward in (0.0, 1.0) and r.correct == (r.reward > 0.5) for r in records)
    assert 0 < sum(r.reward for r in records) < len(records)  # the warm-started model is partly right
    acc = {s.problem_id: s.accuracy for s in result.stats}
    first = result.stats[0].problem_id
    assert acc[first] == sum(r.correct for r in records if r.problem_id == first) / 4


def test_same_seed_same_samples(rollout, tiny_model_dir, problems_path, tmp_path):
    stub, _ = rollout
    a = read_rollouts(_generate(stub, tiny_model_dir, problems_path, tmp_path / "a.parquet").output_path)
    b = read_rollouts(_generate(stub, tiny_model_dir, problems_path, tmp_path / "b.parquet").output_path)
    c = read_rollouts(_generate(stub, tiny_model_dir, problems_path, tmp_path / "c.parquet", seed=2).output_path)
    assert a == b
    assert a != c


def test_weight_swap_without_restart(rollout, tiny_model_dir, problems_path, tmp_path):
    stub, server = rollout
    _generate(stub, tiny_model_dir, problems_path, tmp_path / "a.parquet")
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    with __import__("torch").no_grad():
        for p in model.parameters():
            p.zero_()  # a model that emits token 0 (pad) everywhere
    other = save_checkpoint(model, tok, tmp_path / "zeroed")
    records = read_rollouts(_generate(stub, other, problems_path, tmp_path / "b.parquet").output_path)
    assert all(r.reward == 0.0 for r in records)
    again = read_rollouts(_generate(stub, tiny_model_dir, problems_path, tmp_path / "c.parquet").output_path)
    assert again == read_rollouts(tmp_path / "a.parquet")


def _code(stub, **kw):
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, **kw)
    return info.value.code(), info.value.details()


def test_bad_requests_are_named_and_service_keeps_serving(rollout, tiny_model_dir, problems_path, tmp_path):
    stub, _ = rollout
    code, detail = _code(stub, checkpoint=tmp_path / "missing", problems_path=problems_path, out=tmp_path / "x.parquet")
    assert code == grpc.StatusCode.NOT_FOUND and "missing" in detail

    unknown = write_problems(tmp_path / "unknown.parquet", [Problem("1", '[{"role":"user","content":"1+1="}]', "nope", "2")])
    code, detail = _code(stub, checkpoint=tiny_model_dir, problems_path=unknown, out=tmp_path / "x.parquet")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "data_source" in detail

    empty = write_problems(tmp_path / "empty.parquet", [])
    code, detail = _code(stub, checkpoint=tiny_model_dir, problems_path=empty, out=tmp_path / "x.parquet")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in detail

    code, detail = _code(stub, checkpoint=tiny_model_dir, problems_path=problems_path, out=tmp_path / "x.parquet", max_tokens=40)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in detail

    assert not (tmp_path / "x.parquet").exists()
    assert _generate(stub, tiny_model_dir, problems_path, tmp_path / "ok.parquet").n_responses == 48
