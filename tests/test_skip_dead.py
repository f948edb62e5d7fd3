"""Skipping dead problems before rollout (issue 18) through the scheduler: the API takes the setting (422 naming
the field), the rollout stage draws each chunk by the round policy from the stored pool order and the stored
candidates' zero-advantage streaks, the round rows keep the counts and the rounds API returns them, and a
resumed experiment (after a failure and a scheduler restart) takes the same chunk again.

The workers are the stand-in servicers called in-process (as in tests/test_stages.py); the stand-in scorer's
answers are changed so that a fixed half of the pool always has zero advantage. SQLite, and PostgreSQL when
GRADALIGN_TEST_DATABASE_URL is set."""

from __future__ import annotations

import json

import grpc
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from gradalign_common.records import read_problems
from gradalign_common.round_policy import chunk_ids, draw_chunk, stage_seed, zero_advantage_streaks
from services.scheduler.app import create_app
from services.scheduler.db import Candidate, PoolProblem, Round, Stage
from services.scheduler.spec import StoredSpec
from services.scheduler.workers import WorkerRejected

from scheduler_fixtures import AUTH, experiment_body, make_settings
from test_stages import RecordingWorkers, install_workers

POOL_SIZE, M, ROUNDS, N_SAMPLES = 24, 8, 7, 4  # 7 rounds of 8 walk a pool of 24 more than twice


def _dead(pid: str) -> bool:
    return int(pid) % 2 == 0  # problem ids are the rows' positions in the file: the even half is always dead


class DeadHalfWorkers(RecordingWorkers):
    """The stand-ins, with every even problem scored zero-advantage; each rollout_train request's problems kept."""

    def __init__(self):
        super().__init__()
        self.chunks: dict[int, list[list[str]]] = {}  # round -> the problems of each rollout_train attempt
        self.fail_round: int | None = None

    def generate(self, address, deadline_s, request, progress=None, scope=None):
        _, r, stage = request.request_id.split("/")[:3]
        if stage == "rollout_train":
            self.chunks.setdefault(int(r), []).append([p.problem_id for p in read_problems(request.problems_path)])
            if int(r) == self.fail_round:
                self.fail_round = None
                raise WorkerRejected("rollout", address, grpc.StatusCode.INVALID_ARGUMENT, "refused once by the test")
        return super().generate(address, deadline_s, request, progress, scope)

    def score(self, address, deadline_s, request, progress=None, scope=None):
        scores, summary = super().score(address, deadline_s, request, progress, scope)
        for sc in scores:
            sc.zero_advantage = _dead(sc.problem_id)
        return scores, summary


@pytest.fixture
def workers(monkeypatch):
    return install_workers(monkeypatch, DeadHalfWorkers())


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "data_source": "arith", "reward_model": {"ground_truth": str(i + 1)}}) + "\n"
            for i in range(POOL_SIZE)
        )
    )
    return path


def _body(model_dir, train_file, **overrides):
    return experiment_body(
        model_dir, train_dataset=str(train_file), chunk_size=M, k=4, train_batch_size=2, iters_per_select=1,
        num_selections=ROUNDS, n_samples_train=N_SAMPLES, seed=3, **overrides,
    )


def _drive(app, exp_id: int, max_steps: int = 200) -> dict:
    orch = app.state.orchestrator
    orch._uids[exp_id] = app.state.experiments.get(exp_id).uid
    for _ in range(max_steps):
        if not orch.step(exp_id):
            break
    return {"status": app.state.experiments.get(exp_id).status}


def _stored_chunks(app, exp_id: int) -> dict[int, list[str]]:
    with app.state.sessions() as s:
        rows = s.execute(
            select(Round.index, Candidate.problem_id).join(Candidate, Candidate.round_id == Round.id).where(Round.experiment_id == exp_id)
        ).all()
    out: dict[int, list[str]] = {}
    for r, pid in rows:
        out.setdefault(r, []).append(pid)
    return {r: sorted(ids, key=int) for r, ids in out.items()}


