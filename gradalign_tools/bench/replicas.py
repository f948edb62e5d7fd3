"""Scorer replicas as separate processes: start `python -m services.scoring.server` on free ports, and
fan one round's candidate shards out over them (what the scheduler does across scorer replicas).

Used by the sharding test and by `gradalign bench scoring --replicas N`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from gradalign_common.grpc_utils import wait_healthy
from gradalign_common.pb import scoring_pb2
from gradalign_common.records import ScoreRecord
from gradalign_tools.stack import free_port, service_command, start_process, stop_processes
from services.scheduler import workers

class ScorerProcess:
    """One scoring server in its own process on a free port (started like the local stack's services);
    a context manager that stops it on exit."""

    def __init__(self, torch_threads: int = 0, device: str = "cpu", log_path: Path | None = None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            GRADALIGN_SCORING_HOST="127.0.0.1",
            GRADALIGN_SCORING_PORT=str(self.port),
            GRADALIGN_SCORING_TORCH_THREADS=str(torch_threads),
            GRADALIGN_SCORING_DEVICE=device,
            GRADALIGN_SCORING_LOG_LEVEL="WARNING",
        )
        if torch_threads:
            env.update(OMP_NUM_THREADS=str(torch_threads), MKL_NUM_THREADS=str(torch_threads))
        self.proc = start_process(service_command("scoring"), env, log_path)

    def wait(self, timeout: float = 120.0) -> "ScorerProcess":
        if not wait_healthy(self.address, timeout=timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"scorer process on {self.address} did not become healthy")
        return self

    def stop(self) -> None:
        stop_processes([self.proc])

    def __enter__(self) -> "ScorerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_replicas(n: int, torch_threads: int = 0, device: str = "cpu", timeout: float = 120.0) -> list[ScorerProcess]:
    """n scorer processes, started together and waited for; stops them all if one fails."""
    replicas = [ScorerProcess(torch_threads, device) for _ in range(n)]
    try:
        for r in replicas:
            r.wait(timeout)
    except BaseException:
        for r in replicas:
            r.stop()
        raise
    return replicas


def score_request(address: str, request: scoring_pb2.ScoreRequest, timeout: float = 3600.0) -> tuple[list[ScoreRecord], scoring_pb2.ScoreSummary]:
    """Call Score on one replica through the scheduler's client (services.scheduler.workers); its scores and summary."""
    scores, summary = workers.score(address, timeout, request)
    return [ScoreRecord(s.problem_id, s.score, s.accuracy, s.n_responses, s.zero_advantage) for s in scores], summary


def score_sharded(
    addresses: Sequence[str], shard_paths: Sequence[Sequence[str]], **request_fields
) -> tuple[list[ScoreRecord], float]:
    """Score shard i on replica i (all at once); (the scores of all shards in shard order, wall seconds)."""
    if len(addresses) != len(shard_paths):
        raise ValueError("one shard per replica")
    started = time.perf_counter()
    with ThreadPoolExecutor(len(addresses)) as pool:
        futures = [
            pool.submit(score_request, address, scoring_pb2.ScoreRequest(candidate_paths=list(paths), **request_fields))
            for address, paths in zip(addresses, shard_paths)
        ]
        results = [f.result()[0] for f in futures]
    seconds = time.perf_counter() - started
    return [s for part in results for s in part], seconds
