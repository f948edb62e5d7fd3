"""One GradAlign experiment through the four services as separate processes over real gRPC.

Checks the stored scores against an independent recomputation with the scoring engine,
the selection (size M/k, ranked per the spec) and that round 1 starts from the
checkpoint round 0's training wrote.
"""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
import torch

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.modeling import load_model
from gradalign_common.records import ScoreRecord, read_rollouts
from gradalign_common.selection import select_top
from scheduler_fixtures import experiment_body, wait_for_experiment
from services.scoring.engine import ScoringEngine
from gradalign_tools.stack import LocalStack, StackConfig, free_port

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
        train = read_rollouts(store.rollouts_path(exp["uid"], r["index"], "rollout_train", 0))
        val = read_rollouts(store.rollouts_path(exp["uid"], r["index"], "rollout_val", 0))
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
    r1_train = read_rollouts(store.rollouts_path(exp["uid"], 1, "rollout_train", 0))
    r1_val = read_rollouts(store.rollouts_path(exp["uid"], 1, "rollout_val", 0))
    with_start = {s.problem_id: s.score for s in ScoringEngine.from_pretrained(tiny_model_dir).score(r1_train, "sim", r1_val)}
    stored = {c["problem_id"]: c["score"] for c in candidates[1]}
    assert stored != pytest.approx(with_start, abs=1e-5)


def _interval(stage: dict) -> tuple[float, float]:
    parse = lambda t: dt.datetime.fromisoformat(t).timestamp()  # noqa: E731
    return parse(stage["started_at"]), parse(stage["finished_at"])


def test_two_experiments_advance_side_by_side(tmp_path, tiny_model_dir):
    """Two experiments posted together on the real 4-service stack: their stages overlap in time (one
    trains or scores while the other generates), every worker replica serves one request at a time
    (the rest queue at the scheduler, recorded as queued_seconds), and both complete."""
    config = StackConfig(
        home=tmp_path / "home", api_port=free_port(), rollout_port=free_port(), scoring_port=free_port(),
        trainer_port=free_port(), torch_threads=1,
    )
    body = experiment_body(tiny_model_dir, chunk_size=16, k=4, train_batch_size=4, iters_per_select=1, num_selections=2, learning_rate=1e-4)
    with LocalStack(config) as stack:
        stack.start()
        client = httpx.Client(base_url=config.api_url, timeout=30, headers=config.auth_headers)
        ids = [client.post("/api/v1/experiments", json={**body, "name": f"side-{i}", "seed": i}).json()["id"] for i in range(2)]
        exps = [wait_for_experiment(client, i) for i in ids]
        assert [e["status"] for e in exps] == ["completed", "completed"], exps
        stages = {i: [s for r in client.get(f"/api/v1/experiments/{i}/rounds").json() for s in r["stages"]] for i in ids}
        metrics = client.get("/metrics").text

    a, b = (stages[i] for i in ids)
    overlapping = [
        (x["name"], y["name"]) for x in a for y in b
        if _interval(x)[0] < _interval(y)[1] and _interval(y)[0] < _interval(x)[1]
    ]
    assert overlapping, "no stage of one experiment overlapped a stage of the other"
    # one slot per replica: the two experiments' rollouts queued behind each other at the scheduler
    assert max(s["queued_seconds"] for s in a + b) > 0.05
    # no two requests were in one worker at once: a role's computing intervals (wall minus queue) do not overlap
    for role_stages in (("rollout_train", "rollout_val"), ("score",), ("train",)):
        spans = sorted(
            (start + s["queued_seconds"], end) for s in a + b if s["name"] in role_stages for start, end in [_interval(s)]
        )
        # (0.5 s: a stage writes its results to the database after its call has handed the slot back)
        assert all(prev_end <= next_start + 0.5 for (_, prev_end), (next_start, _) in zip(spans, spans[1:])), (role_stages, spans)
    assert "gradalign_worker_queue_depth" in metrics and "gradalign_worker_slots_busy" in metrics
