"""A worker service that is down: the experiment names it and retries, then fails; the scheduler lives on."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from scheduler_fixtures import AUTH, experiment_body, make_settings
from services.scheduler.app import create_app
from gradalign_tools.stack import free_port


def test_unreachable_rollout_is_reported_retried_then_failed(tmp_path, tiny_model_dir, database_url):
    address = f"127.0.0.1:{free_port()}"  # nothing listens here
    settings = make_settings(
        tmp_path,
        database_url,
        run_orchestrator=True,
        rollout_addresses=[address],
        retry_limit=3,
        retry_backoff_s=0.2,
        worker_deadline_s=5,
    )
    with TestClient(create_app(settings), headers=AUTH) as client:
        exp_id = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir)).json()["id"]
        details, exp = set(), {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            exp = client.get(f"/api/v1/experiments/{exp_id}").json()
            if exp["status_detail"]:
                details.add(exp["status_detail"])
            if exp["status"] == "failed":
                break
            time.sleep(0.05)
        assert exp["status"] == "failed", exp
        assert f"rollout service at {address}" in exp["error"] and "gave up after 4 attempts" in exp["error"]
        assert any(f"waiting for the rollout service at {address}" in d for d in details), details
        stage = client.get(f"/api/v1/experiments/{exp_id}/rounds").json()[0]["stages"][0]
        assert stage["name"] == "rollout_train" and stage["status"] == "failed" and stage["attempts"] == 4
        # the scheduler itself is unharmed and still takes experiments
        assert client.get("/healthz").status_code == 200
        assert client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir)).status_code == 201
