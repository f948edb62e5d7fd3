"""Identities never repeat: create, delete, create again on the real 4-service stack (SQLite and PostgreSQL).

On SQLite a deleted experiment's id is handed to the next one. Before experiments had a uid, the
request ids ("{id}/{round}/{stage}") and artifact directories of the new experiment were the old
one's, and the trainer answered the new experiment's request with the deleted one's checkpoint.
Now every request id and artifact path is keyed by the experiment's uid, and a delete removes the
experiment's artifacts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from scheduler_fixtures import experiment_body, wait_for_experiment
from gradalign_tools.stack import LocalStack, StackConfig, free_port

pytestmark = pytest.mark.slow


def _weights_digest(checkpoint: str) -> str:
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    assert files, f"no weights in {checkpoint}"
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def test_create_delete_create_trains_a_new_model(tmp_path, tiny_model_dir, database_url):
    config = StackConfig(
        home=tmp_path / "home", api_port=free_port(), rollout_port=free_port(), scoring_port=free_port(),
        trainer_port=free_port(), torch_threads=1, database_url=database_url,
    )
    body = experiment_body(tiny_model_dir, num_selections=1, iters_per_select=1)
    with LocalStack(config) as stack:
        stack.start()
        client = httpx.Client(base_url=config.api_url, timeout=30, headers=config.auth_headers)
        first = wait_for_experiment(client, client.post("/api/v1/experiments", json={**body, "learning_rate": 1e-3}).json()["id"])
        assert first["status"] == "completed", first
        first_weights = _weights_digest(first["checkpoint"])
        first_dir = Path(first["checkpoint"]).parents[1]
        assert first_dir.name == first["uid"] and first_dir.is_dir()

        assert client.delete(f"/api/v1/experiments/{first['id']}").status_code == 204
        assert not first_dir.exists()  # the delete took the artifacts with it

        second = wait_for_experiment(
            client, client.post("/api/v1/experiments", json={**body, "learning_rate": 3e-4, "seed": 1}).json()["id"]
        )
    assert second["status"] == "completed", second
    if database_url.startswith("sqlite"):
        assert second["id"] == first["id"]  # the id was reused: the case that used to inherit the old results
    assert second["uid"] != first["uid"]
    assert second["checkpoint"] != first["checkpoint"]
    assert _weights_digest(second["checkpoint"]) != first_weights
