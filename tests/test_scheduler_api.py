"""REST API round trips and validation, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from gradalign_common.errors import ConflictError, FieldError, InvalidInputError, NotFoundError
from services.scheduler.app import create_app
from scheduler_fixtures import AUTH, experiment_body, make_settings


@pytest.fixture
def client(tmp_path, database_url):
    app = create_app(make_settings(tmp_path, database_url))
    with TestClient(app, headers=AUTH) as c:
        yield c


def _field_of_422(resp) -> list[str]:
    assert resp.status_code == 422, resp.text
    return [str(d["loc"][-1]) for d in resp.json()["detail"]]


def test_create_get_list_cancel(client, tiny_model_dir):
    resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir))
    assert resp.status_code == 201, resp.text
    exp = resp.json()
    assert exp["status"] == "pending" and exp["pool_size"] == 512 and exp["checkpoint"] == str(tiny_model_dir.resolve())

    got = client.get(f"/api/v1/experiments/{exp['id']}").json()
    assert got["id"] == exp["id"] and got["config"]["chunk_size"] == 16

    listing = client.get("/api/v1/experiments", params={"status": "pending"}).json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == exp["id"]
    assert client.get("/api/v1/experiments", params={"status": "running"}).json()["total"] == 0

    cancelled = client.post(f"/api/v1/experiments/{exp['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert client.post(f"/api/v1/experiments/{exp['id']}/cancel").status_code == 409
    assert client.get(f"/api/v1/experiments/{exp['id']}/rounds").json() == []


def test_unknown_experiment_is_404(client):
    assert client.get("/api/v1/experiments/999").status_code == 404
    assert client.get("/api/v1/experiments/999/rounds").status_code == 404


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"k": 32}, "k"),
        ({"mode": "bogus"}, "mode"),
        ({"iters_per_select": 3, "chunk_size": 16, "k": 2, "train_batch_size": 3}, "iters_per_select"),
        ({"train_batch_size": 5}, "train_batch_size"),
        ({"temperature": -1}, "temperature"),
        ({"n_samples_train": 0}, "n_samples_train"),
        ({"unknown_knob": 1}, "unknown_knob"),
        ({"scoring_method": "fastest"}, "scoring_method"),
        ({"scoring_method": "exact-3"}, "scoring_method"),
        ({"scoring_dtype": "int8"}, "scoring_dtype"),
        ({"scoring_memory_budget": "lots"}, "scoring_memory_budget"),
        ({"scoring_memory_budget": "150%"}, "scoring_memory_budget"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, tiny_model_dir, overrides, field):
    resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, **overrides))
    assert field in _field_of_422(resp)
    assert client.get("/api/v1/experiments").json()["total"] == 0  # nothing stored


def test_missing_field_is_422(client, tiny_model_dir):
    body = experiment_body(tiny_model_dir)
    del body["chunk_size"]
    assert "chunk_size" in _field_of_422(client.post("/api/v1/experiments", json=body))


def test_bad_model_path_is_422(client, tmp_path, tiny_model_dir):
    assert "model" in _field_of_422(client.post("/api/v1/experiments", json=experiment_body(tmp_path / "nope")))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    resp = client.post("/api/v1/experiments", json=experiment_body(not_a_model))
    assert "model" in _field_of_422(resp)
    assert resp.json()["detail"][0]["msg"] == "not a usable model under the models root"  # no hint of what is there


def test_bad_datasets_are_422(client, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, train_dataset=str(empty)))
    assert "train_dataset" in _field_of_422(resp) and "empty" in resp.json()["detail"][0]["msg"]

    malformed = tmp_path / "bad.jsonl"
    malformed.write_text(json.dumps({"prompt": "1+1=", "data_source": "arith"}) + "\n{not json\n")
    resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, val_dataset=str(malformed)))
    assert "val_dataset" in _field_of_422(resp) and "reward_model.ground_truth" in resp.json()["detail"][0]["msg"]

    missing = tmp_path / "missing.parquet"
    assert "train_dataset" in _field_of_422(
        client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, train_dataset=str(missing)))
    )
    assert client.get("/api/v1/experiments").json()["total"] == 0


def test_chunk_larger_than_pool_is_422(client, tmp_path, tiny_model_dir):
    small = tmp_path / "small.jsonl"
    small.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "data_source": "arith", "reward_model": {"ground_truth": str(i + 1)}}) + "\n"
            for i in range(8)
        )
    )
    resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, train_dataset=str(small)))
    assert "chunk_size" in _field_of_422(resp)


def test_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    # ready = the API can serve (its database answers); the workers (none running here) are shown, not gated on
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert ready.json()["checks"]["database"] is True
    assert [ok for key, ok in ready.json()["checks"].items() if key != "database"] and not any(
        ok for key, ok in ready.json()["checks"].items() if key != "database"
    )
    assert "gradalign_stage_seconds" in client.get("/metrics").text


def test_resume_and_delete(client, tiny_model_dir):
    exp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir)).json()
    assert client.post(f"/api/v1/experiments/{exp['id']}/resume").status_code == 409  # pending: nothing to resume
    client.post(f"/api/v1/experiments/{exp['id']}/cancel")
    resumed = client.post(f"/api/v1/experiments/{exp['id']}/resume").json()
    assert resumed["status"] == "pending" and resumed["error"] is None
    assert client.delete(f"/api/v1/experiments/{exp['id']}").status_code == 204  # a queued one is cancelled first
    assert client.get(f"/api/v1/experiments/{exp['id']}").status_code == 404
    assert client.delete(f"/api/v1/experiments/{exp['id']}").status_code == 404


def test_event_stream_delivers_published_events(client):
    import threading
    import time

    bus = client.app.state.bus

    def publish_soon():
        time.sleep(0.5)
        bus.publish({"type": "progress", "experiment_id": 7, "stage": "score", "done": 3, "total": 8})
        bus.publish({"type": "progress", "experiment_id": 8, "stage": "score", "done": 1, "total": 8})

    threading.Thread(target=publish_soon, daemon=True).start()
    with client.stream("GET", "/api/v1/events", params={"experiment_id": 7}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                break
    assert event["experiment_id"] == 7 and event["done"] == 3


def test_mutations_need_a_valid_token(client, tiny_model_dir):
    body = experiment_body(tiny_model_dir)
    no_auth = {"Authorization": ""}
    resp = client.post("/api/v1/experiments", json=body, headers=no_auth)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert client.post("/api/v1/experiments", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/api/v1/experiments/1/cancel", headers=no_auth).status_code == 401
    assert client.delete("/api/v1/experiments/1", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/api/v1/experiments", headers=no_auth).status_code == 200  # reads are open by default
    assert client.get("/api/v1/experiments").json()["total"] == 0

    tokens = client.app.state.tokens
    fresh = tokens.create("alice")
    assert client.post("/api/v1/experiments", json=body, headers={"Authorization": f"Bearer {fresh}"}).status_code == 201
    tokens.revoke("alice")
    assert client.post("/api/v1/experiments", json=body, headers={"Authorization": f"Bearer {fresh}"}).status_code == 403
    with client.app.state.sessions() as s:  # only the hash is stored
        from services.scheduler.db import ApiToken

        assert all(fresh not in (t.token_hash, t.name) for t in s.query(ApiToken).all())


def test_reads_can_require_a_token(tmp_path, database_url):
    app = create_app(make_settings(tmp_path, database_url, read_requires_token=True))
    with TestClient(app) as c:
        assert c.get("/api/v1/experiments").status_code == 401
        assert c.get("/api/v1/experiments", headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200  # probes stay open


def test_dataset_path_outside_the_data_root_is_refused(client, tmp_path, tiny_model_dir):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_text(json.dumps({"prompt": "1+1=", "data_source": "arith", "reward_model": {"ground_truth": "2"}}) + "\n")
    try:
        resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, train_dataset=str(outside)))
        assert "train_dataset" in _field_of_422(resp) and "outside the allowed data root" in resp.json()["detail"][0]["msg"]
        sneaky = str(tmp_path / ".." / outside.name)
        assert "train_dataset" in _field_of_422(client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, train_dataset=sneaky)))
    finally:
        outside.unlink()


def _seed_results(app, tiny_model_dir, client):
    """An experiment with one round of three scored candidates, two selected."""
    from services.scheduler.db import Candidate, Round
    from services.scheduler.status import RoundStatus

    exp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir)).json()
    with app.state.sessions() as s:
        rnd = Round(experiment_id=exp["id"], index=0, status=RoundStatus.COMPLETED, checkpoint_in="-")
        s.add(rnd)
        s.flush()
        for pid, score, rank in (("a", 0.9, 0), ("b", 0.5, 1), ("c", -0.2, None)):
            s.add(Candidate(round_id=rnd.id, problem_id=pid, n_responses=4, accuracy=0.5, mean_reward=0.5,
                            mean_response_length=3.0, score=score, zero_advantage=False, selected=rank is not None, rank=rank))
        s.commit()
    return exp["id"]


def test_export_candidates_as_csv_and_parquet(client, tiny_model_dir):
    import csv
    import io

    import pyarrow.parquet as pq

    exp_id = _seed_results(client.app, tiny_model_dir, client)
    resp = client.get(f"/api/v1/experiments/{exp_id}/candidates.csv")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert [r["problem_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["selected"] == "True" and rows[2]["rank"] == "" and float(rows[1]["score"]) == 0.5

    resp = client.get(f"/api/v1/experiments/{exp_id}/candidates.parquet", params={"round": 0})
    table = pq.read_table(io.BytesIO(resp.content))
    assert table.column("problem_id").to_pylist() == ["a", "b", "c"]
    assert table.column("rank").to_pylist() == [0, 1, None]
    assert client.get(f"/api/v1/experiments/{exp_id}/candidates.xlsx").status_code == 422
    assert client.get("/api/v1/experiments/999/candidates.csv").status_code == 404


def test_the_stored_spec_parses_back_into_the_typed_spec(client, tiny_model_dir):
    from services.scheduler.spec import StoredSpec

    exp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir)).json()
    spec = StoredSpec.model_validate(exp["config"])
    assert (spec.scoring_method, spec.scoring_dtype_request(), spec.max_grad_norm) == ("exact", "", 1.0)
    assert spec.model == str(tiny_model_dir.resolve()) and spec.train_dataset_path.endswith(".jsonl")
    body = experiment_body(tiny_model_dir, scoring_method="top-layers", scoring_dtype="bfloat16", max_grad_norm=0.5)
    spec = StoredSpec.model_validate(client.post("/api/v1/experiments", json=body).json()["config"])
    assert (spec.scoring_method, spec.scoring_dtype_request(), spec.max_grad_norm) == ("top-layers-1", "bfloat16", 0.5)
    # an experiment stored before the newer fields existed gets their defaults, from the one model
    old = {k: v for k, v in exp["config"].items() if k not in ("scoring_method", "scoring_dtype", "priority", "max_grad_norm")}
    spec = StoredSpec.model_validate(old)
    assert (spec.scoring_method, spec.scoring_dtype, spec.priority, spec.max_grad_norm) == ("exact", "auto", 1.0, 1.0)
    assert client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, max_grad_norm=0)).status_code == 422


class _RefusingExperiments:
    """Stands in for ExperimentService through the `get_experiments` dependency: every call raises `error`."""

    def __init__(self, error: Exception):
        self.error = error

    def get(self, exp_id: int):
        raise self.error

    cancel = resume = get


@pytest.mark.parametrize(
    "error, status, detail",
    [
        (ConflictError("experiment 1 is already completed"), 409, "experiment 1 is already completed"),
        (NotFoundError("experiment 1 not found"), 404, "experiment 1 not found"),
        (FieldError("chunk_size", "too large"), 422, [{"loc": ["body", "chunk_size"], "msg": "too large", "type": "value_error"}]),
        (InvalidInputError("broken dataset file"), 422, [{"loc": [], "msg": "broken dataset file", "type": "value_error"}]),
    ],
)
def test_service_errors_map_to_status_codes(client, error, status, detail):
    from services.scheduler.deps import get_experiments

    client.app.dependency_overrides[get_experiments] = lambda: _RefusingExperiments(error)
    try:
        for resp in (client.get("/api/v1/experiments/1"), client.post("/api/v1/experiments/1/resume")):
            assert resp.status_code == status and resp.json()["detail"] == detail, resp.text
    finally:
        client.app.dependency_overrides.clear()


def test_openapi_documents_conflicts_where_they_happen(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in (
        ("/api/v1/experiments/{experiment_id}/cancel", "post"),
        ("/api/v1/experiments/{experiment_id}/resume", "post"),
        ("/api/v1/datasets/upload", "post"),
        ("/api/v1/datasets/register", "post"),
        ("/api/v1/datasets/mix", "post"),
    ):
        assert "409" in paths[path][method]["responses"], path
    assert "409" not in paths["/api/v1/experiments/{experiment_id}"]["get"]["responses"]
    assert "404" in paths["/api/v1/experiments/{experiment_id}/rounds"]["get"]["responses"]
    assert "422" in paths["/api/v1/experiments"]["post"]["responses"]
