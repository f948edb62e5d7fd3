"""The rollout service over real gRPC (in-process server): shards, determinism, swaps, errors."""

from __future__ import annotations

import grpc
import pytest

from gradalign_common.datasets import load_problems
from gradalign_common.modeling import load_model, save_checkpoint, load_tokenizer
from gradalign_common.pb import common_pb2, rollout_pb2
from gradalign_common.records import Problem, read_problems, read_rollouts, write_problems
from gradalign_common.tiny_task import write_splits
from rollout_fixtures import serving_rollout


@pytest.fixture
def rollout(tmp_path):
    with serving_rollout(tmp_path, reward_workers=1) as started:
        yield started


@pytest.fixture
def problems_path(tmp_path):
    problems = load_problems(write_splits(tmp_path / "data")["val"])[:12]
    return write_problems(tmp_path / "problems.parquet", problems)


def _generate(stub, checkpoint, problems_path, out, n=4, seed=1, max_tokens=4, events=None):
    req = rollout_pb2.GenerateRequest(
        request_id="e/0/rollout/0",
        checkpoint=str(checkpoint),
        problems_path=str(problems_path),
        sampling=common_pb2.SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=seed),
        output_path=str(out),
    )
    got = list(stub.Generate(req))
    assert got[-1].HasField("result") and all(e.HasField("progress") for e in got[:-1])
    if events is not None:
        events.extend(got)
    return got[-1].result


def test_generate_writes_rewarded_shard(rollout, tiny_model_dir, problems_path, tmp_path):
    stub, _ = rollout
    events = []
    result = _generate(stub, tiny_model_dir, problems_path, tmp_path / "out.parquet", events=events)
    assert [(e.progress.done, e.progress.total) for e in events[:-1]] == [(8, 12), (12, 12)]  # streamed per slice
    records = read_rollouts(result.output_path)
    assert [r.problem_id for r in records] == [p.problem_id for p in read_problems(problems_path) for _ in range(4)]
    assert all(r.finish_reason in ("stop", "length") and r.text for r in records)
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
    stub, servicer = rollout
    _generate(stub, tiny_model_dir, problems_path, tmp_path / "a.parquet")
    module = servicer.backend.model
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    with __import__("torch").no_grad():
        for p in model.parameters():
            p.zero_()  # a model that emits token 0 (pad) everywhere
    other = save_checkpoint(model, tok, tmp_path / "zeroed")
    records = read_rollouts(_generate(stub, other, problems_path, tmp_path / "b.parquet").output_path)
    assert all(r.reward == 0.0 for r in records)
    again = read_rollouts(_generate(stub, tiny_model_dir, problems_path, tmp_path / "c.parquet").output_path)
    assert again == read_rollouts(tmp_path / "a.parquet")
    # the weights were swapped in place twice, into the same module: one load, no restart
    assert (servicer.backend.loads, servicer.backend.swaps) == (1, 2) and servicer.backend.model is module


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

    long_prompt = '[{"role":"user","content":"' + "1+" * 14 + '1="}]'
    too_long = write_problems(tmp_path / "long.parquet", [Problem("long-one", long_prompt, "arith", "15")])
    code, detail = _code(stub, checkpoint=tiny_model_dir, problems_path=too_long, out=tmp_path / "x.parquet")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "long-one" in detail and "max_model_len 32" in detail

    code, detail = _code(stub, checkpoint=tiny_model_dir, problems_path=tmp_path / "nowhere.parquet", out=tmp_path / "x.parquet")
    assert code == grpc.StatusCode.NOT_FOUND and "nowhere.parquet" in detail

    assert not (tmp_path / "x.parquet").exists()
    assert _generate(stub, tiny_model_dir, problems_path, tmp_path / "ok.parquet").n_responses == 48


def test_math_rewards_in_the_process_pool(rollout, tiny_model_dir, tmp_path):
    stub, servicer = rollout
    problems = [Problem(str(i), f'[{{"role":"user","content":"{i}+{i}="}}]', "math", str(2 * i)) for i in range(6)]
    path = write_problems(tmp_path / "math.parquet", problems)
    records = read_rollouts(_generate(stub, tiny_model_dir, path, tmp_path / "m.parquet", max_tokens=3).output_path)
    assert servicer._pool is not None  # math-verify ran in the worker processes
    assert sum(r.correct for r in records) > 0  # the warm-started model adds small numbers right sometimes
    from gradalign_common.rewards import math_reward

    assert all(r.reward == math_reward(r.text, problems[int(r.problem_id)].ground_truth) for r in records)


def test_char_tokenizer_survives_load_and_resave(tiny_model_dir, tmp_path):
    """The tiny model's character tokenizer keeps every character (spaces too) through load -> save -> load."""
    tok = load_tokenizer(tiny_model_dir)
    text = "12 + 30 = 42"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    resaved = save_checkpoint(load_model(tiny_model_dir), tok, tmp_path / "resaved")
    again = load_tokenizer(resaved)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_model_cache_swaps_weights_in_place(tiny_model_dir, tmp_path):
    from gradalign_common.model_cache import ModelCache

    cache = ModelCache()
    model, _ = cache.get(tiny_model_dir)
    other = save_checkpoint(load_model(tiny_model_dir), load_tokenizer(tiny_model_dir), tmp_path / "copy")
    same_object, _ = cache.get(other)
    assert same_object is model and (cache.loads, cache.swaps) == (1, 1)
