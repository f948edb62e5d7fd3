"""Hostile and careless dataset input (issue 16): decompression bombs, row/size/field bounds, invalid
UTF-8, deep nesting, NUL and lone surrogates, ground truths the reward cannot handle, concurrent
uploads under one name, and error messages that must not reveal server paths."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from gradalign_common.datasets import DatasetTooLarge, import_dataset
from gradalign_common.errors import InvalidInputError
from gradalign_common.records import Problem, read_problems, write_problems
from scheduler_fixtures import AUTH, make_settings
from services.scheduler.app import create_app
from services.scheduler.db import Dataset

UPLOAD = "/api/v1/datasets/upload"


def _records(n: int, source: str = "arith", offset: int = 0) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"{i}+1="}], "data_source": source,
         "reward_model": {"ground_truth": str(i + 1)}, "extra_info": {"index": offset + i}}
        for i in range(n)
    ]


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _parquet(table: pa.Table, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def _upload(client, name, body: bytes, fmt="jsonl"):
    return client.post(UPLOAD, params={"name": name, "format": fmt}, content=body)


def _msg(resp) -> str:
    detail = resp.json()["detail"]
    return detail if isinstance(detail, str) else detail[0]["msg"]


def _field(resp) -> str:
    return resp.json()["detail"][0]["loc"][-1]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def make_client(tmp_path, database_url):
    clients = []

    def make(**overrides):
        app = create_app(make_settings(tmp_path, database_url, **overrides))
        c = TestClient(app, headers=AUTH)
        c.__enter__()
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client(max_dataset_rows=1000, max_dataset_bytes=32 << 20, max_field_chars=100_000)


def _names(client) -> list[str]:
    return [d["name"] for d in client.get("/api/v1/datasets").json()]


# --- 1. bounds: decoded size, rows, field length --------------------------------------------


def _bomb(rows: int = 200, chars: int = 1_000_000) -> bytes:
    """`rows` rows sharing one `chars`-long prompt: dictionary-encoded and compressed, a few KB on the wire."""
    prompt = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["7" * chars]))
    table = pa.table({
        "prompt": prompt,
        "data_source": pa.array(["exact_match"] * rows),
        "reward_model": pa.array([{"ground_truth": "7"}] * rows),
        "extra_info": pa.array([{"index": i} for i in range(rows)]),
    })
    # store_schema=False: a reader decodes the column to plain strings (200 MB), as any foreign file would
    return _parquet(table, compression="zstd", store_schema=False)


def test_parquet_bomb_is_refused_without_the_memory(make_client, tmp_path):
    client = make_client(max_dataset_bytes=32 << 20)  # each 1 MB field is within the default max_field_chars
    bomb = _bomb()
    assert len(bomb) < 64 << 10  # the upload limit alone cannot catch it
    before = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        resp = _upload(client, "bomb", bomb, "parquet")
    finally:
        done.set()
        sampler.join()
    after = _rss_bytes()
    assert resp.status_code == 413, resp.text
    assert "max_dataset_bytes" in _msg(resp)
    assert peak - before < 200 << 20, f"RSS grew by {(peak - before) >> 20} MB while refusing the bomb"
    assert after - before < 100 << 20, f"RSS kept {(after - before) >> 20} MB after refusing the bomb"
    # the same file registered from the data root is refused too; nothing is stored
    (tmp_path / "bomb.parquet").write_bytes(bomb)
    resp = client.post("/api/v1/datasets/register", json={"name": "bomb", "path": str(tmp_path / "bomb.parquet")})
    assert resp.status_code == 413, resp.text
    assert _names(client) == []


def test_row_limit(make_client, tmp_path):
    client = make_client(max_dataset_rows=10)
    assert _upload(client, "ten", _jsonl(_records(10))).status_code == 201
    resp = _upload(client, "eleven", _jsonl(_records(11)))
    assert resp.status_code == 413 and "max_dataset_rows=10" in _msg(resp)
    resp = _upload(client, "pq", _parquet(pa.Table.from_pylist(_records(11))), "parquet")
    assert resp.status_code == 413 and "max_dataset_rows=10" in _msg(resp)
    # a mix may not exceed it either
    assert _upload(client, "ten2", _jsonl(_records(10, offset=100))).status_code == 201
    resp = client.post("/api/v1/datasets/mix", json={"name": "m", "sources": [{"dataset": "ten", "count": 6}, {"dataset": "ten2", "count": 5}]})
    assert resp.status_code == 413, resp.text
    assert _names(client) == ["ten", "ten2"]


def test_byte_limit_for_jsonl(make_client):
    client = make_client(max_dataset_bytes=50_000)
    resp = _upload(client, "big", _jsonl(_records(2000)))
    assert resp.status_code == 413 and "max_dataset_bytes=50000" in _msg(resp)
    assert _names(client) == []


def test_field_too_long(make_client):
    client = make_client(max_field_chars=100)
    records = _records(3)
    records[1]["prompt"][0]["content"] = "1" * 101
    resp = _upload(client, "long", _jsonl(records))
    assert resp.status_code == 422 and _field(resp) == "body"
    assert "upload:2" in _msg(resp) and "prompt[0].content" in _msg(resp) and "max_field_chars=100" in _msg(resp)
    resp = _upload(client, "longpq", _parquet(pa.Table.from_pylist(records)), "parquet")
    assert resp.status_code == 422 and "upload row 1" in _msg(resp) and "prompt[0].content" in _msg(resp)
    records[1]["prompt"][0]["content"] = "1" * 100
    assert _upload(client, "ok", _jsonl(records)).status_code == 201


# --- 2. undecodable, deeply nested and unstorable text ----------------------------------------


def test_invalid_utf8_and_deep_nesting_are_422_naming_the_line(client):
    good = _jsonl(_records(2))
    resp = _upload(client, "utf8", good + b'{"prompt": "\xff\xfe", "data_source": "arith"}\n')
    assert resp.status_code == 422, resp.text
    assert "upload:3" in _msg(resp) and "UTF-8" in _msg(resp)
    for deep in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        resp = _upload(client, "deep", good + deep + b"\n")
        assert resp.status_code == 422, resp.text
        assert "upload:3" in _msg(resp) and "nested" in _msg(resp)
    # nested within the parser's reach but still absurd
    nested: list = [1]
    for _ in range(60):
        nested = [nested]
    resp = _upload(client, "deep", good + json.dumps({**_records(1)[0], "extra": nested}).encode() + b"\n")
    assert resp.status_code == 422 and "upload:3" in _msg(resp) and "nested" in _msg(resp)
    assert _names(client) == []


@pytest.mark.parametrize("bad", ["1+\x001=", "1+\ud8001="], ids=["nul", "lone-surrogate"])
def test_nul_and_lone_surrogates_are_422(client, bad):
    records = _records(3)
    records[2]["prompt"][0]["content"] = bad
    resp = _upload(client, "x", "".join(json.dumps(r) + "\n" for r in records).encode())  # json escapes both
    assert resp.status_code == 422, resp.text
    assert "upload:3" in _msg(resp) and "prompt[0].content" in _msg(resp)
    records = _records(3)
    records[1]["extra_info"]["index"] = "a" + bad
    resp = _upload(client, "y", "".join(json.dumps(r) + "\n" for r in records).encode())
    assert resp.status_code == 422 and "upload:2" in _msg(resp) and "extra_info.index" in _msg(resp)
    if "\x00" in bad:  # a parquet string can hold a NUL (never a lone surrogate)
        records = _records(3)
        records[2]["reward_model"]["ground_truth"] = "3\x00"
        resp = _upload(client, "z", _parquet(pa.Table.from_pylist(records)), "parquet")
        assert resp.status_code == 422 and "upload row 2" in _msg(resp) and "reward_model.ground_truth" in _msg(resp)
    assert _names(client) == []


# --- 3. ground truths the reward cannot handle ------------------------------------------------


@pytest.mark.parametrize(
    "source,truth", [("arith", "1.5"), ("arith", "seven"), ("arith", ""), ("arith", "9" * 5000), ("yesno", "maybe"), ("exact_match", "  ")]
)
def test_ground_truth_the_reward_cannot_handle(client, source, truth):
    records = _records(4, source)
    if source == "yesno":
        for r in records:
            r["reward_model"]["ground_truth"] = "yes"
    records[2]["reward_model"]["ground_truth"] = truth
    resp = _upload(client, "gt", _jsonl(records))
    assert resp.status_code == 422, resp.text
    assert "upload:3" in _msg(resp) and "reward_model.ground_truth" in _msg(resp)


def test_ground_truths_each_reward_can_handle(client):
    records = _records(2, "arith") + [
        {"prompt": "q", "data_source": "yesno", "reward_model": {"ground_truth": "Yes."}, "extra_info": {"index": 10}},
        {"prompt": "q", "data_source": "math", "reward_model": {"ground_truth": "\\frac{1}{2}"}, "extra_info": {"index": 11}},
        {"prompt": "q", "data_source": "mmlupro", "reward_model": {"ground_truth": "C"}, "extra_info": {"index": 12}},
        {"prompt": "q", "data_source": "arith", "reward_model": {"ground_truth": -4}, "extra_info": {"index": 13}},
    ]
    resp = _upload(client, "fine", _jsonl(records))
    assert resp.status_code == 201, resp.text


def test_registered_normalised_parquet_is_checked_too(client, tmp_path):
    path = write_problems(tmp_path / "norm.parquet", [Problem("0", '[{"role":"user","content":"1+1="}]', "arith", "2"),
                                                       Problem("1", '[{"role":"user","content":"1+2="}]', "arith", "three")])
    resp = client.post("/api/v1/datasets/register", json={"name": "norm", "path": str(path)})
    assert resp.status_code == 422 and _field(resp) == "path"
    assert "norm.parquet row 1" in _msg(resp) and "ground_truth" in _msg(resp)
    # and a mix reads its sources through the same checks (a stored dataset edited behind our back)
    assert _upload(client, "src", _jsonl(_records(3))).status_code == 201
    stored = Path(client.app.state.datasets.get("src").path)
    write_problems(stored, [Problem("0", '[{"role":"user","content":"1+1="}]', "arith", "x")])
    resp = client.post("/api/v1/datasets/mix", json={"name": "m", "sources": [{"dataset": "src", "count": 0}]})
    assert resp.status_code == 422 and _field(resp) == "sources" and "src row 0" in _msg(resp)


def test_import_dataset_checks_directly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_jsonl(_records(1)) + b"\xc3\x28\n")
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:2: not valid UTF-8"):
        import_dataset([(bad, None)], "x", tmp_path / "out")
    bad.write_bytes(_jsonl(_records(5)))
    with pytest.raises(DatasetTooLarge, match="max_dataset_rows=4"):
        import_dataset([(bad, None)], "x", tmp_path / "out", max_rows=4)
    assert import_dataset([(bad, None)], "x", tmp_path / "out", max_rows=5)["n_problems"] == 5


# --- 4. concurrent uploads under one name ---------------------------------------------------


def test_concurrent_uploads_with_one_name(client, database_url):
    for attempt in range(3):
        name = f"race{attempt}"
        bodies = [_jsonl(_records(n, offset=1000 * k)) for k, n in enumerate((300, 20, 1, 150, 60, 7))]
        barrier = threading.Barrier(len(bodies))
        codes: list[int] = [0] * len(bodies)

        def go(k):
            barrier.wait()
            codes[k] = _upload(client, name, bodies[k]).status_code

        threads = [threading.Thread(target=go, args=(k,)) for k in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [201] + [409] * (len(bodies) - 1), codes
        winner = codes.index(201)
        got = client.get(f"/api/v1/datasets/{name}").json()
        assert got["n_rows"] == len(bodies[winner].splitlines())
        engine = create_engine(database_url)
        try:
            with engine.connect() as conn:
                path = conn.execute(select(Dataset.path).where(Dataset.name == name)).scalar_one()
        finally:
            engine.dispose()
        on_disk = read_problems(path)
        assert len(on_disk) == got["n_rows"]  # the row and the file agree
    registered = client.app.state.datasets.out_dir
    assert len(list(registered.glob("*.parquet"))) == 3  # the losers left no files behind
    assert not [p for p in registered.parent.rglob("*") if p.is_file() and (".upload-" in p.name or ".tmp-" in p.name)]


# --- 5. error messages name no server path -----------------------------------------------------


def test_errors_name_no_server_path(client, tmp_path):
    roots = [str(tmp_path), str(tmp_path.resolve()), str(client.app.state.datasets.settings.artifact_root)]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.jsonl").write_bytes(b'{"prompt": "1+1="}\n')
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_bytes(_jsonl(_records(1)))
    try:
        cases = [
            client.post("/api/v1/datasets/register", json={"name": "a", "path": str(tmp_path / "sub" / "bad.jsonl")}),
            client.post("/api/v1/datasets/register", json={"name": "b", "path": str(tmp_path / "sub" / "missing.jsonl")}),
            client.post("/api/v1/datasets/register", json={"name": "c", "path": str(tmp_path / "sub")}),
            client.post("/api/v1/datasets/register", json={"name": "d", "path": str(outside)}),
            _upload(client, "e", b'{"prompt": "1+1="}\n'),
            _upload(client, "f", b"not parquet", "parquet"),
        ]
    finally:
        outside.unlink()
    for resp in cases:
        assert resp.status_code == 422, resp.text
        assert not any(root in resp.text for root in roots), resp.text
        assert "/tmp" not in resp.text and str(Path.home()) not in resp.text, resp.text
    assert "sub/bad.jsonl:1: missing field 'data_source'" in _msg(cases[0])
    assert "sub/missing.jsonl" in _msg(cases[1])
    assert "outside the allowed data root" in _msg(cases[3])
    assert "upload: not a readable parquet file" in _msg(cases[5])
    # a registered dataset's origin names its file relative to the data root
    (tmp_path / "sub" / "ok.jsonl").write_bytes(_jsonl(_records(2)))
    resp = client.post("/api/v1/datasets/register", json={"name": "ok", "path": str(tmp_path / "sub" / "ok.jsonl")})
    assert resp.status_code == 201 and resp.json()["origin"]["path"] == "sub/ok.jsonl"
