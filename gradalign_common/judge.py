"""A model judge: an OpenAI-compatible chat endpoint (e.g. a vLLM server) asked whether a
response's final answer matches the reference answer.

`ModelJudge(JudgeConfig(base_url=..., model=...)).score(items)` POSTs one chat completion per
item to {base_url}/v1/chat/completions, at most `concurrency` at a time, each with a timeout
and retries (with exponential backoff) on connection errors, timeouts, HTTP 429 and 5xx. The
verdict is the last YES/NO in the reply: 1.0 or 0.0.

A judge that cannot be reached never scores 0 silently: after the retries it raises
JudgeUnavailableError (the rollout service answers UNAVAILABLE); an endpoint that answers
with an error that retrying cannot fix (HTTP 4xx, a malformed body) raises JudgeError.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

import httpx

from gradalign_common.logging_setup import get_logger
from gradalign_common.rewards import RewardItem

log = get_logger("gradalign.judge")

SYSTEM_PROMPT = (
    "You grade answers. Compare the final answer in the response with the reference answer. "
    "They match when they are mathematically or semantically equivalent; ignore formatting, units "
    "written differently and the reasoning before the final answer. Reply with one word: YES if "
    "they match, NO otherwise."
)
_VERDICT_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge answered with something unusable (HTTP 4xx, a malformed body)."""


class JudgeUnavailableError(JudgeError):
    """The judge could not be reached or kept failing (connection error, timeout, HTTP 429/5xx)."""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    retries: int = 2  # further attempts after the first
    concurrency: int = 16
    max_tokens: int = 64
    backoff_s: float = 0.5
    max_response_chars: int = 8000  # only the tail of a longer response is sent (its final answer)

    def __post_init__(self):
        if not self.base_url:
            raise ValueError("judge base_url is empty")
        if not self.model:
            raise ValueError("judge model is empty")
        if self.timeout_s <= 0 or self.retries < 0 or self.concurrency < 1:
            raise ValueError("judge timeout_s must be > 0, retries >= 0, concurrency >= 1")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def build_messages(item: RewardItem, max_response_chars: int = 8000) -> list[dict[str, str]]:
    response = item.response
    if len(response) > max_response_chars:
        response = "..." + response[-max_response_chars:]
    parts = []
    if item.prompt:
        parts.append(f"Problem:\n{item.prompt}")
    parts.append(f"Reference answer:\n{item.ground_truth}")
    parts.append(f"Response:\n{response}")
    parts.append("Does the final answer in the response match the reference answer? Reply YES or NO.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_verdict(text: str) -> bool | None:
    """The last YES/NO in a reply (after any <think> block); None when there is none."""
    words = _VERDICT_RE.findall(_THINK_RE.sub(" ", text or ""))
    return words[-1].lower() == "yes" if words else None


class ModelJudge:
    """Thread-safe; one HTTP connection pool sized to `concurrency`. Close it when done."""

    def __init__(self, config: JudgeConfig, transport: httpx.BaseTransport | None = None):
        self.config = config
        self._transport = transport
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self.requests = 0  # HTTP attempts made (for tests and logs)
        self.unparsed = 0  # replies without a YES/NO (scored 0)

    def _http(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
                limits = httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency)
                self._client = httpx.Client(
                    headers=headers, timeout=httpx.Timeout(self.config.timeout_s), limits=limits, transport=self._transport
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def score(self, items: Sequence[RewardItem]) -> list[float]:
        """1.0/0.0 per item, in order. Raises JudgeUnavailableError / JudgeError on the first failure."""
        if not items:
            return []
        if len(items) == 1 or self.config.concurrency == 1:
            return [self.score_one(it) for it in items]
        pool = ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(items)), thread_name_prefix="judge")
        try:
            futures = [pool.submit(self.score_one, it) for it in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f in done and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score_one(self, item: RewardItem) -> float:
        body = {
            "model": self.config.model,
            "messages": build_messages(item, self.config.max_response_chars),
            "temperature": 0.0,
            "max_tokens": self.config.max_tokens,
        }
        text = self._complete(body)
        verdict = parse_verdict(text)
        if verdict is None:
            with self._lock:
                self.unparsed += 1
            log.warning("judge_unparsed_verdict", reply=text[:200])
            return 0.0
        return 1.0 if verdict else 0.0

    def _complete(self, body: dict) -> str:
        url = self.config.url
        attempts = self.config.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.config.backoff_s * 2 ** (attempt - 1), 10.0))
            with self._lock:
                self.requests += 1
            try:
                resp = self._http().post(url, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.config.timeout_s:g}s"
                continue
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise JudgeError(f"model judge at {url} rejected the request: HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                return resp.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"model judge at {url} sent a malformed reply: {resp.text[:300]!r}") from None
        raise JudgeUnavailableError(f"model judge at {url} unavailable after {attempts} attempt(s): {last}")
