"""kill -9 the scheduler at random moments of several rounds, restart it, and check that
each round ends with exactly one selection, one checkpoint and the same scores as an
uninterrupted run with the same seed. Runs on PostgreSQL + Redis when the test
environment provides them (as CI does), else on SQLite with the in-process bus.
"""

from __future__ import annotations

import os
import random
import time

import httpx
import pytest
import torch

from gradalign_common.modeling import load_model
from scheduler_fixtures import emptied_database, experiment_body, wait_for_experiment
from gradalign_tools.stack import LocalStack, StackConfig, free_port

pytestmark = pytest.mark.slow

CONFIG = dict(chunk_size=16, k=4, train_batch_size=4, iters_per_select=2, num_selections=4, mode="sim", learning_rate=1e-3)


def _results(client, exp_id):
    rounds = client.get(f"/api/v1/experiments/{exp_id}/rounds").json()
    out = []
    for r in rounds:
        cands = client.get(f"/api/v1/experiments/{exp_id}/rounds/{r['index']}/candidates", params={"limit": 1000}).json()
        steps = client.get(f"/api/v1/experiments/{exp_id}/rounds/{r['index']}/train-steps").json()
        out.append((r, cands["items"], steps))
    return out


def _fresh_database_url(tmp_path):
    url = os.environ.get("GRADALIGN_TEST_DATABASE_URL")
    return emptied_database(url) if url else None


def test_scheduler_killed_at_random_points_resumes_exactly(tmp_path, tiny_model_dir):
    config = StackConfig(
        home=tmp_path / "home", api_port=free_port(), rollout_port=free_port(), scoring_port=free_port(),
        trainer_port=free_port(), torch_threads=1, database_url=_fresh_database_url(tmp_path),
        redis_url=os.environ.get("GRADALIGN_TEST_REDIS_URL"),
        extra_env={"GRADALIGN_SCHEDULER_POLL_INTERVAL_S": "0.1"},
    )
    rng = random.Random(1234)
    with LocalStack(config) as stack:
        stack.start()
        client = httpx.Client(base_url=config.api_url, timeout=30, headers=config.auth_headers)
        ref = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, name="uninterrupted", **CONFIG)).json()
        assert wait_for_experiment(client, ref["id"])["status"] == "completed"

        crashed = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, name="crashed", **CONFIG)).json()
        kills = 0
        for _ in range(20):  # short random windows of progress between kills (a warm round takes ~0.3 s)
            time.sleep(rng.uniform(0.02, 0.3))
            if client.get(f"/api/v1/experiments/{crashed['id']}").json()["status"] == "completed":
                break
            stack.kill("scheduler")  # SIGKILL: no cleanup, no lease release
            kills += 1
            stack.start(("scheduler",))
            client = httpx.Client(base_url=config.api_url, timeout=30, headers=config.auth_headers)
        print(f"killed the scheduler {kills} times")
        assert kills >= 2
        assert wait_for_experiment(client, crashed["id"])["status"] == "completed"
        expected, got = _results(client, ref["id"]), _results(client, crashed["id"])

    assert len(got) == len(expected) == 4
    for (r_exp, c_exp, s_exp), (r_got, c_got, s_got) in zip(expected, got):
        assert r_got["status"] == "completed"
        assert all(st["status"] == "succeeded" for st in r_got["stages"])
        # exactly one selection of M/k, the same as the uninterrupted run's
        sel_got = [c["problem_id"] for c in sorted(c_got, key=lambda c: c["rank"] if c["rank"] is not None else 1e9) if c["selected"]]
        sel_exp = [c["problem_id"] for c in sorted(c_exp, key=lambda c: c["rank"] if c["rank"] is not None else 1e9) if c["selected"]]
        assert len(sel_got) == 4 and sel_got == sel_exp
        assert len(c_got) == 16 and len({c["problem_id"] for c in c_got}) == 16
        # the same scores
        scores_exp = {c["problem_id"]: c["score"] for c in c_exp}
        assert {c["problem_id"]: c["score"] for c in c_got} == pytest.approx(scores_exp, abs=1e-6)
        # one training record per step, and one checkpoint per round
        assert [s["step"] for s in s_got] == [1, 2]
        ckpt_dir = os.path.dirname(r_got["checkpoint_out"])
        names = sorted(os.listdir(ckpt_dir))
        assert names == [f"round-{i:05d}" for i in range(4)], names  # no partial or duplicate checkpoint
    final_exp = load_model(expected[-1][0]["checkpoint_out"])
    final_got = load_model(got[-1][0]["checkpoint_out"])
    for a, b in zip(final_exp.parameters(), final_got.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
