"""One GradAlign experiment through the four services as separate processes over real gRPC.

Checks the stored scores against an independent recomputation with the scoring engine,
the selection (size M/k, ranked per the spec) and that round 1 starts from the
checkpoint round 0's training wrote.
"""

from __future__ import annotations


import httpx
import pytest
import torch

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.modeling import load_model
from gradalign_common.records import ScoreRecord, read_rollouts
from gradalign_common.selection import select_top
from scheduler_fixtures import experiment_body, wait_for_experiment
from services.scoring.engine import ScoringEngine
from services.stack import LocalStack, StackConfig, free_port

pytestmark = pytest.mark.slow


def test_two_rounds_through_separate_processes(tmp_path, tiny_model_dir):
    config = StackConfig(
        home=tmp_path / "home", api_port=free_port(), rollout_port=free_port(), scoring_port=free_port(),
        trainer_port=free_port(), torch_threads=1,
    )
    body = experiment_body(tiny_model_dir, chunk_size=16, k=4, train_batch_size=4, iters_per_select=2, num_selections=2, mode="sim", learning_rate=1e-3)
    with LocalStack(config) as stack:
        stack.start()
        assert set(stack.procs) == {"scheduler", "rollout", "scoring", "trainer"}
        assert len({p.pid for p in stack.procs.values()}) == 4
        client = httpx.Client(base_url=config.api_url, timeout=30, headers=config.auth_headers)
        assert client.get("/readyz").json()["ready"] is True
        resp = client.post("/api/v1/experiments", json=body)
        assert resp.status_code == 201, resp.text
        exp = wait_for_experiment(client, resp.json()["id"])
        assert exp["status"] == "completed", exp
        rounds = client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()
        candidates = [
            client.get(f"/api/v1/experiments/{exp['id']}/rounds/{r['index']}/candidates", params={"limit": 1000}).json()["items"]
            for r in rounds
        ]
        steps = client.get(f"/api/v1/experiments/{exp['id']}/rounds/0/train-steps").json()

    assert [r["index"] for r in rounds] == [0, 1]
    for r in rounds:
        assert [(s["name"], s["status"]) for s in r["stages"]] == [
            (n, "succeeded") for n in ("rollout_train", "rollout_val", "score", "select", "train")
        ]
        assert r["overhead_seconds"] is not None and r["validation_reward"] is not None

    # the trainer's checkpoint is what the next round loads, and it differs from the start
    assert rounds[0]["checkpoint_in"] == str(tiny_model_dir.resolve())
    assert rounds[1]["checkpoint_in"] == rounds[0]["checkpoint_out"]
    assert exp["checkpoint"] == rounds[1]["checkpoint_out"]
    before, after = load_model(rounds[0]["checkpoint_in"]), load_model(rounds[0]["checkpoint_out"])
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    assert [s["step"] for s in steps] == [1, 2] and all("loss" in s["metrics"] for s in steps)

    store = ArtifactStore(config.home / "artifacts")
    for r, cands in zip(rounds, candidates):
        assert len(cands) == 16
        # stored scores = the spec computed independently with the checkpoint the round started from
        train = read_rollouts(store.rollouts_path(exp["id"], r["index"], "rollout_train", 0))
        val = read_rollouts(store.rollouts_path(exp["id"], r["index"], "rollout_val", 0))
        expected = {s.problem_id: s for s in ScoringEngine.from_pretrained(r["checkpoint_in"]).score(train, "sim", val)}
        for c in cands:
            e = expected[c["problem_id"]]
            assert c["score"] == pytest.approx(e.score, abs=1e-5)
            assert c["accuracy"] == e.accuracy and c["zero_advantage"] == e.zero_advantage
        # selection: M/k = 4, ranked per the spec (highest sim first, ties by problem_id)
        records = [ScoreRecord(c["problem_id"], c["score"], c["accuracy"], c["n_responses"], c["zero_advantage"]) for c in cands]
        chosen = [c for c in sorted(cands, key=lambda c: c["rank"] if c["rank"] is not None else 99) if c["selected"]]
        assert len(chosen) == 4 and [c["rank"] for c in chosen] == [0, 1, 2, 3]
        assert [c["problem_id"] for c in chosen] == select_top(records, "sim", 4)

    # round 1 was scored with round 0's new weights, not the starting ones
    r1_train = read_rollouts(store.rollouts_path(exp["id"], 1, "rollout_train", 0))
    r1_val = read_rollouts(store.rollouts_path(exp["id"], 1, "rollout_val", 0))
    with_start = {s.problem_id: s.score for s in ScoringEngine.from_pretrained(tiny_model_dir).score(r1_train, "sim", r1_val)}
    stored = {c["problem_id"]: c["score"] for c in candidates[1]}
    assert stored != pytest.approx(with_start, abs=1e-5)
