"""gRPC RolloutService: generate n rewarded samples per problem of a shard and write them as parquet.

The backend (settings.backend: hf | vllm, services/rollout/backends) keeps the model loaded
between requests; a request naming another checkpoint swaps the weights in place. Full loads,
in-place swaps, failed swaps and the seconds spent in each are Prometheus counters
(gradalign_rollout_model_loads_total, ..._weight_swaps_total, ..._swap_failures_total,
..._model_load_seconds_total, ..._weight_swap_seconds_total; label backend) on the service's
/metrics endpoint (settings.metrics_port). Problems are
generated longest-prompt first in slices of settings.batch_size prompts; after each slice a
progress event is streamed and the slice's rewards are scored in the background (math answers
in a process pool, model-judged data sources by the judge, concurrently) while the next slice
generates. The shard (problem id, prompt and response token ids, text, finish reason, reward,
correct) is written atomically to the requested path in problem order, so a retried request
(same idempotency key and path) overwrites it; the result carries per-problem stats. Beside it,
`<output_path>.request.json` records the request id and body fingerprint; a request reusing that
id with a different body is refused with ALREADY_EXISTS (gradalign_common.request_identity).

Capacity and cancel: at most settings.max_concurrent_requests requests are admitted at once, any
more get RESOURCE_EXHAUSTED (gradalign_common.request_gate). A cancelled call stops before the
next slice (or at the next progress event), releases the model lock and writes nothing.

Errors name what is wrong: INVALID_ARGUMENT (bad sampling, empty batch, unknown data_source,
prompt + max_tokens over max_model_len), NOT_FOUND (problems file, checkpoint),
FAILED_PRECONDITION (a judged data source on a service without a judge), UNAVAILABLE (the judge
cannot be reached), INTERNAL (anything else). The service keeps serving after any of them.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import grpc
from prometheus_client import Counter

from gradalign_common.errors import InvalidInputError
from gradalign_common.generation import (
    Sampling, batch_seed, length_sorted_batches, prompt_token_ids, reward_items, rollout_records,
)
from gradalign_common.grpc_utils import build_service_server, rpc_errors, serve_until_signalled, stop_if_cancelled
from gradalign_common.judge import JudgeConfig, JudgeError, JudgeUnavailableError, ModelJudge
from gradalign_common.logging_setup import get_logger
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
from gradalign_common.prompts import render_prompt
from gradalign_common.records import read_problems, write_rollouts
from gradalign_common.request_gate import RequestGate
from gradalign_common.request_identity import check_request, record_request, request_fingerprint
from gradalign_common.rewards import JudgeRequiredError, RewardItem, get_reward_fn, is_heavy, is_judged, score_batch
from services.rollout.backends import RolloutBackend, Sample, create_backend
from services.rollout.settings import RolloutSettings

SERVICE_NAME = "gradalign.v1.RolloutService"
log = get_logger("gradalign.rollout")

MODEL_LOADS = Counter("gradalign_rollout_model_loads_total", "Full model loads (vllm: engines built)", ["backend"])
WEIGHT_SWAPS = Counter("gradalign_rollout_weight_swaps_total", "Checkpoints swapped into the loaded model in place", ["backend"])
SWAP_FAILURES = Counter(
    "gradalign_rollout_swap_failures_total", "In-place swaps that failed and fell back to a full load", ["backend"]
)
LOAD_SECONDS = Counter("gradalign_rollout_model_load_seconds_total", "Seconds spent in full model loads", ["backend"])
SWAP_SECONDS = Counter("gradalign_rollout_weight_swap_seconds_total", "Seconds spent swapping weights in place", ["backend"])
_MODEL_COUNTERS = {
    "loads": MODEL_LOADS, "swaps": WEIGHT_SWAPS, "swap_failures": SWAP_FAILURES,
    "load_seconds": LOAD_SECONDS, "swap_seconds": SWAP_SECONDS,
}


def model_counters(backend) -> dict[str, float]:
    """The backend's load/swap counters (a backend without one counts 0)."""
    return {k: getattr(backend, k, 0) for k in _MODEL_COUNTERS}


def export_model_counters(backend, before: dict[str, float]) -> dict[str, float]:
    """Add what the backend's counters gained since `before` to the Prometheus counters; return the gains."""
    after = model_counters(backend)
    gained = {k: after[k] - before[k] for k in after}
    for k, v in gained.items():
        if v > 0:
            _MODEL_COUNTERS[k].labels(backend.name).inc(v)
    return gained


