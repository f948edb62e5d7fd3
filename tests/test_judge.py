"""The model judge against a local fake OpenAI-compatible server: right, wrong, timeout, HTTP 500,
unreachable, 4xx; bounded concurrency; and a judge failure failing a rollout request over gRPC."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from gradalign_common.grpc_utils import channel
from gradalign_common.judge import JudgeConfig, JudgeError, JudgeUnavailableError, ModelJudge, parse_verdict
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
from gradalign_common.records import Problem, write_problems
from gradalign_common.rewards import RewardItem


class FakeOpenAI:
    """POST /v1/chat/completions: replies YES when the response line equals the reference line.
    mode: "ok" | "slow" (sleeps past the client's timeout) | "500" | "400" | "garbage" | "flaky" (500 once)."""

    def __init__(self):
        self.mode = "ok"
        self.requests = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    n = len(fake.requests)
                try:
                    if fake.delay:
                        time.sleep(fake.delay)
                    if fake.mode == "slow":
                        time.sleep(1.0)
                    if fake.mode == "500" or (fake.mode == "flaky" and n == 1):
                        return self._send(500, b'{"error": "boom"}')
                    if fake.mode == "400":
                        return self._send(400, b'{"error": "bad model"}')
                    if fake.mode == "garbage":
                        return self._send(200, b"not json")
                    user = body["messages"][-1]["content"]
                    reference = user.split("Reference answer:\n")[1].split("\n")[0]
                    response = user.split("Response:\n")[1].split("\n")[0]
                    verdict = "YES" if response.strip() == reference.strip() else "NO"
                    reply = {"choices": [{"message": {"role": "assistant", "content": f"<think>hmm</think>{verdict}"}}]}
                    self._send(200, json.dumps(reply).encode())
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


def _judge(url, **kw) -> ModelJudge:
    config = dict(base_url=url, model="judge-model", api_key="sk-test", timeout_s=0.3, retries=1, backoff_s=0.01, concurrency=4)
    config.update(kw)
    return ModelJudge(JudgeConfig(**config))


ITEMS = [
    RewardItem("judge", "Paris", "Paris", prompt="What is the capital of France?"),
    RewardItem("judge", "Lyon", "Paris", prompt="What is the capital of France?"),
]


def test_right_and_wrong(fake):
    judge = _judge(fake.url)
    assert judge.score(ITEMS) == [1.0, 0.0]
    req = fake.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.0
    assert "capital of France" in req["body"]["messages"][-1]["content"]
    judge.close()


def test_timeout_raises_after_retries(fake):
    fake.mode = "slow"
    judge = _judge(fake.url)
    start = time.monotonic()
    with pytest.raises(JudgeUnavailableError, match="timed out after 0.3s"):
        judge.score(ITEMS[:1])
    assert judge.requests == 2  # first attempt + one retry
    assert time.monotonic() - start < 5


def test_http_500_raises_after_retries_and_a_flaky_500_is_retried(fake):
    fake.mode = "500"
    judge = _judge(fake.url, retries=2)
    with pytest.raises(JudgeUnavailableError, match="after 3 attempt.*HTTP 500"):
        judge.score(ITEMS)
    fake.mode, fake.requests = "flaky", []
    assert _judge(fake.url).score(ITEMS[:1]) == [1.0]
    assert len(fake.requests) == 2


def test_unreachable_and_client_errors_raise(fake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(JudgeUnavailableError, match="unavailable after 2 attempt"):
        _judge(f"http://127.0.0.1:{port}").score(ITEMS)
    fake.mode = "400"
    with pytest.raises(JudgeError, match="HTTP 400"):
        _judge(fake.url).score(ITEMS[:1])
    fake.mode = "garbage"
    with pytest.raises(JudgeError, match="malformed"):
        _judge(fake.url).score(ITEMS[:1])


def test_bounded_concurrency(fake):
    fake.delay = 0.05
    items = [RewardItem("judge", str(i % 3), "1") for i in range(12)]
    judge = _judge(fake.url, concurrency=3, timeout_s=5)
    assert judge.score(items) == [1.0 if i % 3 == 1 else 0.0 for i in range(12)]
    assert 1 < fake.max_in_flight <= 3


def test_verdict_parsing_and_url():
    assert parse_verdict("YES") is True
    assert parse_verdict("<think>yes? no...</think> No.") is False
    assert parse_verdict("I cannot tell") is None
    assert JudgeConfig(base_url="http://h:8000/v1/", model="m").url == "http://h:8000/v1/chat/completions"
    assert JudgeConfig(base_url="http://h:8000", model="m").url == "http://h:8000/v1/chat/completions"


def test_unreachable_judge_fails_the_rollout_request(fake, tiny_model_dir, tmp_path):
    from services.rollout.server import RolloutServicer, create_server
    from services.rollout.settings import RolloutSettings

    problems = write_problems(
        tmp_path / "p.parquet", [Problem("q1", '[{"role":"user","content":"1+1="}]', "judge", "2")]
    )

    def generate(stub, out):
        req = rollout_pb2.GenerateRequest(
            request_id="r", checkpoint=str(tiny_model_dir), problems_path=str(problems), output_path=str(out),
            sampling=common_pb2.SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=0),
        )
        return list(stub.Generate(req))

    # no judge configured: a judged data source is refused before any generation
    plain = RolloutSettings(port=0, max_model_len=32, reward_workers=0)
    server, _, port = create_server(plain)
    server.start()
    with channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            generate(rollout_pb2_grpc.RolloutServiceStub(ch), tmp_path / "x.parquet")
    server.stop(0)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "judge" in info.value.details()

    settings = RolloutSettings(
        port=0, max_model_len=32, reward_workers=0, judge_base_url=fake.url, judge_model="m",
        judge_timeout_s=0.3, judge_retries=0,
    )
    servicer = RolloutServicer(settings)
    server, _, port = create_server(settings, servicer)
    server.start()
    try:
        with channel(f"127.0.0.1:{port}") as ch:
            stub = rollout_pb2_grpc.RolloutServiceStub(ch)
            fake.mode = "500"
            with pytest.raises(grpc.RpcError) as info:
                generate(stub, tmp_path / "x.parquet")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and fake.url in info.value.details()
            assert not (tmp_path / "x.parquet").exists()  # never a shard of silent zeros
            fake.mode = "ok"  # the service keeps serving: the same request now succeeds
            events = generate(stub, tmp_path / "ok.parquet")
            assert events[-1].result.n_responses == 2
    finally:
        server.stop(0)
        servicer.close()
