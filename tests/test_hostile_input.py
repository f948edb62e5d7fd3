"""Hostile and careless input to the experiments API: a 4xx naming the field, nothing stored, never a 500; on
SQLite and PostgreSQL. (Datasets: tests/test_hostile_datasets.py; event streams: tests/test_events_flood.py.)"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from scheduler_fixtures import AUTH, TEST_TOKEN, experiment_body, make_settings
from services.scheduler.app import create_app
from services.scheduler.auth import TokenStore


@pytest.fixture
def client(tmp_path, database_url):
    app = create_app(make_settings(tmp_path, database_url))
    with TestClient(app, headers=AUTH) as c:
        yield c


def _post_raw(client, text: str):
    return client.post("/api/v1/experiments", content=text.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/json"})


def _fields_of_422(resp) -> list[str]:
    assert resp.status_code == 422, resp.text
    return [str(d["loc"][-1]) for d in resp.json()["detail"]]


def _with(body: dict, **raw_values: str) -> str:
    """The body as JSON text with some values written verbatim (NaN, Infinity, 1e400, escapes)."""
    text = json.dumps({k: v for k, v in body.items() if k not in raw_values})
    extra = ", ".join(f'"{k}": {v}' for k, v in raw_values.items())
    return text[:-1] + ", " + extra + "}"


@pytest.mark.parametrize(
    "field, raw",
    [
        ("temperature", "NaN"),
        ("kl_coef", "Infinity"),
        ("learning_rate", "-Infinity"),
        ("temperature", "1e400"),
        ("name", '"\\ud800"'),  # a lone surrogate
        ("name", '"a\\u0000b"'),  # a NUL byte
        ("val_dataset", '"arith-val\\u0000"'),
        ("model", '"\\udfff/model"'),
    ],
)
def test_non_finite_numbers_and_unstorable_text_are_422_naming_the_field(client, tiny_model_dir, field, raw):
    resp = _post_raw(client, _with(experiment_body(tiny_model_dir), **{field: raw}))
    assert field in _fields_of_422(resp)
    json.dumps(resp.json())  # the error body itself is valid JSON (no echo of the bad text)
    assert client.get("/api/v1/experiments").json()["total"] == 0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"iters_per_select": 10**9}, "iters_per_select"),
        ({"micro_batch_size": 10**12}, "micro_batch_size"),
        ({"n_samples_train": 4096}, "n_samples_train"),
        ({"kl_coef": 1e308}, "kl_coef"),
        ({"max_tokens": 1_000_000}, "max_tokens"),  # the tiny model's context is far shorter
        ({"max_tokens": 60}, "max_tokens"),  # under the context alone, but not after the longest prompt
    ],
)
def test_values_that_would_exhaust_resources_are_refused(client, tiny_model_dir, overrides, field):
    resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, **overrides))
    assert field in _fields_of_422(resp)
    assert client.get("/api/v1/experiments").json()["total"] == 0


def test_the_per_experiment_budgets_are_enforced(tmp_path, database_url, tiny_model_dir):
    settings = make_settings(tmp_path, database_url, max_train_steps_per_experiment=10, max_generated_tokens_per_experiment=5_000)
    with TestClient(create_app(settings), headers=AUTH) as client:
        steps = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, num_selections=4, iters_per_select=4))
        assert "iters_per_select" in _fields_of_422(steps) and "budget of 10" in steps.text
        tokens = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, num_selections=10, iters_per_select=1))
        assert "num_selections" in _fields_of_422(tokens) and "budget" in tokens.text
        ok = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, num_selections=1, iters_per_select=1))
        assert ok.status_code == 201, ok.text


def test_a_problem_id_with_a_slash_can_be_addressed(client, tiny_model_dir):
    exp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir)).json()
    resp = client.get(f"/api/v1/experiments/{exp['id']}/rounds/0/problems/gsm8k%2F12")
    # the route resolves the id (no round yet: the service's own 404 names it), not a generic "Not Found"
    assert resp.status_code == 404 and "round 0" in resp.json()["detail"]


def test_a_revoked_bootstrap_token_stays_revoked_after_a_restart(tmp_path, database_url):
    settings = make_settings(tmp_path, database_url)
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/v1/datasets/mix", json={}, headers=AUTH).status_code == 422  # the token is valid
        TokenStore(client.app.state.sessions).revoke("bootstrap")
    with TestClient(create_app(settings)) as client:  # a restart with the same bootstrap token
        assert client.post("/api/v1/datasets/mix", json={}, headers=AUTH).status_code == 403
    # a new bootstrap token under the same name replaces the revoked one
    new = make_settings(tmp_path, database_url, bootstrap_token=TEST_TOKEN + "-rotated")
    with TestClient(create_app(new)) as client:
        rotated = {"Authorization": f"Bearer {TEST_TOKEN}-rotated"}
        assert client.post("/api/v1/datasets/mix", json={}, headers=rotated).status_code == 422
        assert client.post("/api/v1/datasets/mix", json={}, headers=AUTH).status_code == 403


def test_responses_are_not_sniffed_and_swagger_is_off_unless_enabled(tmp_path, database_url):
    with TestClient(create_app(make_settings(tmp_path, database_url))) as client:
        assert client.get("/api/v1/experiments").headers["x-content-type-options"] == "nosniff"
        assert client.get("/healthz").headers["x-content-type-options"] == "nosniff"
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 200
    with TestClient(create_app(make_settings(tmp_path, database_url, docs_enabled=True))) as client:
        assert client.get("/docs").status_code == 200


def test_replicas_starting_together_on_a_fresh_database_migrate_once(postgresql_url):
    """Several scheduler replicas (and the chart's init container) upgrade a fresh PostgreSQL database at the same
    moment, as separate processes: one migrates under the advisory lock, the others find it at head. (Replicas share
    a database only on PostgreSQL; SQLite serves one machine.)"""
    import subprocess
    import sys
    import time

    from services.scheduler.db import make_engine
    from services.scheduler.migrate import current_revision

    # each process imports everything first, then all upgrade at the same instant
    script = (
        "import sys, time\n"
        "from services.scheduler.db import make_engine\n"
        "from services.scheduler.migrate import upgrade\n"
        "engine = make_engine(sys.argv[1])\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "upgrade(engine)\n"
    )
    start_at = str(time.time() + 8.0)
    command = [sys.executable, "-c", script, postgresql_url, start_at]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    engine = make_engine(postgresql_url)
    assert current_revision(engine) is not None
    engine.dispose()