def _skipped_ids(app, exp_id: int) -> dict[int, list[str]]:
    with app.state.sessions() as s:
        rows = s.execute(
            select(Round.index, Stage.result).join(Stage, Stage.round_id == Round.id)
            .where(Round.experiment_id == exp_id, Stage.name == "rollout_train")
        ).all()
    return {r: result["skipped"] for r, result in rows}


def test_spec_validates_the_skip_setting(tmp_path, database_url, tiny_model_dir, train_file):
    app = create_app(make_settings(tmp_path, database_url))
    with TestClient(app, headers=AUTH) as client:
        for field, value in (("skip_dead_base", 0.0), ("skip_dead_base", 1.5), ("skip_dead_cap", 1.0), ("skip_dead_cap", -0.1),
                             ("skip_dead", "sometimes")):
            resp = client.post("/api/v1/experiments", json=_body(tiny_model_dir, train_file, **{field: value}))
            assert resp.status_code == 422, resp.text
            assert [d["loc"][-1] for d in resp.json()["detail"]] == [field]
        resp = client.post("/api/v1/experiments", json=_body(tiny_model_dir, train_file))
        assert resp.status_code == 201
        config = resp.json()["config"]
        assert (config["skip_dead"], config["skip_dead_base"], config["skip_dead_cap"]) == (False, 0.5, 0.9)  # off by default
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"skip_dead", "skip_dead_base", "skip_dead_cap"} <= set(schema["ExperimentSpec"]["properties"])
        assert {"skipped_candidates", "rollouts_saved", "tokens_saved"} <= set(schema["RoundOut"]["properties"])


def test_skipping_off_takes_the_chunks_of_before(tmp_path, database_url, tiny_model_dir, train_file, workers):
    app = create_app(make_settings(tmp_path, database_url))
    with TestClient(app, headers=AUTH) as client:
        exp_id = client.post("/api/v1/experiments", json=_body(tiny_model_dir, train_file)).json()["id"]
        assert _drive(app, exp_id)["status"] == "completed"
        rounds = client.get(f"/api/v1/experiments/{exp_id}/rounds").json()
    with app.state.sessions() as s:
        order = [pid for _, pid in sorted(s.execute(select(PoolProblem.position, PoolProblem.problem_id).where(PoolProblem.experiment_id == exp_id)).all())]
    for r in range(ROUNDS):
        assert workers.chunks[r] == [chunk_ids(order, r, M)]  # positions [rM, (r+1)M) of the stored order, as before
    assert [(x["skipped_candidates"], x["rollouts_saved"], x["tokens_saved"]) for x in rounds] == [(0, 0, 0.0)] * ROUNDS
    assert [x["chunk_start"] for x in rounds] == [(r * M) % POOL_SIZE for r in range(ROUNDS)]


