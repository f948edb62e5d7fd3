"""An experiment's model must lie under the scheduler's models root (or be a checkpoint in the artifact store),
and whatever is wrong with it, the answer tells nothing of the server's files: one message, the same for a
system file, a private directory, a path that does not exist and a directory that is not a model. On SQLite
and PostgreSQL."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from scheduler_fixtures import AUTH, experiment_body, make_settings
from services.scheduler.app import create_app
from services.scheduler.model_paths import UNUSABLE_MODEL


@pytest.fixture
def layout(tmp_path, tiny_model_dir):
    """models/ (the root, holding a copy of the tiny model and a broken one) beside private/ (outside it)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    (models / "no-weights").mkdir()
    shutil.copy(tiny_model_dir / "config.json", models / "no-weights" / "config.json")
    private = tmp_path / "private"
    shutil.copytree(tiny_model_dir, private / "secret-model")  # a usable model, but outside the root
    (private / ".ssh").mkdir()
    (private / ".ssh" / "id_ed25519").write_text("not a key")
    (models / "escape").symlink_to(private / "secret-model")
    return tmp_path, models, private


@pytest.fixture
def client(layout, database_url):
    tmp_path, models, _ = layout
    app = create_app(make_settings(tmp_path, database_url, models_root=models))
    with TestClient(app, headers=AUTH) as c:
        yield c


def _refusal(client, model: str) -> str:
    resp = client.post("/api/v1/experiments", json=experiment_body("x", model=model))
    assert resp.status_code == 422, resp.text
    (detail,) = resp.json()["detail"]
    assert detail["loc"] == ["body", "model"]
    return detail["msg"]


def test_models_outside_the_root_or_unusable_get_one_message_that_names_no_path(client, layout):
    tmp_path, models, private = layout
    for model in (
        "/etc/passwd",  # a system file
        str(private / ".ssh"),  # a private directory
        str(private / "secret-model"),  # a usable model outside the root
        str(models / ".." / "private" / "secret-model"),  # '..' out of the root
        str(models / "escape"),  # a symlink in the root pointing out of it
        "escape",  # the same, named relative to the root
        str(models / "missing"),  # does not exist
        str(models / "no-weights"),  # a directory under the root that is not a usable model
        "../private/secret-model",
    ):
        assert _refusal(client, model) == UNUSABLE_MODEL, model
    assert client.get("/api/v1/experiments").json()["total"] == 0


def test_a_model_under_the_root_is_accepted_by_absolute_or_relative_name(client, layout):
    _, models, _ = layout
    for model in (str(models / "tiny"), "tiny"):
        resp = client.post("/api/v1/experiments", json=experiment_body("x", model=model))
        assert resp.status_code == 201, resp.text
        assert resp.json()["config"]["model"] == str((models / "tiny").resolve())


def test_a_checkpoint_in_the_artifact_store_is_accepted(client, layout, tiny_model_dir):
    tmp_path, _, _ = layout
    checkpoint = tmp_path / "artifacts" / "experiments" / "some-uid" / "checkpoints" / "round-0"
    shutil.copytree(tiny_model_dir, checkpoint)
    resp = client.post("/api/v1/experiments", json=experiment_body("x", model=str(checkpoint)))
    assert resp.status_code == 201, resp.text


def test_dataset_errors_name_files_relative_to_the_data_root(client, layout):
    tmp_path, _, _ = layout
    (tmp_path / "broken.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\nnot json\n')
    resp = client.post("/api/v1/experiments", json=experiment_body(tmp_path / "models" / "tiny", train_dataset=str(tmp_path / "broken.jsonl")))
    assert resp.status_code == 422, resp.text
    assert str(tmp_path) not in resp.text and "broken.jsonl" in resp.text
