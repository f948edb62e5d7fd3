"""The orchestrator against stand-in workers (real gRPC servers whose stages sleep): leases held by
a timer while a stage outlives their TTL, experiments side by side, cancellation while queued."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from gradalign_common.tiny_model import TinyModelSpec, build_and_save
from gradalign_tools.bench.orchestrator import run_experiments, worker_shares
from gradalign_tools.bench.standin_workers import StandInWorkers
from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_and_save(tmp_path_factory.mktemp("model") / "tiny", TinyModelSpec(warmup_steps=0))


def _settings(tmp_path, database_url, workers, **overrides) -> SchedulerSettings:
    return SchedulerSettings(
        database_url=database_url, artifact_root=tmp_path / "artifacts", data_root=tmp_path,
        rollout_addresses=[workers.addresses["rollout"]], scoring_addresses=[workers.addresses["scoring"]],
        trainer_address=workers.addresses["trainer"], poll_interval_s=0.05, auth_enabled=False, log_level="WARNING",
        **overrides,
    )


def _body(model_dir, **overrides) -> dict:
    body = {
        "model": str(model_dir), "train_dataset": "arith-train", "val_dataset": "arith-val", "chunk_size": 16, "k": 4,
        "mode": "sim", "num_selections": 1, "train_batch_size": 4, "iters_per_select": 1, "n_samples_train": 4,
        "n_samples_val": 4, "max_tokens": 4,
    }
    return {**body, **overrides}


def _wait(client, exp_id, timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get(f"/api/v1/experiments/{exp_id}").json()
        if exp["status"] in ("completed", "failed", "cancelled"):
            return exp
        time.sleep(0.05)
    raise AssertionError(f"experiment {exp_id} did not end: {exp}")


def test_a_stage_longer_than_the_lease_runs_once_with_two_replicas(tmp_path, database_url, model_dir):
    """Two scheduler replicas on one database, lease TTL 1 s, a training stage of 2 x 1.5 s whose
    progress comes less often than the TTL: the driving replica's timer keeps the lease, so the other
    never takes the experiment over and no request is sent twice."""
    with StandInWorkers(rollout_s=0.1, scoring_s=0.1, train_step_s=1.5) as workers:
        common = dict(lease_ttl_s=1.0, run_orchestrator=True)
        a = create_app(_settings(tmp_path, database_url, workers, replica_id="replica-a", **common))
        b = create_app(_settings(tmp_path, database_url, workers, replica_id="replica-b", **common))
        with TestClient(a) as client_a, TestClient(b):
            exp_id = client_a.post("/api/v1/experiments", json=_body(model_dir, iters_per_select=2, train_batch_size=2)).json()["id"]
            exp = _wait(client_a, exp_id)
        calls = workers.log.snapshot()
    assert exp["status"] == "completed", exp
    sent = Counter(c.request_id for c in calls)
    assert sent and all(n == 1 for n in sent.values()), sent
    train = [c for c in calls if c.service == "trainer"]
    assert len(train) == 1 and train[0].seconds > 2.5  # longer than the TTL, twice over


def test_experiments_share_the_workers_fairly_and_overlap(tmp_path, model_dir):
    """Three experiments of 2 rounds at once: each gets about a third of every worker's time, and the
    whole run takes less than the same experiments one after another."""
    with StandInWorkers(rollout_s=0.2, scoring_s=0.1, train_step_s=0.2) as workers:
        serial = run_experiments(tmp_path / "serial", workers, 3, 2, 1, model_dir)
        parallel = run_experiments(tmp_path / "parallel", workers, 3, 2, 3, model_dir)
    assert serial.statuses == parallel.statuses == ["completed"] * 3
    assert parallel.wall_s < 0.8 * serial.wall_s, (parallel.wall_s, serial.wall_s)
    for service, shares in worker_shares(parallel.calls).items():
        assert len(shares) == 3 and all(0.25 < s < 0.42 for s in shares.values()), (service, shares)
    # queued time is recorded per stage; side by side, somebody waited for a slot
    assert max(s["queued_seconds"] for st in parallel.stages.values() for s in st) > 0.05
    assert max(s["queued_seconds"] for st in serial.stages.values() for s in st) < 0.05


def test_priority_buys_a_larger_share_of_a_contended_worker(tmp_path, model_dir):
    """Three experiments contend for the rollout replica (each has one request out at a time, so a freed
    slot is contested whenever two wait): the one of priority 4 gets it more often and finishes first."""
    with StandInWorkers(rollout_s=0.15, scoring_s=0.02, train_step_s=0.02) as workers:
        run = run_experiments(tmp_path / "prio", workers, 3, 3, 3, model_dir, priorities=[1.0, 1.0, 4.0])
    assert run.statuses == ["completed"] * 3
    finished = {exp: max(s["finished_at"] for s in stages) for exp, stages in run.stages.items()}
    *low, high = sorted(finished)
    assert all(finished[high] < finished[e] for e in low), finished


def test_cancelling_a_queued_experiment_frees_its_place(tmp_path, model_dir):
    """An experiment waiting for a busy trainer slot is cancelled: it stops waiting at once (its stage goes back
    to pending, no request is sent) and the other experiment is not held up."""
    with StandInWorkers(rollout_s=0.05, scoring_s=0.05, train_step_s=2.0) as workers:
        app = create_app(_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", workers, run_orchestrator=True))
        with TestClient(app) as client:
            first = client.post("/api/v1/experiments", json=_body(model_dir, name="first")).json()["id"]
            deadline = time.monotonic() + 30
            while client.get(f"/api/v1/experiments/{first}").json()["current_stage"] != "train" and time.monotonic() < deadline:
                time.sleep(0.05)
            created = client.post("/api/v1/experiments", json=_body(model_dir, name="second", seed=1)).json()
            second, second_uid = created["id"], created["uid"]
            while client.get(f"/api/v1/experiments/{second}").json()["current_stage"] != "train" and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # the second now waits for the trainer's one slot
            assert client.get("/api/v1/experiments/{}".format(second)).json()["current_stage"] == "train"
            assert client.post(f"/api/v1/experiments/{second}/cancel").status_code == 200
            exp_first = _wait(client, first)
            rounds = client.get(f"/api/v1/experiments/{second}/rounds").json()
            exp_second = client.get(f"/api/v1/experiments/{second}").json()
        calls = workers.log.snapshot()
    assert exp_first["status"] == "completed" and exp_second["status"] == "cancelled"
    assert exp_second["status_detail"] is None
    train_stage = next(s for s in rounds[0]["stages"] if s["name"] == "train")
    assert train_stage["status"] == "pending" and train_stage["attempts"] == 0
    assert not [c for c in calls if c.service == "trainer" and c.experiment == second_uid]


def _wait_until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


STAGE_SERVICE = {"rollout_train": "rollout", "score": "scoring", "train": "trainer"}


@pytest.mark.parametrize("stage", ["rollout_train", "score", "train"])
def test_cancel_during_a_stage_stops_the_worker_call_and_frees_it(tmp_path, model_dir, stage):
    """Cancel while the stage's worker call is running: the scheduler cancels the gRPC call, the worker stops
    within seconds and writes nothing, the worker's and the scheduler's slots are free, and the stage goes back to
    pending (a resume runs it again)."""
    service = STAGE_SERVICE[stage]
    times = {"rollout_s": 0.05, "scoring_s": 0.05, "train_step_s": 0.05}
    times[{"rollout": "rollout_s", "scoring": "scoring_s", "trainer": "train_step_s"}[service]] = 60.0
    with StandInWorkers(capacity=1, **times) as workers:
        app = create_app(_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", workers, run_orchestrator=True, cancel_poll_s=0.2))
        with TestClient(app) as client:
            exp = client.post("/api/v1/experiments", json=_body(model_dir)).json()
            _wait_until(lambda: workers.gates[service].in_flight() == 1
                        and client.get(f"/api/v1/experiments/{exp['id']}").json()["current_stage"] == stage, what=f"{stage} in flight")
            cancelled_at = time.monotonic()
            assert client.post(f"/api/v1/experiments/{exp['id']}/cancel").status_code == 200
            _wait_until(lambda: workers.gates[service].in_flight() == 0, timeout=10, what="the worker to stop")
            latency = time.monotonic() - cancelled_at
            orch = app.state.orchestrator
            _wait_until(lambda: not orch._driven(), timeout=10, what="the driver to stop")
            rounds = client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()
            address = workers.addresses[service]
            assert orch.capacity.busy(service, address) == 0
        calls = [c for c in workers.log.snapshot() if c.service == service]
    assert latency < 5.0, latency
    assert [c.cancelled for c in calls] == [True]
    store = app.state.orchestrator.store
    output = {
        "rollout_train": store.rollouts_path(exp["uid"], 0, "rollout_train", 0),
        "score": store.scores_path(exp["uid"], 0, 0),
        "train": store.checkpoint_dir(exp["uid"], 0),
    }[stage]
    assert not output.exists()
    st = next(s for s in rounds[0]["stages"] if s["name"] == stage)
    assert (st["status"], st["attempts"]) == ("pending", 0)


def test_deleting_a_running_experiment_cancels_it_and_removes_its_artifacts(tmp_path, model_dir):
    with StandInWorkers(capacity=1, rollout_s=0.05, scoring_s=0.05, train_step_s=60.0) as workers:
        app = create_app(_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", workers, run_orchestrator=True, cancel_poll_s=0.2))
        with TestClient(app) as client:
            exp = client.post("/api/v1/experiments", json=_body(model_dir)).json()
            _wait_until(lambda: workers.gates["trainer"].in_flight() == 1, what="training in flight")
            exp_dir = app.state.orchestrator.store.experiment_dir(exp["uid"])
            assert (exp_dir / "rounds").is_dir()
            assert client.delete(f"/api/v1/experiments/{exp['id']}").status_code == 204
            _wait_until(lambda: workers.gates["trainer"].in_flight() == 0, timeout=10, what="the trainer to stop")
            _wait_until(lambda: not app.state.orchestrator._driven(), timeout=10, what="the driver to stop")
            assert client.get(f"/api/v1/experiments/{exp['id']}").status_code == 404
        calls = workers.log.snapshot()
    assert [c.cancelled for c in calls if c.service == "trainer"] == [True]
    assert not exp_dir.exists()


def test_a_worker_at_capacity_is_retried_not_failed(tmp_path, model_dir):
    """Two scheduler replicas (each counting its own slots) share workers that admit one request at a time: the
    request over capacity is answered RESOURCE_EXHAUSTED, queued and retried without counting an attempt."""
    from gradalign_common.request_gate import REFUSED

    refused_before = sum(REFUSED.labels(s)._value.get() for s in ("rollout", "scoring", "trainer"))
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with StandInWorkers(capacity=1, rollout_s=0.3, scoring_s=0.3, train_step_s=0.3) as workers:
        common = dict(run_orchestrator=True, max_parallel_experiments=1, retry_backoff_s=0.1, retry_limit=0)
        a = create_app(_settings(tmp_path, db, workers, replica_id="replica-a", **common))
        b = create_app(_settings(tmp_path, db, workers, replica_id="replica-b", **common))
        with TestClient(a) as client_a, TestClient(b):
            ids = [client_a.post("/api/v1/experiments", json=_body(model_dir, name=f"e{i}", seed=i, num_selections=2)).json()["id"] for i in range(2)]
            exps = [_wait(client_a, i) for i in ids]
            rounds = [client_a.get(f"/api/v1/experiments/{i}/rounds").json() for i in ids]
    refused = sum(REFUSED.labels(s)._value.get() for s in ("rollout", "scoring", "trainer")) - refused_before
    assert [e["status"] for e in exps] == ["completed", "completed"], exps
    assert refused > 0  # the replicas did collide on a worker
    # retry_limit=0: a refusal counted as a failed attempt would have failed the experiment
    assert all(s["attempts"] == 1 for r in rounds for rnd in r for s in rnd["stages"])
