"""`gradalign bench scoring --replicas N`: the round on one scorer process vs sharded over N processes."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from gradalign_common.pb import scoring_pb2
from gradalign_common.records import RolloutRecord, ScoreRecord, group_rollouts, write_rollouts, write_rollouts_jsonl
from gradalign_tools.bench.replicas import score_request, score_sharded, start_replicas

if TYPE_CHECKING:
    from gradalign_tools.bench.scoring import BenchConfig


def run_replicas(
    cfg: "BenchConfig", model, candidates: list[RolloutRecord], validation: list[RolloutRecord] | None,
    echo: Callable[[str], None],
) -> dict:
    """The round on one scorer process vs sharded over cfg.replicas processes (cfg.replica_threads each)."""
    n = cfg.replicas
    with tempfile.TemporaryDirectory(prefix="gradalign-bench-") as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "model")
        groups = list(group_rollouts(candidates).values())
        shards = [[r for g in groups[i::n] for r in g] for i in range(n)]
        shard_paths = [str(write_rollouts(root / f"shard-{i}.parquet", s)) for i, s in enumerate(shards)]
        common = dict(checkpoint=str(root / "model"), mode=cfg.mode, dtype=cfg.dtype)
        if validation is not None:
            validation_path = root / "validation.jsonl"
            write_rollouts_jsonl(validation_path, validation)
            common["validation_paths"] = [str(validation_path)]
        else:  # align: every shard uses the whole round's candidates as validation
            validation_path = None
            common["validation_paths"] = shard_paths
        echo(f"replicas: starting {n} scorer processes ({cfg.replica_threads} torch thread(s) each)")
        replicas = start_replicas(n, torch_threads=cfg.replica_threads, device=cfg.device)
        try:
            addresses = [r.address for r in replicas]
            # Warm up: load the model and compute (and cache) g_V on every replica.
            score_sharded(addresses, [[p] for p in shard_paths], **common)

            def one() -> tuple[list[ScoreRecord], float]:
                started = time.perf_counter()
                scores, _ = score_request(addresses[0], scoring_pb2.ScoreRequest(candidate_paths=shard_paths, **common))
                return scores, time.perf_counter() - started

            def touch() -> None:  # a new validation file: g_V is recomputed by every replica
                for p in ([validation_path] if validation_path else [Path(p) for p in shard_paths]):
                    os.utime(p, ns=(time.time_ns(), time.time_ns()))

            single, t_single = one()
            sharded, t_sharded = score_sharded(addresses, [[p] for p in shard_paths], **common)
            touch()
            _, t_single_cold = one()
            touch()
            _, t_sharded_cold = score_sharded(addresses, [[p] for p in shard_paths], **common)
        finally:
            for r in replicas:
                r.stop()
    by_id = {s.problem_id: s.score for s in single}
    result = {
        "replicas": n,
        "threads_per_replica": cfg.replica_threads,
        "one_replica_seconds": t_single,
        "sharded_seconds": t_sharded,
        "ratio": t_sharded / t_single,
        "one_replica_seconds_with_validation_gradient": t_single_cold,
        "sharded_seconds_with_validation_gradient": t_sharded_cold,
        "ratio_with_validation_gradient": t_sharded_cold / t_single_cold,
        "max_abs_diff_sharded_vs_one": max(abs(s.score - by_id[s.problem_id]) for s in sharded),
    }
    echo(
        f"replicas: 1 process {t_single:.2f} s, {n} processes {t_sharded:.2f} s, ratio {result['ratio']:.2f} "
        f"(with g_V recomputed: {t_single_cold:.2f} s vs {t_sharded_cold:.2f} s, ratio "
        f"{result['ratio_with_validation_gradient']:.2f}); max |score diff| {result['max_abs_diff_sharded_vs_one']:.1e}"
    )
    return result
