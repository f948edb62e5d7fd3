"""The gRPC ScoringService, started in-process on a free port and called through its stub."""

from __future__ import annotations

import grpc
import pytest

from gradalign_common.grpc_utils import channel
from gradalign_common.pb import scoring_pb2, scoring_pb2_grpc
from gradalign_common.records import read_scores_jsonl, write_rollouts, write_rollouts_jsonl
from services.scoring.engine import ScoringEngine
from services.scoring.server import PROGRESS_UNIT, start_server
from services.scoring.settings import ScoringSettings
from scoring_fixtures import random_rollouts, save_tiny_qwen2

# float32 scores: a different batch composition (shards, request sizes) changes the rounding by
# up to ~1e-7 (1.1e-7 seen); a wrong combination of shards changes scores by orders of magnitude more.
FLOAT32_TOL = 1e-6


@pytest.fixture(scope="module")
def stub():
    server, _, port = start_server(ScoringSettings(host="127.0.0.1", port=0))
    with channel(f"127.0.0.1:{port}") as ch:
        yield scoring_pb2_grpc.ScoringServiceStub(ch)
    server.stop(grace=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two parquet candidate shards (disjoint problems) and a JSONL validation file."""
    root = tmp_path_factory.mktemp("rollouts")
    candidates = random_rollouts(seed=1, n_problems=8, prefix="c")
    pids = sorted({r.problem_id for r in candidates})
    shard_a = [r for r in candidates if r.problem_id in pids[:4]]
    shard_b = [r for r in candidates if r.problem_id in pids[4:]]
    validation = random_rollouts(seed=2, n_problems=5, prefix="v")
    return {
        "candidates": candidates,
        "validation": validation,
        "shard_a": str(write_rollouts(root / "shard-a.parquet", shard_a)),
        "shard_b": str(write_rollouts(root / "shard-b.parquet", shard_b)),
        "validation_path": str(write_rollouts_jsonl(root / "validation.jsonl", validation)),
    }


def _score(stub, **fields) -> tuple[list, list, scoring_pb2.ScoreSummary]:
    """(progress events, score events, summary) of one Score call."""
    progress, scores, summaries = [], [], []
    for event in stub.Score(scoring_pb2.ScoreRequest(**fields), timeout=60):
        kind = event.WhichOneof("event")
        {"progress": progress, "score": scores, "summary": summaries}[kind].append(getattr(event, kind))
    assert len(summaries) == 1
    return progress, scores, summaries[0]


def test_sim_scores_match_the_engine_and_shards_match_one_request(stub, data, random_qwen2_dir, tmp_path):
    common = dict(checkpoint=str(random_qwen2_dir), validation_paths=[data["validation_path"]], mode="sim")
    out = tmp_path / "scores.jsonl"
    progress, whole, summary = _score(
        stub, candidate_paths=[data["shard_a"], data["shard_b"]], output_path=str(out), **common
    )
    assert summary.n_problems == len(whole) == 8
    assert summary.output_path == str(out)
    assert [(p.done, p.total, p.unit) for p in progress] == [(i, 8, PROGRESS_UNIT) for i in range(9)]
    assert [(s.problem_id, s.score) for s in read_scores_jsonl(out)] == [(s.problem_id, s.score) for s in whole]

    _, part_a, summary_a = _score(stub, candidate_paths=[data["shard_a"]], **common)
    _, part_b, summary_b = _score(stub, candidate_paths=[data["shard_b"]], **common)
    assert summary_a.validation_gradient_cached and summary_b.validation_gradient_cached
    assert {s.problem_id: s.score for s in part_a + part_b} == pytest.approx({s.problem_id: s.score for s in whole}, abs=FLOAT32_TOL)

    engine = ScoringEngine.from_pretrained(random_qwen2_dir)
    expected = {s.problem_id: s for s in engine.score(data["candidates"], "sim", data["validation"])}
    for s in whole:
        e = expected[s.problem_id]
        assert s.score == pytest.approx(e.score, abs=FLOAT32_TOL)
        assert (s.accuracy, s.n_responses, s.zero_advantage) == (e.accuracy, e.n_responses, e.zero_advantage)


def test_align_shards_with_the_rounds_candidates_as_validation_match_one_request(stub, data, random_qwen2_dir):
    both = [data["shard_a"], data["shard_b"]]
    _, whole, _ = _score(stub, checkpoint=str(random_qwen2_dir), candidate_paths=both, mode="align")
    parts = []
    for shard in both:
        _, part, _ = _score(stub, checkpoint=str(random_qwen2_dir), candidate_paths=[shard], validation_paths=both, mode="align")
        parts += part
    assert {s.problem_id: s.score for s in parts} == pytest.approx({s.problem_id: s.score for s in whole}, abs=FLOAT32_TOL)
    _, alone, _ = _score(stub, checkpoint=str(random_qwen2_dir), candidate_paths=[data["shard_a"]], mode="align")
    assert {s.problem_id: s.score for s in alone} != pytest.approx({s.problem_id: s.score for s in whole if s.problem_id in {a.problem_id for a in alone}}, abs=FLOAT32_TOL)


def test_rand_shards_match_one_request(stub, data):
    _, whole, _ = _score(stub, candidate_paths=[data["shard_a"], data["shard_b"]], mode="rand", seed=3)
    _, a, _ = _score(stub, candidate_paths=[data["shard_a"]], mode="rand", seed=3)
    _, b, _ = _score(stub, candidate_paths=[data["shard_b"]], mode="rand", seed=3)
    assert {s.problem_id: s.score for s in a + b} == {s.problem_id: s.score for s in whole}


def test_a_different_checkpoint_is_loaded_and_invalidates_the_cache(stub, data, random_qwen2_dir, tmp_path):
    other = save_tiny_qwen2(tmp_path / "other", seed=1)
    common = dict(candidate_paths=[data["shard_a"]], validation_paths=[data["validation_path"]], mode="dot")
    _, first, _ = _score(stub, checkpoint=str(random_qwen2_dir), **common)
    _, second, summary = _score(stub, checkpoint=str(other), **common)
    assert not summary.validation_gradient_cached
    assert [s.score for s in first] != [s.score for s in second]


def test_modes_without_gradients_need_no_checkpoint(stub, data):
    _, scores, summary = _score(stub, candidate_paths=[data["shard_a"], data["shard_b"]], mode="rand", seed=4)
    assert summary.n_problems == 8
    assert all(0.0 <= s.score < 1.0 for s in scores)
    _, again, _ = _score(stub, candidate_paths=[data["shard_b"], data["shard_a"]], mode="rand", seed=4)
    assert {s.problem_id: s.score for s in scores} == {s.problem_id: s.score for s in again}


def _shard_a_sim(checkpoint, data, **overrides) -> dict:
    """The fields of a "sim" request scoring shard A of `data` against its validation file with `checkpoint`;
    `overrides` add fields or replace these."""
    fields = dict(checkpoint=str(checkpoint), candidate_paths=[data["shard_a"]], validation_paths=[data["validation_path"]], mode="sim")
    return {**fields, **overrides}


def _score_in_process(settings: ScoringSettings, fields: dict) -> tuple:
    """(the servicer, its events) of one Score call with `fields` to a fresh in-process ScoringServicer with `settings`."""
    from services.scoring.server import ScoringServicer

    servicer = ScoringServicer(settings)
    return servicer, list(servicer.Score(scoring_pb2.ScoreRequest(**fields), None))


def _error(stub, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _score(stub, **fields)
    return info.value


def test_errors(stub, data, random_qwen2_dir, tmp_path):
    ok = _shard_a_sim(random_qwen2_dir, data)
    err = _error(stub, **{**ok, "mode": "bogus"})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bogus" in err.details()
    err = _error(stub, **{**ok, "validation_paths": []})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "validation" in err.details()
    err = _error(stub, **{**ok, "method": "sketch"})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = str(tmp_path / "no-such-checkpoint")
    err = _error(stub, **{**ok, "checkpoint": missing})
    assert err.code() == grpc.StatusCode.NOT_FOUND and missing in err.details()
    err = _error(stub, **{**ok, "checkpoint": str(tmp_path)})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and str(tmp_path) in err.details()
    err = _error(stub, **{**ok, "candidate_paths": [str(tmp_path / "nope.parquet")]})
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_methods_and_optimizer_state(stub, data, random_qwen2_dir, tmp_path):
    """An approximate method is used only when named; its g_V is cached apart from exact's; an optimizer
    state preconditions the scores and is part of the cache key."""
    from gradalign_common.optimizer_state import read_optimizer_state, write_optimizer_state
    from scoring_fixtures import random_adam_state, tiny_qwen2

    common = _shard_a_sim(random_qwen2_dir, data)
    _, exact, _ = _score(stub, **common)
    _, named, _ = _score(stub, method="exact", **common)
    assert [s.score for s in named] == [s.score for s in exact]
    _, _, summary = _score(stub, method="fewer-responses", **common)
    assert summary.validation_gradient_cached  # the same gradient space as exact
    _, projected, summary = _score(stub, method="project-8", **common)
    assert not summary.validation_gradient_cached  # another gradient space
    assert [s.score for s in projected] != [s.score for s in exact]
    state = random_adam_state(tiny_qwen2(seed=0))
    path = write_optimizer_state(tmp_path / "optimizer.safetensors", state.exp_avg_sq, step=state.step,
                                 beta2=state.beta2, eps=state.eps)
    _, preconditioned, summary = _score(stub, optimizer_state_path=str(path), **common)
    assert not summary.validation_gradient_cached
    engine = ScoringEngine.from_pretrained(random_qwen2_dir)
    p = engine.preconditioner(read_optimizer_state(path))
    candidates = [r for r in data["candidates"] if r.problem_id in {s.problem_id for s in exact}]
    expected = {s.problem_id: s.score for s in engine.score(candidates, "sim", data["validation"], preconditioner=p)}
    assert {s.problem_id: s.score for s in preconditioned} == pytest.approx(expected, abs=1e-6)
    assert {s.problem_id: s.score for s in preconditioned} != pytest.approx({s.problem_id: s.score for s in exact}, abs=1e-6)
    err = _error(stub, optimizer_state_path=str(tmp_path / "missing.safetensors"), **common)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_the_dtype_setting_takes_effect_when_a_request_names_none(data, random_qwen2_dir):
    """auto (the default) is float32 on CPU; a deployment's GRADALIGN_SCORING_DTYPE is used when the
    request's dtype is empty (what the scheduler sends for scoring_dtype=auto); a request's own wins."""
    def loaded_dtype(settings, request_dtype):
        servicer, events = _score_in_process(settings, _shard_a_sim(random_qwen2_dir, data, dtype=request_dtype))
        assert events[-1].WhichOneof("event") == "summary"
        return next(servicer._loaded.engine.model.parameters()).dtype

    import torch

    assert ScoringSettings().dtype == "auto"
    assert loaded_dtype(ScoringSettings(device="cpu"), "") == torch.float32
    assert loaded_dtype(ScoringSettings(device="cpu", dtype="bfloat16"), "") == torch.bfloat16
    assert loaded_dtype(ScoringSettings(device="cpu", dtype="bfloat16"), "float32") == torch.float32


def test_the_memory_budget_setting_and_a_requests_own(stub, data, random_qwen2_dir):
    """The service's memory_budget setting is used when a request names none; a request's own wins; a budget
    that is not one is refused as INVALID_ARGUMENT (the scores never depend on it)."""
    import pydantic

    from gradalign_common.memory_budget import DEFAULT_MEMORY_BUDGET, MemoryBudget, parse_memory_budget

    def used_budget(settings, request_budget):
        servicer, events = _score_in_process(settings, _shard_a_sim(random_qwen2_dir, data, memory_budget=request_budget))
        return servicer._loaded.engine.memory_budget, [e.score.score for e in events if e.WhichOneof("event") == "score"]

    default, scores = used_budget(ScoringSettings(device="cpu"), "")
    assert default == parse_memory_budget(DEFAULT_MEMORY_BUDGET)
    assert used_budget(ScoringSettings(device="cpu", memory_budget="2GiB"), "")[0] == MemoryBudget(bytes=2 << 30)
    small, small_scores = used_budget(ScoringSettings(device="cpu", memory_budget="2GiB"), "1MiB")
    assert small == MemoryBudget(bytes=1 << 20)
    assert small_scores == pytest.approx(scores, abs=FLOAT32_TOL)
    with pytest.raises(pydantic.ValidationError):
        ScoringSettings(memory_budget="lots")
    err = _error(stub, **_shard_a_sim(random_qwen2_dir, data, memory_budget="lots"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "memory budget" in err.details()