def sampling_from_proto(msg: common_pb2.SamplingParams) -> Sampling:
    if msg.n < 1:
        raise InvalidInputError("sampling.n must be >= 1")
    if msg.max_tokens < 1:
        raise InvalidInputError("sampling.max_tokens must be >= 1")
    if msg.temperature < 0:
        raise InvalidInputError("sampling.temperature must be >= 0")
    top_p = msg.top_p if msg.top_p > 0 else 1.0
    if top_p > 1:
        raise InvalidInputError("sampling.top_p must be in (0, 1]")
    return Sampling(
        n=msg.n, max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=top_p, seed=msg.seed, stop=tuple(msg.stop)
    )


def judge_from_settings(settings: RolloutSettings) -> ModelJudge | None:
    if not settings.judge_base_url:
        return None
    if not settings.judge_model:
        raise ValueError("GRADALIGN_ROLLOUT_JUDGE_MODEL is required when GRADALIGN_ROLLOUT_JUDGE_BASE_URL is set")
    key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else None
    return ModelJudge(
        JudgeConfig(
            base_url=settings.judge_base_url, model=settings.judge_model, api_key=key,
            timeout_s=settings.judge_timeout_s, retries=settings.judge_retries,
            concurrency=settings.judge_concurrency, max_tokens=settings.judge_max_tokens,
        )
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, settings: RolloutSettings, backend: RolloutBackend | None = None, judge=None):
        self.settings = settings
        self.backend = backend if backend is not None else create_backend(settings)
        self.judge = judge if judge is not None else judge_from_settings(settings)
        self.judge_sources = frozenset(settings.judge_data_sources)
        self.lock = threading.Lock()  # one request uses the model at a time; a swap cannot interleave
        self.gate = RequestGate("rollout", settings.max_concurrent_requests)
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # --- reward scoring -------------------------------------------------------------------

    def _reward_pool(self) -> ProcessPoolExecutor | None:
        if self.settings.reward_workers < 1:
            return None
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.settings.reward_workers, mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def _score(self, items: list[RewardItem]) -> list[tuple[float, bool]]:
        heavy = any(is_heavy(i.data_source) and not is_judged(i.data_source, self.judge_sources) for i in items)
        pool = self._reward_pool() if heavy else None
        try:
            return score_batch(items, judge=self.judge, judge_sources=self.judge_sources, pool=pool)
        except BrokenProcessPool:
            with self._pool_lock:
                self._pool = None  # a worker died; the next request starts a fresh pool
            raise

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        if self.judge is not None and hasattr(self.judge, "close"):
            self.judge.close()
        self.backend.close()

    # --- the RPC --------------------------------------------------------------------------

    @rpc_errors("rollout")
    def Generate(self, request: rollout_pb2.GenerateRequest, context: grpc.ServicerContext):
        try:
            with self.gate.slot():
                yield from self._generate(request, context)
        except JudgeRequiredError as exc:
            _fail(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except JudgeUnavailableError as exc:
            _fail(context, grpc.StatusCode.UNAVAILABLE, str(exc))
        except JudgeError as exc:
            _fail(context, grpc.StatusCode.INTERNAL, f"model judge error: {exc}")

    def _generate(self, request: rollout_pb2.GenerateRequest, context: grpc.ServicerContext):
        if not request.checkpoint:
            raise InvalidInputError("checkpoint is required")
        if not request.problems_path:
            raise InvalidInputError("problems_path is required")
        if not request.output_path:
            raise InvalidInputError("output_path is required")
        fingerprint = request_fingerprint(request)
        check_request(request.output_path, request.request_id, fingerprint)
        sampling = sampling_from_proto(request.sampling)
        if sampling.max_tokens >= self.settings.max_model_len:
            raise InvalidInputError(
                f"sampling.max_tokens {sampling.max_tokens} leaves no room for a prompt within max_model_len "
                f"{self.settings.max_model_len}"
            )
        problems = read_problems(request.problems_path)
        if not problems:
            raise InvalidInputError(f"empty batch: {request.problems_path} has no problems")
        for p in problems:
            try:
                get_reward_fn(p.data_source)
            except InvalidInputError as exc:
                raise InvalidInputError(f"problem {p.problem_id}: {exc}") from None
            if self.judge is None and is_judged(p.data_source, self.judge_sources):
                raise JudgeRequiredError(p.data_source)
        total = len(problems)
        samples: list[list[Sample] | None] = [None] * total
        scored: list[tuple[list[int], Future]] = []
        scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-rewards")
        try:
            with self.lock:
                start = time.perf_counter()
                before = model_counters(self.backend)
                try:
                    tokenizer = self.backend.load(request.checkpoint)
                finally:
                    gained = export_model_counters(self.backend, before)
                if gained["loads"] or gained["swaps"]:
                    log.info(
                        "checkpoint_loaded", checkpoint=request.checkpoint, backend=self.backend.name,
                        how="swap" if gained["swaps"] else "load", swap_failures=int(gained["swap_failures"]),
                        seconds=round(time.perf_counter() - start, 3),
                    )
                ids = prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer) for p in problems])
                for p, prompt in zip(problems, ids):
                    if len(prompt) + sampling.max_tokens > self.settings.max_model_len:
                        raise InvalidInputError(
                            f"problem {p.problem_id}: prompt of {len(prompt)} tokens + max_tokens "
                            f"{sampling.max_tokens} exceeds max_model_len {self.settings.max_model_len}"
                        )
                done = 0
                per_prompt = getattr(self.backend, "seeds_per_prompt", False)
                for k, idx in enumerate(length_sorted_batches([len(x) for x in ids], self.settings.batch_size)):
                    stop_if_cancelled(context, f"{done} of {total} problems generated")
                    # a backend that seeds each prompt from the request's seed gets that seed for every slice
                    seed = sampling.seed if per_prompt else batch_seed(sampling.seed, k)
                    slice_sampling = Sampling(**{**sampling.__dict__, "seed": seed})
                    out = self.backend.generate([ids[i] for i in idx], slice_sampling)
                    items = []
                    for i, s in zip(idx, out):
                        samples[i] = s
                        items += reward_items(problems[i], s, self.judge is not None)
                    scored.append((idx, scorer.submit(self._score, items)))  # scored while the next slice generates
                    for _, f in scored:  # fail fast on a scoring error (e.g. the judge is down)
                        if f.done() and f.exception() is not None:
                            raise f.exception()
                    done += len(idx)
                    yield rollout_pb2.GenerateEvent(progress=common_pb2.Progress(done=done, total=total, unit="problems"))
            # the model is free for the next request while this one's last rewards finish
            rewards: list[list[tuple[float, bool]] | None] = [None] * total
            for idx, f in scored:
                flat = iter(f.result())
                for i in idx:
                    rewards[i] = [next(flat) for _ in samples[i]]
        finally:
            for _, f in scored:
                f.cancel()
            scorer.shutdown(wait=False, cancel_futures=True)
        stop_if_cancelled(context, f"{done} of {total} problems generated")  # cancelled late: no shard
        records = rollout_records(problems, ids, samples, rewards)
        write_rollouts(request.output_path, records)
        record_request(request.output_path, request.request_id, fingerprint)
        compute = time.perf_counter() - start
        stats = problem_stats(records)
        n_tokens = sum(len(r.response_ids) for r in records)
        log.info(
            "generated", request_id=request.request_id, backend=self.backend.name, problems=total,
            responses=len(records), tokens=n_tokens, seconds=round(compute, 3),
        )
        yield rollout_pb2.GenerateEvent(
            result=rollout_pb2.GenerateResult(
                output_path=request.output_path,
                stats=stats,
                n_responses=len(records),
                n_response_tokens=n_tokens,
                compute_seconds=compute,
            )
        )


