"""Sharding a round over two scorer *processes* (`python -m services.scoring.server`, each on its own
port through GRADALIGN_SCORING_PORT) gives the scores of one process scoring everything."""

from __future__ import annotations

import pytest

from gradalign_common.pb import scoring_pb2
from gradalign_common.records import write_rollouts, write_rollouts_jsonl
from services.scoring.engine import ScoringEngine
from gradalign_tools.bench.replicas import score_request, score_sharded, start_replicas
from scoring_fixtures import random_adam_state, random_rollouts, tiny_qwen2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas():
    procs = start_replicas(2, torch_threads=1)
    yield [p.address for p in procs]
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    candidates = random_rollouts(seed=1, n_problems=10, prefix="c")
    pids = sorted({r.problem_id for r in candidates})
    shards = [[r for r in candidates if r.problem_id in pids[i::2]] for i in range(2)]
    validation = random_rollouts(seed=2, n_problems=5, prefix="v")
    return {
        "candidates": candidates,
        "validation": validation,
        "shards": [str(write_rollouts(root / f"shard-{i}.parquet", s)) for i, s in enumerate(shards)],
        "validation_path": str(write_rollouts_jsonl(root / "validation.jsonl", validation)),
        "root": root,
    }


def _by_id(scores):
    return {s.problem_id: s for s in scores}


@pytest.mark.parametrize("mode", ["sim", "align", "dot"])
def test_two_processes_give_the_scores_of_one(replicas, data, random_qwen2_dir, mode):
    shards = data["shards"]
    common = dict(checkpoint=str(random_qwen2_dir), mode=mode,
                  validation_paths=shards if mode == "align" else [data["validation_path"]])
    if mode == "dot":  # with an optimizer state, as the trainer would hand over
        from gradalign_common.optimizer_state import write_optimizer_state

        s = random_adam_state(tiny_qwen2(seed=0))
        path = write_optimizer_state(data["root"] / "optimizer.safetensors", s.exp_avg_sq, step=s.step,
                                     beta2=s.beta2, eps=s.eps)
        common["optimizer_state_path"] = str(path)
    one, _ = score_request(replicas[0], scoring_pb2.ScoreRequest(candidate_paths=shards, **common), timeout=120)
    sharded, _ = score_sharded(replicas, [[p] for p in shards], **common)
    assert len(one) == len(sharded) == 10
    one, sharded = _by_id(one), _by_id(sharded)
    assert set(one) == set(sharded)
    for pid, s in sharded.items():
        # float32: batches of different groups round differently (the dot mode is preconditioned: ~1e-6 relative)
        assert s.score == pytest.approx(one[pid].score, rel=1e-5, abs=1e-7)
        assert (s.accuracy, s.n_responses, s.zero_advantage) == (one[pid].accuracy, one[pid].n_responses,
                                                                 one[pid].zero_advantage)
    if mode == "sim":  # and both equal the engine in this process
        engine = ScoringEngine.from_pretrained(random_qwen2_dir)
        for s in engine.score(data["candidates"], "sim", data["validation"]):
            assert sharded[s.problem_id].score == pytest.approx(s.score, abs=1e-6)
