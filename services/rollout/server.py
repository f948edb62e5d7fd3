"""gRPC RolloutService: generate n rewarded samples per problem of a shard and write them as parquet.

The model stays loaded between requests; a request naming another checkpoint swaps the
weights in place (gradalign_common.model_cache). The shard is written atomically to the
requested path, so a retried request (same idempotency key and path) overwrites it.
"""

from __future__ import annotations

import statistics
import time
from collections import OrderedDict

import grpc

from gradalign_common.errors import InvalidInputError
from gradalign_common.generation import Sampling, generate_rollouts
from gradalign_common.grpc_utils import build_server, mark_serving, rpc_errors, run_until_signalled
from gradalign_common.logging_setup import configure_logging, get_logger
from gradalign_common.model_cache import ModelCache
from gradalign_common.modeling import configure_torch_threads
from gradalign_common.pb import common_pb2, rollout_pb2, rollout_pb2_grpc
from gradalign_common.prompts import render_prompt
from gradalign_common.records import read_problems, write_rollouts
from gradalign_common.rewards import get_reward_fn
from services.rollout.settings import RolloutSettings

SERVICE_NAME = "gradalign.v1.RolloutService"
log = get_logger("gradalign.rollout")


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


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, settings: RolloutSettings):
        self.settings = settings
        self.models = ModelCache(device=settings.device, dtype=settings.dtype)

    @rpc_errors("rollout")
    def Generate(self, request: rollout_pb2.GenerateRequest, context: grpc.ServicerContext):
        if not request.checkpoint:
            raise InvalidInputError("checkpoint is required")
        if not request.problems_path:
            raise InvalidInputError("problems_path is required")
        if not request.output_path:
            raise InvalidInputError("output_path is required")
        sampling = sampling_from_proto(request.sampling)
        problems = read_problems(request.problems_path)
        if not problems:
            raise InvalidInputError(f"empty batch: {request.problems_path} has no problems")
        for p in problems:
            get_reward_fn(p.data_source)
        with self.models.lock:
            start = time.perf_counter()
            model, tokenizer = self.models.get(request.checkpoint)
            for p in problems:
                n_prompt = len(tokenizer(render_prompt(p.prompt, tokenizer), add_special_tokens=False)["input_ids"])
                if n_prompt + sampling.max_tokens > self.settings.max_model_len:
                    raise InvalidInputError(
                        f"problem {p.problem_id}: prompt of {n_prompt} tokens + max_tokens {sampling.max_tokens} "
                        f"exceeds max_model_len {self.settings.max_model_len}"
                    )
            total = len(problems)
            # generate in slices so progress can be streamed between them
            records = []
            step = self.settings.batch_size
            for s in range(0, total, step):
                records += generate_rollouts(
                    model, tokenizer, problems[s : s + step], _offset_seed(sampling, s), batch_size=step
                )
                yield rollout_pb2.GenerateEvent(
                    progress=common_pb2.Progress(done=min(s + step, total), total=total, unit="problems")
                )
            write_rollouts(request.output_path, records)
            compute = time.perf_counter() - start
        stats = problem_stats(records)
        n_tokens = sum(len(r.response_ids) for r in records)
        log.info("generated", request_id=request.request_id, problems=total, responses=len(records), seconds=round(compute, 3))
        yield rollout_pb2.GenerateEvent(
            result=rollout_pb2.GenerateResult(
                output_path=request.output_path,
                stats=stats,
                n_responses=len(records),
                n_response_tokens=n_tokens,
                compute_seconds=compute,
            )
        )


def _offset_seed(sampling: Sampling, offset: int) -> Sampling:
    return Sampling(**{**sampling.__dict__, "seed": sampling.seed + offset})


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
                accuracy=sum(1 for x in rewards if x > 0.5) / len(rs),
                mean_reward=statistics.fmean(rewards),
                mean_response_length=statistics.fmean(len(r.response_ids) for r in rs),
            )
        )
    return out


def create_server(settings: RolloutSettings):
    server, health, port = build_server(settings.host, settings.port, [SERVICE_NAME])
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(settings), server)
    return server, health, port


def serve(settings: RolloutSettings) -> None:
    configure_logging("rollout", settings.log_level)
    configure_torch_threads(settings.torch_threads)
    server, health, port = create_server(settings)
    server.start()
    mark_serving(health, [SERVICE_NAME])
    log.info("serving", address=f"{settings.host}:{port}", backend=settings.backend)
    run_until_signalled(server, health, settings.metrics_host, settings.metrics_port)


def main() -> None:
    serve(RolloutSettings())


if __name__ == "__main__":
    main()
