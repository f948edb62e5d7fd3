"""One GradAlign run of a mode and seed, in-process through the product's code and its round policy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping


from gradalign_common.errors import ZeroValidationGradientError
from gradalign_tools.bench.quality.config import RUN_FORMAT, grpo_config, run_hash, skip_setting
from gradalign_tools.bench.quality.flags import candidate_columns
from gradalign_tools.bench.quality.stats import mean
from gradalign_tools.bench.quality.warm_start import greedy_accuracy


def make_family_for(config: dict, seed: int):
    from gradalign_tools.bench.task_families import Noise, make_family

    data = config["data"]
    noise = data["noise"]
    return make_family(
        seed,
        test=data["test"],
        val=data["validation"],
        pool_size=data["pool_size"],
        pool_mixture=data["pool_mixture"],
        noise=Noise(rate=float(noise["rate"]), rewards=dict(noise["rewards"]), types=tuple(noise["types"])),
    )


def is_tracked(info: Mapping[str, Any], track: Mapping[str, Any]) -> bool:
    """Whether a pool problem counts toward the tracked fraction (noisy, or of a tracked type)."""
    return bool(track["noisy"] and info["noisy"]) or info["type"] in track["types"]


def overall_accuracy(per_type: Mapping[str, float], counts: Mapping[str, int], weights: Mapping[str, float]) -> float:
    """Weighted mean of per-type accuracies (weights default to the test counts)."""
    w = {t: float(weights.get(t, 0.0)) for t in per_type} if weights else {t: float(counts[t]) for t in per_type}
    total = sum(w.values())
    return sum(per_type[t] * w[t] for t in per_type) / total


class Evaluator:
    def __init__(self, config: dict, family):
        self.tests = family.test_problems()
        self.counts = {t: len(ps) for t, ps in self.tests.items()}
        self.weights = config["data"]["test_weights"]
        self.max_tokens = config["eval"]["max_tokens"]
        self.batch_size = config["eval"]["batch_size"]

    def __call__(self, model, tokenizer) -> dict:
        types = list(self.tests)
        problems = [p for t in types for p in self.tests[t]]
        correct = greedy_accuracy(model, tokenizer, problems, self.max_tokens, self.batch_size)
        per_type, i = {}, 0
        for t in types:
            n = self.counts[t]
            per_type[t] = mean(correct[i : i + n])
            i += n
        return {"overall": overall_accuracy(per_type, self.counts, self.weights), "per_type": per_type}


def run_one(config: dict, mode_name: str, seed: int, model_dir: Path, on_round=None) -> dict:
    """One GradAlign run of `mode_name` from the cached model; returns the run record (see module doc)."""
    import torch

    from gradalign_common.generation import Sampling, generate_rollouts
    from gradalign_common.modeling import load_model, load_tokenizer
    from gradalign_common.records import group_rollouts
    from gradalign_common.round_policy import FALLBACK_MODE, draw_chunk, select_round, stage_seed, update_streaks
    from gradalign_common.selection import get_mode
    from services.scoring.engine import ScoringEngine
    from services.trainer.grpo import GRPOTrainer

    started = time.perf_counter()
    loop, train = config["loop"], config["train"]
    mode = get_mode(mode_name)
    family = make_family_for(config, seed)
    pool = family.pool_problems()
    by_id = {p.problem_id: p for p in pool}
    info = family.pool_info()
    val = family.val_problems()
    track = config["data"]["track"]
    evaluate = Evaluator(config, family)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    ref_model = load_model(model_dir) if train["kl_coef"] > 0 else None
    torch.manual_seed(seed)

    def sampling(n: int, s: int) -> Sampling:
        return Sampling(n=n, max_tokens=loop["max_tokens"], temperature=loop["temperature"], top_p=loop["top_p"], seed=s)

    def val_greedy() -> float:  # the trusted validation set, greedy: what a user may tune on (never the test set)
        return mean(greedy_accuracy(model, tokenizer, val, config["eval"]["max_tokens"], config["eval"]["batch_size"]))

    evals = [evaluate(model, tokenizer)]
    val_greedy_accuracy = [val_greedy()]
    rounds: list[dict] = []
    pool_order = [p.problem_id for p in pool]
    skip = skip_setting(config)  # off: chunk r is positions [rM, (r+1)M), as chunk_ids gives it
    cursor, streaks = 0, {}  # where the next chunk's walk starts; each problem's zero-advantage streak
    for r in range(loop["rounds"]):
        t0 = time.perf_counter()
        draw = draw_chunk(pool_order, cursor, loop["chunk_size"], streaks, skip, stage_seed(seed, r, "skip_dead"))
        cursor = draw.end
        chunk = [by_id[pid] for pid in draw.ids]
        candidates = generate_rollouts(
            model, tokenizer, chunk, sampling(loop["n_samples_train"], stage_seed(seed, r, "rollout_train")),
            loop["generation_batch_size"],
        )
        validation, val_accuracy = None, None
        if mode.needs_validation:
            validation = generate_rollouts(
                model, tokenizer, val, sampling(loop["n_samples_val"], stage_seed(seed, r, "rollout_val")), loop["generation_batch_size"]
            )
            val_accuracy = mean([v.correct for v in validation])
        t1 = time.perf_counter()
        engine = ScoringEngine(model)
        fallback = None  # the round policy's zero-gradient rule, as the scheduler's score stage applies it
        try:
            scores = list(engine.score(candidates, mode, validation, method=loop["scoring_method"], seed=stage_seed(seed, r, "score")))
        except ZeroValidationGradientError as exc:  # every validation group has zero advantage
            fallback = str(exc)
            scores = list(engine.score(candidates, FALLBACK_MODE, seed=stage_seed(seed, r, "score")))
        chosen = select_round(scores, mode, loop["chunk_size"], loop["k"], fallback)
        update_streaks(streaks, [(s.problem_id, s.zero_advantage) for s in scores])
        t2 = time.perf_counter()
        groups = group_rollouts(candidates)
        reuse = {pid: groups[pid] for pid in chosen} if train["reuse_rollouts"] else None
        trainer = GRPOTrainer(
            model, tokenizer, [by_id[pid] for pid in chosen], grpo_config(config, stage_seed(seed, r, "train")), ref_model, reuse
        )
        metrics = trainer.run()
        t3 = time.perf_counter()
        evals.append(evaluate(model, tokenizer))
        val_greedy_accuracy.append(val_greedy())
        score_by_id = {s.problem_id: s for s in scores}
        selected_types: dict[str, int] = {}
        for pid in chosen:
            selected_types[info[pid]["type"]] = selected_types.get(info[pid]["type"], 0) + 1
        rounds.append(
            {
                "round": r + 1,
                "selected": len(chosen),
                "selected_types": selected_types,
                "selected_noisy": sum(info[pid]["noisy"] for pid in chosen),
                "tracked_fraction": mean([is_tracked(info[pid], track) for pid in chosen]),
                "chunk_tracked_fraction": mean([is_tracked(info[p.problem_id], track) for p in chunk]),
                "selected_zero_advantage": sum(score_by_id[pid].zero_advantage for pid in chosen),
                "selected_accuracy": mean([score_by_id[pid].accuracy for pid in chosen]),
                "chunk_accuracy": mean([c.correct for c in candidates]),
                "val_accuracy": val_accuracy,
                # what the rollouts cost and what skipping dead problems left out (gradalign_common.round_policy)
                "chunk_size": len(chunk),
                "skipped": len(draw.skipped),
                "skipped_ids": draw.skipped,
                "chunk_zero_advantage": sum(s.zero_advantage for s in scores),
                "rollout_tokens": sum(len(c.response_ids) for c in candidates),
                "zero_advantage_tokens": sum(len(c.response_ids) for c in candidates if score_by_id[c.problem_id].zero_advantage),
                "rollout_responses": len(candidates),
                "val_rollout_tokens": sum(len(v.response_ids) for v in validation or ()),
                "train_mean_reward": mean([s.mean_reward for s in metrics]),
                "fallback": fallback,
                "seconds": {
                    "rollout": round(t1 - t0, 3), "score_select": round(t2 - t1, 3),
                    "train": round(t3 - t2, 3), "eval": round(time.perf_counter() - t3, 3),
                },
                "test_accuracy": evals[-1]["overall"],
                "candidates": candidate_columns(scores, info),  # for the flag figures (quality/flags.py)
            }
        )
        if on_round is not None:
            on_round(r + 1, evals[-1]["overall"])
    return {
        "format": RUN_FORMAT,
        "config_hash": run_hash(config),
        "regime": config["name"],
        "mode": mode_name,
        "seed": seed,
        "model": str(model_dir),
        "accuracy": [e["overall"] for e in evals],
        "per_type_accuracy": [e["per_type"] for e in evals],
        "val_accuracy": val_greedy_accuracy,
        "tracked_label": track["label"],
        "tracked_fraction": [x["tracked_fraction"] for x in rounds],
        "chunk_tracked_fraction": [x["chunk_tracked_fraction"] for x in rounds],
        "rounds": rounds,
        "skip_dead": dict(config["loop"]["skip_dead"]),
        "rollout_tokens": sum(x["rollout_tokens"] for x in rounds),
        "zero_advantage_tokens": sum(x["zero_advantage_tokens"] for x in rounds),
        "skipped": sum(x["skipped"] for x in rounds),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
