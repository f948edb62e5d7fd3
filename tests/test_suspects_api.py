"""GET /api/v1/experiments/{id}/suspects and its export, on SQLite and PostgreSQL: flags from the stored candidates,
their evidence, sorting and filters, the settings' defaults, modes without flags, 422 naming the field, and
exported records that load back as the same problems."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from gradalign_common.datasets import load_problems
from scheduler_fixtures import AUTH, experiment_body, make_settings
from services.scheduler.app import create_app

# round -> [(problem id, score, accuracy, zero advantage)]; mode sim, so the score is the cosine
ROUNDS = {
    0: [("p0", -0.3, 0.25, False), ("p1", -0.1, 0.5, False), ("p2", 0.4, 0.5, False), ("p3", 0.0, 1.0, True), ("12", -0.4, 0.375, False)],
    1: [("p0", -0.2, 0.125, False), ("p1", 0.2, 0.5, False), ("p4", -0.05, 0.75, False)],
    2: [("p1", -0.9, 0.5, False)],  # fell back to random scores: left out
    3: [("p2", -0.5, 0.5, False)],  # its score stage is still running: left out
}


def _dataset(tmp_path) -> str:
    """20 problems: p0..p9 carry extra_info.index, the other ten are known by their position (10..19)."""
    lines = []
    for i in range(20):
        record = {"prompt": [{"role": "user", "content": f"{i}+1="}], "data_source": "arith", "reward_model": {"ground_truth": str(i + 1)}}
        if i < 10:
            record["extra_info"] = {"index": f"p{i}", "split": "train"}
        lines.append(json.dumps(record))
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _client(tmp_path, database_url, **settings):
    return TestClient(create_app(make_settings(tmp_path, database_url, **settings)), headers=AUTH)


def _seed(client, tmp_path, model_dir, mode: str = "sim") -> int:
    from services.scheduler.db import Candidate, Round, Stage

    exp = client.post("/api/v1/experiments", json=experiment_body(model_dir, mode=mode, train_dataset=_dataset(tmp_path)))
    assert exp.status_code == 201, exp.text
    exp_id = exp.json()["id"]
    with client.app.state.sessions() as s:
        for index, cands in ROUNDS.items():
            rnd = Round(experiment_id=exp_id, index=index, status="running" if index == 3 else "completed", checkpoint_in="-")
            status, result = ("running", None) if index == 3 else ("succeeded", {"paths": [], "n_scored": len(cands), "mode": mode})
            if index == 2:
                result = {**result, "mode": "rand", "fallback": "the validation gradient is zero"}
            rnd.stages = [Stage(name="score", status=status, result=result)]
            s.add(rnd)
            s.flush()
            for pid, score, acc, zero in cands:
                s.add(Candidate(round_id=rnd.id, problem_id=pid, n_responses=8, accuracy=acc, mean_reward=acc,
                                mean_response_length=3.0, score=score, zero_advantage=zero))
        s.commit()
    return exp_id


@pytest.fixture
def client(tmp_path, database_url):
    with _client(tmp_path, database_url) as c:
        yield c


def _ids(body) -> list[str]:
    return [item["problem_id"] for item in body["items"]]


def test_suspects_with_their_evidence(client, tmp_path, tiny_model_dir):
    exp_id = _seed(client, tmp_path, tiny_model_dir)
    resp = client.get(f"/api/v1/experiments/{exp_id}/suspects", params={"rule": "cosine", "threshold": 0.0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["available"], body["reason"], body["mode"]) == (True, None, "sim")
    assert (body["rule"], body["threshold"], body["min_rounds"]) == ("cosine", 0.0, 2)
    assert body["rounds_used"] == [0, 1] and body["rounds_skipped"] == [2]
    assert body["counts"] == {"suspect": 1, "watch": 3} and body["total"] == 4
    assert _ids(body) == ["p0", "12", "p1", "p4"]  # most flagged first, ties by id
    p0 = body["items"][0]
    assert (p0["status"], p0["rounds_flagged"], p0["rounds_seen"], p0["worst_alignment"]) == ("suspect", [0, 1], 2, -0.3)
    assert p0["mean_accuracy"] == pytest.approx(0.1875)
    assert [(e["round"], e["flagged"], e["score"], e["alignment"], e["accuracy"]) for e in p0["evidence"]] == [
        (0, True, -0.3, -0.3, 0.25), (1, True, -0.2, -0.2, 0.125)]
    p1 = body["items"][2]
    assert p1["status"] == "watch" and p1["rounds_flagged"] == [0] and [e["flagged"] for e in p1["evidence"]] == [True, False]
    # the evidence links to the problem's responses through the problem route
    path = p0["evidence"][1]["problem_path"]
    assert path == f"/api/v1/experiments/{exp_id}/rounds/1/problems/p0"
    problem = client.get(path)
    assert problem.status_code == 200 and problem.json()["problem_id"] == "p0" and problem.json()["ground_truth"] == "1"


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"sort": "alignment"}, ["12", "p0", "p1", "p4"]),
        ({"sort": "alignment", "order": "desc"}, ["p4", "p1", "p0", "12"]),
        ({"sort": "accuracy"}, ["p0", "12", "p1", "p4"]),
        ({"sort": "last_round"}, ["p0", "p4", "12", "p1"]),
        ({"sort": "problem_id", "order": "desc"}, ["p4", "p1", "p0", "12"]),
        ({"status": "suspect"}, ["p0"]),
        ({"status": "watch", "offset": 1, "limit": 1}, ["p1"]),
        ({"min_rounds": 1}, ["p0", "12", "p1", "p4"]),
        ({"threshold": -0.25}, ["12", "p0"]),
    ],
)
def test_sorting_filters_and_paging(client, tmp_path, tiny_model_dir, params, expected):
    exp_id = _seed(client, tmp_path, tiny_model_dir)
    body = client.get(f"/api/v1/experiments/{exp_id}/suspects", params={"rule": "cosine", **params}).json()
    assert _ids(body) == expected
    if "min_rounds" in params:
        assert body["counts"] == {"suspect": 4, "watch": 0}
    if params.get("status") == "watch":
        assert body["total"] == 3 and body["counts"] == {"suspect": 1, "watch": 3}


def test_the_settings_give_the_defaults(tmp_path, database_url, tiny_model_dir):
    with _client(tmp_path, database_url, suspect_rule="cosine", suspect_threshold=-0.25, suspect_min_rounds=1) as client:
        exp_id = _seed(client, tmp_path, tiny_model_dir)
        body = client.get(f"/api/v1/experiments/{exp_id}/suspects").json()
        assert (body["rule"], body["threshold"], body["min_rounds"]) == ("cosine", -0.25, 1)
        assert _ids(body) == ["12", "p0"] and body["counts"] == {"suspect": 2, "watch": 0}
        # another rule named in the request takes that rule's own default threshold, not the setting's
        body = client.get(f"/api/v1/experiments/{exp_id}/suspects", params={"rule": "pass_rate"}).json()
        assert (body["rule"], body["threshold"]) == ("pass_rate", 0.0) and body["total"] == 0


def test_the_default_rule_is_robust_z(client, tmp_path, tiny_model_dir):
    exp_id = _seed(client, tmp_path, tiny_model_dir)
    body = client.get(f"/api/v1/experiments/{exp_id}/suspects").json()
    assert (body["rule"], body["threshold"], body["min_rounds"]) == ("robust_z", 0.0, 2)
    # round 0's non-zero-advantage alignments -0.3, -0.1, 0.4, -0.4: median -0.2; round 1's -0.2, 0.2, -0.05: median -0.05
    assert _ids(body) == ["p0", "12"] and [e["z"] is not None for e in body["items"][0]["evidence"]] == [True, True]


def test_modes_without_flags_say_why(client, tmp_path, tiny_model_dir):
    rand = _seed(client, tmp_path, tiny_model_dir, mode="rand")
    body = client.get(f"/api/v1/experiments/{rand}/suspects").json()
    assert body["available"] is False and "external validation set" in body["reason"] and body["items"] == [] and body["total"] == 0
    resp = client.get(f"/api/v1/experiments/{rand}/suspects.jsonl")
    assert resp.status_code == 409 and "external validation set" in resp.json()["detail"]
    # the pass-rate heuristic needs no gradient
    assert client.get(f"/api/v1/experiments/{rand}/suspects", params={"rule": "pass_rate", "threshold": 0.25}).json()["available"]
    dot = _seed(client, tmp_path, tiny_model_dir, mode="dot")
    body = client.get(f"/api/v1/experiments/{dot}/suspects", params={"rule": "cosine"}).json()
    assert body["available"] is False and "robust_z" in body["reason"]
    assert client.get(f"/api/v1/experiments/{dot}/suspects").json()["available"] is True


@pytest.mark.parametrize(
    "path, params, field",
    [
        ("suspects", {"rule": "loudest"}, "rule"),
        ("suspects", {"rule": "cosine", "threshold": 5}, "threshold"),
        ("suspects", {"rule": "robust_z", "threshold": -1}, "threshold"),
        ("suspects", {"threshold": "nan"}, "threshold"),
        ("suspects", {"min_rounds": 0}, "min_rounds"),
        ("suspects", {"status": "guilty"}, "status"),
        ("suspects", {"sort": "loudness"}, "sort"),
        ("suspects", {"order": "up"}, "order"),
        ("suspects", {"limit": 0}, "limit"),
        ("suspects.csv", {}, "fmt"),
        ("suspects.parquet", {"threshold": 2, "rule": "pass_rate"}, "threshold"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(client, tmp_path, tiny_model_dir, path, params, field):
    exp_id = _seed(client, tmp_path, tiny_model_dir)
    resp = client.get(f"/api/v1/experiments/{exp_id}/{path}", params=params)
    assert resp.status_code == 422, resp.text
    assert [d["loc"][-1] for d in resp.json()["detail"]] == [field]
    assert resp.json()["detail"][0]["loc"][0] in ("query", "path")


def test_unknown_experiment_is_404(client):
    assert client.get("/api/v1/experiments/999/suspects").status_code == 404
    assert client.get("/api/v1/experiments/999/suspects.jsonl").status_code == 404


def test_the_export_loads_back_as_the_same_problems(client, tmp_path, tiny_model_dir):
    exp_id = _seed(client, tmp_path, tiny_model_dir)
    original = {p.problem_id: p for p in load_problems(_dataset(tmp_path))}
    for fmt in ("jsonl", "parquet"):
        resp = client.get(f"/api/v1/experiments/{exp_id}/suspects.{fmt}", params={"rule": "cosine"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-disposition"] == f'attachment; filename="experiment-{exp_id}-suspects.{fmt}"'
        out = tmp_path / f"exported.{fmt}"
        out.write_bytes(resp.content)
        loaded = load_problems(out)
        assert [p.problem_id for p in loaded] == ["p0", "p1", "p4", "12"]  # file order; "12" was known by its position
        assert all(p == original[p.problem_id] for p in loaded)
    records = [json.loads(line) for line in (tmp_path / "exported.jsonl").read_text().splitlines()]
    assert records[0] == json.loads(open(_dataset(tmp_path)).readline())  # the record as it was in the file
    # its id made explicit (its position changed), typed as the file's own indexes are
    assert records[-1]["extra_info"] == {"index": "12"}
    only = client.get(f"/api/v1/experiments/{exp_id}/suspects.parquet", params={"rule": "cosine", "status": "suspect"})
    assert pq.read_table(io.BytesIO(only.content)).num_rows == 1


def test_the_export_says_when_the_dataset_file_is_gone(client, tmp_path, tiny_model_dir):
    exp_id = _seed(client, tmp_path, tiny_model_dir)
    (tmp_path / "pool.jsonl").unlink()
    assert client.get(f"/api/v1/experiments/{exp_id}/suspects").json()["total"] > 0  # the list needs only the database
    resp = client.get(f"/api/v1/experiments/{exp_id}/suspects.jsonl")
    assert resp.status_code == 409 and "no longer there" in resp.json()["detail"] and str(tmp_path) not in resp.text
