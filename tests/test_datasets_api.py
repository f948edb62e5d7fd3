"""Datasets through the API: upload (streamed, size-limited), register under the data root, mix, list, get; and use in an experiment."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from scheduler_fixtures import AUTH, experiment_body, make_settings
from services.scheduler.app import create_app


def _records(n: int, source: str = "arith", offset: int = 0) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"{i}+1="}], "data_source": source,
         "reward_model": {"ground_truth": str(i + 1)}, "extra_info": {"index": offset + i}}
        for i in range(n)
    ]


@pytest.fixture
def client(tmp_path, database_url):
    app = create_app(make_settings(tmp_path, database_url, max_upload_bytes=20_000))
    with TestClient(app, headers=AUTH) as c:
        yield c


def test_upload_register_mix_list_get_and_use(client, tmp_path, tiny_model_dir):
    jsonl = "".join(json.dumps(r) + "\n" for r in _records(40))
    resp = client.post("/api/v1/datasets/upload", params={"name": "up", "format": "jsonl"}, content=jsonl.encode())
    assert resp.status_code == 201, resp.text
    assert resp.json()["n_rows"] == 40 and resp.json()["data_sources"] == {"arith": 40}

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(_records(30, "exact_match", offset=1000)), buf)
    (tmp_path / "local.parquet").write_bytes(buf.getvalue())
    resp = client.post("/api/v1/datasets/register", json={"name": "local", "path": str(tmp_path / "local.parquet")})
    assert resp.status_code == 201, resp.text
    assert resp.json()["data_sources"] == {"exact_match": 30}

    resp = client.post("/api/v1/datasets/mix", json={"name": "mixed", "sources": [{"dataset": "up", "count": 10}, {"dataset": "local", "count": 5}], "seed": 3})
    assert resp.status_code == 201, resp.text
    assert resp.json()["n_rows"] == 15 and resp.json()["data_sources"] == {"arith": 10, "exact_match": 5}

    listing = client.get("/api/v1/datasets").json()
    assert [d["name"] for d in listing] == ["local", "mixed", "up"]
    assert [d["origin"]["kind"] for d in listing] == ["register", "mix", "upload"]
    assert all("field" not in d["origin"] for d in listing)  # the origin says how it was made, not a request field
    assert client.get("/api/v1/datasets/mixed").json()["origin"]["kind"] == "mix"
    assert client.get("/api/v1/datasets/nope").status_code == 404

    # an experiment can name a registered dataset
    resp = client.post("/api/v1/experiments", json=experiment_body(tiny_model_dir, train_dataset="up", chunk_size=16))
    assert resp.status_code == 201, resp.text
    assert resp.json()["pool_size"] == 40


def test_bad_dataset_requests(client, tmp_path):
    # outside the data root
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_text(json.dumps(_records(1)[0]) + "\n")
    try:
        resp = client.post("/api/v1/datasets/register", json={"name": "x", "path": str(outside)})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][-1] == "path"
    finally:
        outside.unlink()
    # too large: refused with 413, nothing stored
    big = "".join(json.dumps(r) + "\n" for r in _records(400))
    resp = client.post("/api/v1/datasets/upload", params={"name": "big", "format": "jsonl"}, content=big.encode())
    assert resp.status_code == 413
    # malformed
    resp = client.post("/api/v1/datasets/upload", params={"name": "bad", "format": "jsonl"}, content=b'{"prompt": "1+1="}\n')
    assert resp.status_code == 422 and "upload:1: missing field 'data_source'" in resp.text
    # empty
    assert client.post("/api/v1/datasets/upload", params={"name": "empty", "format": "jsonl"}, content=b"").status_code == 422
    # bad name, unknown source, duplicate
    assert client.post("/api/v1/datasets/upload", params={"name": "../etc", "format": "jsonl"}, content=b"x").status_code == 422
    assert client.post("/api/v1/datasets/mix", json={"name": "m", "sources": [{"dataset": "nope", "count": 1}]}).status_code == 404
    ok = "".join(json.dumps(r) + "\n" for r in _records(5))
    assert client.post("/api/v1/datasets/upload", params={"name": "ok", "format": "jsonl"}, content=ok.encode()).status_code == 201
    assert client.post("/api/v1/datasets/upload", params={"name": "ok", "format": "jsonl"}, content=ok.encode()).status_code == 409
    # without a token
    assert client.post("/api/v1/datasets/upload", params={"name": "n", "format": "jsonl"}, content=ok.encode(), headers={"Authorization": ""}).status_code == 401
    assert [d["name"] for d in client.get("/api/v1/datasets").json()] == ["ok"]