def test_skipping_on_skips_dead_candidates_counts_them_and_resumes_the_same_chunk(tmp_path, database_url, tiny_model_dir, train_file, workers):
    app = create_app(make_settings(tmp_path, database_url))
    with TestClient(app, headers=AUTH) as client:
        # an uninterrupted run, skipping on
        resp = client.post("/api/v1/experiments", json=_body(tiny_model_dir, train_file, skip_dead=True, name="skip"))
        assert resp.status_code == 201, resp.text
        exp_id = resp.json()["id"]
        assert _drive(app, exp_id)["status"] == "completed"
        rounds = client.get(f"/api/v1/experiments/{exp_id}/rounds").json()
        uninterrupted = {r: chunks[-1] for r, chunks in workers.chunks.items()}
        spec = StoredSpec.model_validate(app.state.experiments.get(exp_id).config)
        assert spec.skip_dead and spec.skip_setting().enabled
        skipped = _skipped_ids(app, exp_id)
        stored = _stored_chunks(app, exp_id)

        # the first pass over the pool (3 rounds) knows no streak yet: nothing skipped; later rounds skip dead ones
        assert [x["skipped_candidates"] for x in rounds[:3]] == [0, 0, 0]
        assert sum(x["skipped_candidates"] for x in rounds[3:]) > 0
        for x in rounds:
            r = x["index"]
            assert x["skipped_candidates"] == len(skipped[r])
            assert x["rollouts_saved"] == len(skipped[r]) * N_SAMPLES
            assert x["tokens_saved"] == pytest.approx(len(skipped[r]) * N_SAMPLES * 3.0)  # the stand-in's mean length
            assert all(_dead(pid) for pid in skipped[r])  # only dead problems are skipped ...
            assert not set(skipped[r]) & set(stored[r])  # ... and they are not candidates of that round
            assert len(stored[r]) == len(set(stored[r])) == M  # the chunk is filled from the pool
            assert sorted(uninterrupted[r], key=int) == stored[r]
        # fewer dead problems were rolled out than without skipping (half the pool is dead)
        later = [pid for r in range(3, ROUNDS) for pid in stored[r]]
        assert sum(map(_dead, later)) < len(later) / 2

        # the chunks are the shared round policy's, recomputed here from the stored pool order and candidates
        with app.state.sessions() as s:
            order = [pid for _, pid in sorted(s.execute(select(PoolProblem.position, PoolProblem.problem_id).where(PoolProblem.experiment_id == exp_id)).all())]
            history = s.execute(
                select(Round.index, Candidate.problem_id, Candidate.zero_advantage).join(Candidate, Candidate.round_id == Round.id)
                .where(Round.experiment_id == exp_id)
            ).all()
        cursor = 0
        for r in range(ROUNDS):
            draw = draw_chunk(order, cursor, M, zero_advantage_streaks(h for h in history if h[0] < r), spec.skip_setting(), stage_seed(3, r, "skip_dead"))
            assert (draw.ids, draw.skipped) == (uninterrupted[r], skipped[r])
            assert (rounds[r]["chunk_start"], rounds[r]["chunk_end"]) == (draw.start, draw.end)
            cursor = draw.end

        # the same experiment again, failing at the rollout of a round that skips, resumed after a restart
        fail = next(x["index"] for x in rounds if x["skipped_candidates"] > 0)
        workers.chunks.clear()
        workers.fail_round = fail
        second = client.post("/api/v1/experiments", json=_body(tiny_model_dir, train_file, skip_dead=True, name="again")).json()["id"]
        assert _drive(app, second)["status"] == "failed"
        failed_rounds = client.get(f"/api/v1/experiments/{second}/rounds").json()
    assert failed_rounds[fail]["skipped_candidates"] == rounds[fail]["skipped_candidates"] > 0  # counted before the failure
    restarted = create_app(make_settings(tmp_path, database_url))  # a new scheduler on the same database
    with TestClient(restarted, headers=AUTH) as client:
        assert client.post(f"/api/v1/experiments/{second}/resume").status_code == 200
        assert _drive(restarted, second)["status"] == "completed"
        resumed_rounds = client.get(f"/api/v1/experiments/{second}/rounds").json()
    first_attempt, retried = workers.chunks[fail]
    assert first_attempt == retried == uninterrupted[fail]  # the resumed round took the same chunk
    assert {r: chunks[-1] for r, chunks in workers.chunks.items()} == uninterrupted
    keys = ("skipped_candidates", "rollouts_saved", "tokens_saved", "chunk_start", "chunk_end")
    assert [[x[k] for k in keys] for x in resumed_rounds] == [[x[k] for k in keys] for x in rounds]


def test_the_next_round_starts_where_the_walk_ended(tmp_path, database_url, tiny_model_dir, train_file, workers):
    app = create_app(make_settings(tmp_path, database_url))
    with TestClient(app, headers=AUTH) as client:
        exp_id = client.post("/api/v1/experiments", json=_body(tiny_model_dir, train_file, skip_dead=True, skip_dead_base=1.0, skip_dead_cap=0.99)).json()["id"]
        assert _drive(app, exp_id)["status"] == "completed"
        rounds = client.get(f"/api/v1/experiments/{exp_id}/rounds").json()
    for prev, nxt in zip(rounds, rounds[1:]):
        assert nxt["chunk_start"] == prev["chunk_end"]
        assert prev["chunk_end"] == (prev["chunk_start"] + M + prev["skipped_candidates"]) % POOL_SIZE
    # nearly every dead problem is skipped once known: far more skipped than with the default base and cap
    assert sum(x["skipped_candidates"] for x in rounds[3:]) >= 8