def _fail(context: grpc.ServicerContext, code: grpc.StatusCode, detail: str) -> None:
    """End the stream with a status (context.abort would be re-mapped to INTERNAL by rpc_errors)."""
    log.warning("rpc_failed", service="rollout", method="Generate", code=code.name, detail=detail)
    context.set_code(code)
    context.set_details(detail)


def problem_stats(records) -> list[common_pb2.ProblemStats]:
    groups: OrderedDict[str, list] = OrderedDict()
    for r in records:
        groups.setdefault(r.problem_id, []).append(r)
    out = []
    for pid, rs in groups.items():
        rewards = [r.reward for r in rs]
        out.append(
            common_pb2.ProblemStats(
                problem_id=pid,
                n_responses=len(rs),
                accuracy=sum(1 for r in rs if r.correct) / len(rs),
                mean_reward=statistics.fmean(rewards),
                mean_response_length=statistics.fmean(len(r.response_ids) for r in rs),
            )
        )
    return out


def create_server(settings: RolloutSettings, servicer: RolloutServicer | None = None):
    """The RolloutService (`servicer`, or a new one) and health on a server, not started: (server, health, port)."""
    add = rollout_pb2_grpc.add_RolloutServiceServicer_to_server
    return build_service_server(settings, SERVICE_NAME, add, servicer or RolloutServicer(settings))


def serve(settings: RolloutSettings) -> None:
    settings.configure_process("rollout")
    servicer = RolloutServicer(settings)
    try:
        serve_until_signalled(settings, SERVICE_NAME, *create_server(settings, servicer), backend=settings.backend)
    finally:
        servicer.close()


def main() -> None:
    serve(RolloutSettings())


if __name__ == "__main__":
    main()
