"""Who may read what, and what the OpenAPI schema says about it: /openapi.json, /docs and /redoc follow
`read_requires_token` like every read, /metrics follows `metrics_requires_token`, and the schema declares a
token (with its 401/403) on exactly the operations that need one; the upload declares its request body."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from scheduler_fixtures import AUTH, make_settings
from services.scheduler.app import create_app

READS = ["/api/v1/experiments", "/api/v1/datasets", "/openapi.json"]


def _app(tmp_path, database_url, **overrides):
    return create_app(make_settings(tmp_path, database_url, **overrides))


def _operations(schema: dict):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def test_open_reads_need_no_token_and_the_schema_declares_none(tmp_path, database_url):
    with TestClient(_app(tmp_path, database_url)) as client:
        for path in READS:
            assert client.get(path).status_code == 200, path
        assert client.get("/metrics").status_code == 200
        schema = client.get("/openapi.json").json()
    declared = {(path, method) for path, method, op in _operations(schema) if op.get("security")}
    for path, method, operation in _operations(schema):
        if method == "get":
            assert (path, method) not in declared, path
            assert "401" not in operation["responses"] and "403" not in operation["responses"], path
        else:  # every write needs a token, and says what happens without one
            assert operation["security"] == [{"HTTPBearer": []}], (path, method)
            assert {"401", "403"} <= set(operation["responses"]), (path, method)
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer"}  # no stray scheme names


def test_with_read_requires_token_every_read_and_the_schema_itself_need_one(tmp_path, database_url):
    app = _app(tmp_path, database_url, read_requires_token=True, docs_enabled=True)
    with TestClient(app) as client:
        for path in [*READS, "/docs", "/redoc"]:
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 403, path
            assert client.get(path, headers=AUTH).status_code == 200, path
        assert client.get("/metrics").status_code == 200  # a separate setting
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code in (200, 503)
        schema = client.get("/openapi.json", headers=AUTH).json()
    for path, method, operation in _operations(schema):
        if path in ("/healthz", "/readyz", "/metrics"):
            assert "security" not in operation, path
        else:
            assert operation["security"] == [{"HTTPBearer": []}], (path, method)
            assert {"401", "403"} <= set(operation["responses"]), (path, method)


def test_metrics_can_require_a_token(tmp_path, database_url):
    with TestClient(_app(tmp_path, database_url, metrics_requires_token=True)) as client:
        assert client.get("/metrics").status_code == 401
        resp = client.get("/metrics", headers=AUTH)
        assert resp.status_code == 200 and "gradalign" in resp.text
        assert client.get("/api/v1/experiments").status_code == 200  # reads stay open
        metrics = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]
        assert metrics["security"] == [{"HTTPBearer": []}] and "401" in metrics["responses"]


@pytest.mark.parametrize("enabled", [False, True])
def test_swagger_and_redoc_only_when_enabled(tmp_path, database_url, enabled):
    with TestClient(_app(tmp_path, database_url, docs_enabled=enabled)) as client:
        for path in ("/docs", "/redoc"):
            resp = client.get(path)
            assert resp.status_code == (200 if enabled else 404), path
            if enabled:
                assert "/openapi.json" in resp.text


def test_the_upload_declares_its_request_body(tmp_path, database_url):
    with TestClient(_app(tmp_path, database_url)) as client:
        upload = client.get("/openapi.json").json()["paths"]["/api/v1/datasets/upload"]["post"]
    body = upload["requestBody"]
    assert body["required"] is True
    assert set(body["content"]) == {"application/x-ndjson", "application/octet-stream"}
    assert {"201", "400", "409", "413", "422", "401", "403"} <= set(upload["responses"])


def test_a_body_that_cannot_be_decoded_is_a_documented_400(tmp_path, database_url):
    with TestClient(_app(tmp_path, database_url), headers=AUTH) as client:
        resp = client.post("/api/v1/datasets/register", content=b"\xa3\x1a\xe9H\xb2\xc0", headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        schema = client.get("/openapi.json").json()
    for path, method, operation in _operations(schema):
        if "requestBody" in operation:
            assert "400" in operation["responses"], (path, method)


def test_without_auth_nothing_declares_a_token(tmp_path, database_url):
    with TestClient(_app(tmp_path, database_url, auth_enabled=False)) as client:
        schema = client.get("/openapi.json").json()
    assert not any(op.get("security") for _, _, op in _operations(schema))
    assert "securitySchemes" not in schema.get("components", {})
