"""`gradalign bench quality`: does a selection mode make RL train better on bad data than random?

A regime is a config file (benchmarks/quality/*.yaml): a tiny Qwen2 model warm-started on the
built-in task families (gradalign_common.task_families), a training pool with some kind of
mess in it (noisy rewards, a dominant easy type, useless problems), a trusted validation set
and a held-out test set per problem type. For every mode x seed the benchmark runs the
GradAlign loop in-process through the product's own code, round by round:

1. the round's chunk of `chunk_size` pool problems (the pool is walked in order, as the
   scheduler does), `n_samples_train` responses each (gradalign_common.generation,
   rewarded by the problems' data sources, noisy ones included);
2. for modes that need it, `n_samples_val` responses per validation problem (correct rewards);
3. scores (services.scoring.engine.ScoringEngine, method exact) and the top
   chunk_size // k problems (gradalign_common.selection.select_top);
4. `train.steps` GRPO steps of `train.batch_size` problems on the selection
   (services.trainer.grpo.GRPOTrainer, the chunk's rollouts reused for the first step, as
   the trainer service does), so every mode gets the same training budget;
5. held-out test accuracy, greedy, per problem type and overall (a weighted mean over types).

The warm-started model is cached per (model spec, warm start, seed) in the model cache
(default <results>/models, shareable between regimes), so every mode starts from the same
weights. Each finished (mode, seed) run is written to <results>/runs/<mode>-seed<seed>.json;
a rerun skips those whose config matches and redoes the rest, so a killed benchmark resumes.
At the end it writes summary.md, summary.csv, paired.csv (each mode against rand, seed by seed),
accuracy.png and selected_fraction.png.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import fcntl
import hashlib
import io
import json
import math
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import typer

from gradalign_common.artifacts import atomic_write_bytes
from gradalign_common.errors import InvalidInputError

RUN_FORMAT = 1  # bump when a run's JSON or the loop changes meaning: older run files are redone

DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "threads": 1,
    "model": {
        "hidden_size": 96,
        "num_layers": 3,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 288,
        "max_positions": 32,
    },
    "warm_start": {
        "mixture": {"add2": 1.0},
        "steps": 1600,  # at most this many steps
        "batch_size": 64,
        "learning_rate": 3e-3,
        "until": {},  # type -> accuracy on its validation reserve that ends the warm start early
        "check_every": 100,
    },
    "data": {
        "pool_size": 1024,
        "pool_mixture": {"add2": 1.0},
        "noise": {"rate": 0.0, "rewards": {"arith_inverted": 1.0}, "types": []},
        "validation": {"add2": 32},
        "test": {"add2": 128},
        "test_weights": {},  # type -> weight of its accuracy in the overall accuracy; default: by count
        "track": {"label": "noisy", "noisy": True, "types": []},
    },
    "loop": {
        "rounds": 8,
        "chunk_size": 128,
        "k": 4,
        "n_samples_train": 8,
        "n_samples_val": 8,
        "max_tokens": 5,
        "temperature": 1.0,
        "top_p": 1.0,
        "generation_batch_size": 128,
        "scoring_method": "exact",
    },
    "train": {
        "steps": 4,
        "batch_size": 16,
        "learning_rate": 1e-4,
        "clip_eps": 0.2,
        "kl_coef": 0.0,
        "entropy_coef": 0.0,
        "weight_decay": 0.0,
        "micro_batch_size": 64,
        "policy_loss": "vanilla",
        "reuse_rollouts": True,
    },
    "eval": {"max_tokens": 5, "batch_size": 256},
    "modes": ["sim", "dot", "align", "accgreedy", "rand"],
    "seeds": [0, 1, 2],
}

# keys whose value does not change a (mode, seed) run's outcome
_NOT_IN_RUN_HASH = ("name", "description", "threads", "modes", "seeds")


# --- configuration -----------------------------------------------------------------------------


def _merge(base: Any, override: Any, where: str) -> Any:
    """`override` over `base`: dicts merge key by key (unknown keys are errors, except in free-form
    mappings: mixtures, weights, `until`, noise rewards); other values replace."""
    if isinstance(base, dict) and isinstance(override, dict):
        free_form = not base or where.split(".")[-1] in {"mixture", "pool_mixture", "validation", "test", "test_weights", "until", "rewards"}
        if free_form:
            return dict(override)
        out = dict(base)
        for key, value in override.items():
            if key not in base:
                raise InvalidInputError(f"config: unknown key {where + '.' if where else ''}{key}; known: {', '.join(base)}")
            out[key] = _merge(base[key], value, f"{where}.{key}" if where else key)
        return out
    if isinstance(base, dict):
        raise InvalidInputError(f"config: {where} must be a mapping")
    return override


def load_config(path: str | Path) -> dict:
    """A regime config (YAML or JSON) merged over DEFAULTS and checked; InvalidInputError naming the defect."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{path}: the config must be a mapping")
    config = _merge(copy.deepcopy(DEFAULTS), raw, "")
    if not config["name"]:
        config["name"] = path.stem
    check_config(config)
    return config


def check_config(config: dict) -> None:
    from gradalign_common import noisy_rewards  # noqa: F401 - registers the noisy data sources
    from gradalign_common.rewards import get_reward_fn
    from gradalign_common.selection import get_mode
    from gradalign_common.task_families import get_type

    data, loop, train = config["data"], config["loop"], config["train"]
    for where in ("warm_start.mixture", "data.pool_mixture", "data.validation", "data.test", "data.test_weights", "warm_start.until"):
        section, key = where.split(".")
        for t, v in config[section][key].items():
            get_type(t)
            if not isinstance(v, (int, float)) or v < 0:
                raise InvalidInputError(f"config: {where}.{t} must be a number >= 0, got {v!r}")
    if not data["test"] or not sum(data["test"].values()):
        raise InvalidInputError("config: data.test needs at least one problem")
    if not data["validation"] or not sum(data["validation"].values()):
        raise InvalidInputError("config: data.validation needs at least one problem")
    for t in data["test_weights"]:
        if t not in data["test"]:
            raise InvalidInputError(f"config: data.test_weights names {t!r}, which has no test problems")
    if data["test_weights"] and not sum(data["test_weights"].values()):
        raise InvalidInputError("config: data.test_weights must give some type a weight > 0")
    for source in data["noise"]["rewards"]:
        get_reward_fn(source)
    for t in data["noise"]["types"] + data["track"]["types"]:
        get_type(t)
    track = data["track"]
    if not track["label"] or not (track["noisy"] or track["types"]):
        raise InvalidInputError("config: data.track needs a label and noisy: true or a list of types")
    for name in ("rounds", "chunk_size", "k", "n_samples_train", "n_samples_val", "max_tokens", "generation_batch_size"):
        if not isinstance(loop[name], int) or loop[name] < 1:
            raise InvalidInputError(f"config: loop.{name} must be an integer >= 1, got {loop[name]!r}")
    if loop["n_samples_train"] < 2 or loop["n_samples_val"] < 2:
        raise InvalidInputError("config: loop.n_samples_train and n_samples_val must be >= 2 (GRPO groups)")
    keep = loop["chunk_size"] // loop["k"]
    if keep < train["batch_size"]:
        raise InvalidInputError(
            f"config: chunk_size // k = {keep} problems are selected per round, fewer than train.batch_size {train['batch_size']}"
        )
    if loop["chunk_size"] > data["pool_size"]:
        raise InvalidInputError(f"config: loop.chunk_size {loop['chunk_size']} is larger than data.pool_size {data['pool_size']}")
    if not config["modes"]:
        raise InvalidInputError("config: modes is empty")
    for mode in config["modes"]:
        get_mode(mode)
    if not config["seeds"] or not all(isinstance(s, int) and s >= 0 for s in config["seeds"]):
        raise InvalidInputError("config: seeds must be a non-empty list of integers >= 0")
    _grpo_config(config, seed=0).validate()
    _model_spec(config, seed=0)


def _model_spec(config: dict, seed: int):
    from gradalign_common.tiny_model import TinyModelSpec

    known = {f.name for f in fields(TinyModelSpec)}
    extra = set(config["model"]) - known
    if extra:
        raise InvalidInputError(f"config: unknown model key(s) {', '.join(sorted(extra))}; known: {', '.join(sorted(known))}")
    ws = config["warm_start"]
    return TinyModelSpec(
        **config["model"], warmup_steps=ws["steps"], batch_size=ws["batch_size"], learning_rate=ws["learning_rate"], seed=seed
    )


def _grpo_config(config: dict, seed: int):
    from services.trainer.grpo import GRPOConfig

    loop, train = config["loop"], config["train"]
    return GRPOConfig(
        steps=train["steps"],
        batch_size=train["batch_size"],
        n_samples=loop["n_samples_train"],
        learning_rate=float(train["learning_rate"]),
        clip_eps=train["clip_eps"],
        kl_coef=train["kl_coef"],
        entropy_coef=train["entropy_coef"],
        weight_decay=train["weight_decay"],
        micro_batch_size=train["micro_batch_size"],
        max_tokens=loop["max_tokens"],
        temperature=loop["temperature"],
        top_p=loop["top_p"],
        seed=seed,
        generation_batch_size=loop["generation_batch_size"],
        policy_loss=train["policy_loss"],
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_hash(config: dict) -> str:
    """Identity of a run's inputs: the config minus names, threads, modes and seeds."""
    return _digest({"format": RUN_FORMAT, **{k: v for k, v in config.items() if k not in _NOT_IN_RUN_HASH}})


def stage_seed(seed: int, round_index: int, stage_offset: int) -> int:
    """As the scheduler derives a stage's seed from the experiment's seed and the round."""
    return (seed * 1_000_003 + round_index * 101 + stage_offset * 7) % (2**31 - 1)


# --- the warm-started model ---------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def warm_model_dir(config: dict, seed: int, cache: Path) -> Path:
    """The cached warm-started model for (model spec, warm start, seed); built (under a lock) if missing."""
    from gradalign_common.task_families import TEST_RESERVE, VAL_RESERVE

    key = _digest({"model": config["model"], "warm_start": config["warm_start"], "reserves": [TEST_RESERVE, VAL_RESERVE]})
    out = cache / f"tiny-{key}-seed{seed}"
    if (out / "warm_start.json").is_file():
        return out
    with _file_lock(cache / f".tiny-{key}-seed{seed}.lock"):
        if not (out / "warm_start.json").is_file():
            build_warm_model(config, seed, out)
    return out


def _greedy_accuracy(model, tokenizer, problems, max_tokens: int, batch_size: int) -> list[bool]:
    from gradalign_common.generation import Sampling, generate_rollouts

    records = generate_rollouts(model, tokenizer, problems, Sampling(n=1, max_tokens=max_tokens, temperature=0.0), batch_size)
    return [r.correct for r in records]


def build_warm_model(config: dict, seed: int, out: Path) -> dict:
    """Warm-start the tiny model on the mixture (stopping early once every `until` type's accuracy on
    its validation reserve is reached), save it with warm_start.json (steps, validation accuracies)."""
    from gradalign_common.char_tokenizer import build_char_tokenizer
    from gradalign_common.modeling import save_checkpoint
    from gradalign_common.task_families import VAL_RESERVE, held_out_prompts, make_family, warm_start_families
    from gradalign_common.tiny_model import build_tiny_model

    ws = config["warm_start"]
    spec = _model_spec(config, seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(spec, tokenizer)
    watch = sorted(set(ws["until"]) | set(ws["mixture"]))
    reserve = make_family(seed, test={}, val={t: VAL_RESERVE for t in watch}, pool_size=0, pool_mixture={watch[0]: 1})
    by_type: dict[str, list] = {}
    for p, r in zip(reserve.val_problems(), reserve.val):
        by_type.setdefault(r["extra_info"]["type"], []).append(p)
    max_tokens = config["eval"]["max_tokens"]
    trace: list[dict] = []
    state = {"step": 0}

    def accuracies() -> dict[str, float]:
        model.eval()
        acc = {t: _mean(_greedy_accuracy(model, tokenizer, ps, max_tokens, 256)) for t, ps in by_type.items()}
        model.train()
        return acc

    def check(step: int) -> bool:
        state["step"] = step
        if not ws["until"] or step % ws["check_every"]:
            return False
        acc = accuracies()
        trace.append({"step": step, "val_accuracy": acc})
        return all(acc[t] >= float(v) for t, v in ws["until"].items())

    started = time.perf_counter()
    loss = warm_start_families(
        model, tokenizer, ws["mixture"], steps=ws["steps"], batch_size=ws["batch_size"],
        learning_rate=float(ws["learning_rate"]), seed=seed, exclude=held_out_prompts(seed), callback=check,
    )
    model.eval()
    steps = state["step"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    info = {
        "seed": seed,
        "steps": steps,
        "last_loss": loss,
        "seconds": round(time.perf_counter() - started, 2),
        "val_reserve_accuracy": accuracies(),
        "trace": trace,
        "model": config["model"],
        "warm_start": ws,
    }
    model.eval()
    save_checkpoint(model, tokenizer, out)
    atomic_write_bytes(out / "warm_start.json", json.dumps(info, indent=1).encode())
    return info


# --- one (mode, seed) run -----------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def make_family_for(config: dict, seed: int):
    from gradalign_common.task_families import Noise, make_family

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
        correct = _greedy_accuracy(model, tokenizer, problems, self.max_tokens, self.batch_size)
        per_type, i = {}, 0
        for t in types:
            n = self.counts[t]
            per_type[t] = _mean(correct[i : i + n])
            i += n
        return {"overall": overall_accuracy(per_type, self.counts, self.weights), "per_type": per_type}


def run_one(config: dict, mode_name: str, seed: int, model_dir: Path, on_round=None) -> dict:
    """One GradAlign run of `mode_name` from the cached model; returns the run record (see module doc)."""
    import torch

    from gradalign_common.generation import Sampling, generate_rollouts
    from gradalign_common.modeling import load_model, load_tokenizer
    from gradalign_common.records import group_rollouts
    from gradalign_common.selection import get_mode, select_top
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
        return _mean(_greedy_accuracy(model, tokenizer, val, config["eval"]["max_tokens"], config["eval"]["batch_size"]))

    evals = [evaluate(model, tokenizer)]
    val_greedy_accuracy = [val_greedy()]
    rounds: list[dict] = []
    m, keep = loop["chunk_size"], loop["chunk_size"] // loop["k"]
    for r in range(loop["rounds"]):
        t0 = time.perf_counter()
        chunk = list({pid: by_id[pid] for pid in (pool[(r * m + i) % len(pool)].problem_id for i in range(m))}.values())
        candidates = generate_rollouts(
            model, tokenizer, chunk, sampling(loop["n_samples_train"], stage_seed(seed, r, 0)), loop["generation_batch_size"]
        )
        validation, val_accuracy = None, None
        if mode.needs_validation:
            validation = generate_rollouts(
                model, tokenizer, val, sampling(loop["n_samples_val"], stage_seed(seed, r, 1)), loop["generation_batch_size"]
            )
            val_accuracy = _mean([v.correct for v in validation])
        t1 = time.perf_counter()
        engine = ScoringEngine(model)
        fallback = None
        try:
            scores = list(engine.score(candidates, mode, validation, method=loop["scoring_method"], seed=stage_seed(seed, r, 2)))
        except InvalidInputError as exc:  # e.g. a zero validation gradient: every validation group has zero advantage
            fallback = str(exc)
            scores = list(engine.score(candidates, "rand", seed=stage_seed(seed, r, 2)))
        chosen = select_top(scores, mode if fallback is None else "rand", keep)
        t2 = time.perf_counter()
        groups = group_rollouts(candidates)
        reuse = {pid: groups[pid] for pid in chosen} if train["reuse_rollouts"] else None
        trainer = GRPOTrainer(
            model, tokenizer, [by_id[pid] for pid in chosen], _grpo_config(config, stage_seed(seed, r, 3)), ref_model, reuse
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
                "tracked_fraction": _mean([is_tracked(info[pid], track) for pid in chosen]),
                "chunk_tracked_fraction": _mean([is_tracked(info[p.problem_id], track) for p in chunk]),
                "selected_zero_advantage": sum(score_by_id[pid].zero_advantage for pid in chosen),
                "selected_accuracy": _mean([score_by_id[pid].accuracy for pid in chosen]),
                "chunk_accuracy": _mean([c.correct for c in candidates]),
                "val_accuracy": val_accuracy,
                "train_mean_reward": _mean([s.mean_reward for s in metrics]),
                "fallback": fallback,
                "seconds": {
                    "rollout": round(t1 - t0, 3), "score_select": round(t2 - t1, 3),
                    "train": round(t3 - t2, 3), "eval": round(time.perf_counter() - t3, 3),
                },
                "test_accuracy": evals[-1]["overall"],
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
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


# --- the benchmark ------------------------------------------------------------------------------


def run_path(results: Path, mode: str, seed: int) -> Path:
    return results / "runs" / f"{mode}-seed{seed}.json"


def load_run(path: Path, config_hash: str) -> dict | None:
    """A finished run's record when it is complete and made with this config, else None."""
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or run.get("config_hash") != config_hash or run.get("format") != RUN_FORMAT:
        return None
    return run


def run_benchmark(
    config: dict,
    results: Path,
    *,
    seeds: Sequence[int] | None = None,
    modes: Sequence[str] | None = None,
    model_cache: Path | None = None,
    progress: bool = True,
    echo=print,
) -> dict[tuple[str, int], dict]:
    """Run (or load, when already finished) every mode x seed; write the summary and the plots."""
    from tqdm import tqdm

    from gradalign_common.modeling import configure_torch_threads

    seeds = list(config["seeds"] if seeds is None else seeds)
    modes = list(config["modes"] if modes is None else modes)
    results.mkdir(parents=True, exist_ok=True)
    cache = model_cache or results / "models"
    configure_torch_threads(int(config["threads"]))
    with contextlib.suppress(ImportError):  # one progress bar: not transformers' per checkpoint load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    digest = run_hash(config)
    atomic_write_bytes(results / "config.json", json.dumps(config, indent=1).encode())
    runs: dict[tuple[str, int], dict] = {}
    todo = []
    for seed in seeds:
        for mode in modes:
            run = load_run(run_path(results, mode, seed), digest)
            if run is not None:
                runs[(mode, seed)] = run
            else:
                todo.append((mode, seed))
    rounds = config["loop"]["rounds"]
    echo(
        f"gradalign bench quality: regime {config['name']}, {len(modes)} modes x {len(seeds)} seeds; "
        f"{len(runs)} runs already finished in {results}, {len(todo)} to run"
    )
    bar = tqdm(total=len(todo) * rounds, unit="round", desc=config["name"], disable=not progress, file=sys.stderr)
    with bar:
        for mode, seed in todo:
            bar.set_postfix_str(f"{mode} seed {seed}: warm start")
            model_dir = warm_model_dir(config, seed, cache)

            def on_round(r: int, acc: float, mode=mode, seed=seed) -> None:
                bar.update(1)
                bar.set_postfix_str(f"{mode} seed {seed} round {r}/{rounds} test acc {acc:.3f}")

            run = run_one(config, mode, seed, model_dir, on_round)
            atomic_write_bytes(run_path(results, mode, seed), json.dumps(run, indent=1).encode())
            runs[(mode, seed)] = run
    write_summary(config, results, runs, modes, seeds)
    return runs


# --- summaries and plots ------------------------------------------------------------------------


def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summary_rows(runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int]) -> list[dict]:
    rows = []
    for mode in modes:
        rs = [runs[(mode, s)] for s in seeds if (mode, s) in runs]
        if not rs:
            continue
        finals = [r["accuracy"][-1] for r in rs]
        fractions = [_mean(r["tracked_fraction"]) for r in rs]
        types = list(rs[0]["per_type_accuracy"][-1])
        row = {
            "mode": mode,
            "n_seeds": len(rs),
            "initial_mean": _mean([r["accuracy"][0] for r in rs]),
            "final_mean": _mean(finals),
            "final_std": _std(finals),
            "val_final_mean": _mean([r["val_accuracy"][-1] for r in rs]),
            **{f"final_seed{r['seed']}": r["accuracy"][-1] for r in rs},
            "tracked_label": rs[0]["tracked_label"],
            "selected_fraction_mean": _mean(fractions),
            "selected_fraction_std": _std(fractions),
            "chunk_fraction_mean": _mean([_mean(r["chunk_tracked_fraction"]) for r in rs]),
            **{f"final_{t}_mean": _mean([r["per_type_accuracy"][-1][t] for r in rs]) for t in types},
            "wall_seconds_mean": _mean([r["wall_seconds"] for r in rs]),
            "fallback_rounds": sum(1 for r in rs for x in r["rounds"] if x["fallback"]),
        }
        rows.append(row)
    return rows


def paired_against(
    runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int], baseline: str = "rand"
) -> list[dict]:
    """Each mode against `baseline` on the same seeds (same start model, same test set): per-seed
    differences of final test accuracy and of the mean over rounds 1..R, their mean and sample
    standard deviation, and on how many seeds the mode ended ahead. Pure; empty without a baseline."""
    out = []
    for mode in modes:
        if mode == baseline:
            continue
        common = [s for s in seeds if (mode, s) in runs and (baseline, s) in runs]
        if not common:
            continue
        final = [runs[(mode, s)]["accuracy"][-1] - runs[(baseline, s)]["accuracy"][-1] for s in common]
        over_rounds = [
            _mean(runs[(mode, s)]["accuracy"][1:]) - _mean(runs[(baseline, s)]["accuracy"][1:]) for s in common
        ]
        out.append({
            "mode": mode,
            "baseline": baseline,
            "seeds": common,
            "final_diff": final,
            "final_diff_mean": _mean(final),
            "final_diff_std": _std(final),
            "ahead": sum(d > 0 for d in final),
            "rounds_diff_mean": _mean(over_rounds),
            "rounds_diff_std": _std(over_rounds),
            "rounds_ahead": sum(d > 0 for d in over_rounds),
        })
    return out


def write_summary(config: dict, results: Path, runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int]) -> None:
    rows = summary_rows(runs, modes, seeds)
    if not rows:
        return
    label = rows[0]["tracked_label"]
    seed_cols = [f"final_seed{s}" for s in seeds]
    type_cols = [k for k in rows[0] if k.startswith("final_") and k.endswith("_mean") and k != "final_mean"]
    columns = ["mode", "n_seeds", "initial_mean", "final_mean", "final_std", *seed_cols, "val_final_mean",
               f"{label}_selected_mean", f"{label}_selected_std", f"{label}_in_chunk_mean", *type_cols, "wall_seconds_mean",
               "fallback_rounds"]
    summary = []
    for row in rows:
        values = dict(row)
        values[f"{label}_selected_mean"] = row["selected_fraction_mean"]
        values[f"{label}_selected_std"] = row["selected_fraction_std"]
        values[f"{label}_in_chunk_mean"] = row["chunk_fraction_mean"]
        summary.append(values)
    _write_csv(results / "summary.csv", columns, summary)
    paired = paired_against(runs, modes, seeds)
    if paired:
        _write_csv(
            results / "paired.csv",
            ["mode", "baseline", "n_seeds", "final_diff_mean", "final_diff_std", "ahead", "rounds_diff_mean",
             "rounds_diff_std", "rounds_ahead", *[f"final_diff_seed{s}" for s in seeds]],
            [{**c, "n_seeds": len(c["seeds"]), **{f"final_diff_seed{s}": d for s, d in zip(c["seeds"], c["final_diff"])}}
             for c in paired],
        )
    atomic_write_bytes(results / "summary.md", summary_markdown(config, rows, seeds, label, paired).encode())
    plot_results(config, results, runs, modes, seeds, label)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """A CSV of `columns` (floats to 4 decimals, a missing value empty), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt_csv(row.get(c, "")) for c in columns])
    atomic_write_bytes(path, buf.getvalue().encode())


def _fmt_csv(v: Any) -> Any:
    return f"{v:.4f}" if isinstance(v, float) else v


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def summary_markdown(config: dict, rows: list[dict], seeds: Sequence[int], label: str, paired: Sequence[dict] = ()) -> str:
    loop, train = config["loop"], config["train"]
    lines = [
        f"# Selection quality: {config['name']}",
        "",
        " ".join(config["description"].split()) if config["description"] else "",
        "",
        f"{loop['rounds']} rounds of {loop['chunk_size']} candidates x {loop['n_samples_train']} samples, "
        f"keep {loop['chunk_size'] // loop['k']} (k={loop['k']}), {train['steps']} GRPO steps of {train['batch_size']} "
        f"problems per round (lr {train['learning_rate']}); validation {loop['n_samples_val']} samples per problem. "
        f"Held-out test accuracy (greedy, %), final round; `{label} selected` is the mean fraction of selected "
        f"problems that are {label} (`in chunk`: the fraction among the candidates, what random selection expects); "
        "`validation final`: greedy accuracy on the trusted validation set (%, mean over seeds).",
        "",
        "| mode | seeds | initial | final mean | final std | "
        + " | ".join(f"seed {s}" for s in seeds)
        + f" | validation final | {label} selected (%) | {label} in chunk (%) |",
        "|---|---|---|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['n_seeds']} | {_pct(row['initial_mean'])} | {_pct(row['final_mean'])} | "
            f"{_pct(row['final_std'])} | "
            + " | ".join(_pct(row.get(f"final_seed{s}")) if f"final_seed{s}" in row else "-" for s in seeds)
            + f" | {_pct(row['val_final_mean'])} | {_pct(row['selected_fraction_mean'])} ± {_pct(row['selected_fraction_std'])} | {_pct(row['chunk_fraction_mean'])} |"
        )
    type_cols = [k for k in rows[0] if k.startswith("final_") and k.endswith("_mean") and k != "final_mean"]
    if len(type_cols) > 1:
        types = [c[len("final_") : -len("_mean")] for c in type_cols]
        lines += ["", "Final test accuracy per type (%, mean over seeds):", "",
                  "| mode | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for row in rows:
            lines.append(f"| {row['mode']} | " + " | ".join(_pct(row[c]) for c in type_cols) + " |")
    if paired:
        lines += ["", f"Paired against {paired[0]['baseline']} (same seed: same start model and test set), in points: "
                  "the difference of final test accuracy per seed, its mean ± standard deviation, the seeds where the "
                  "mode ended ahead, and the difference of test accuracy averaged over rounds 1..R.", "",
                  "| mode | final − rand per seed | mean ± std | ahead | over rounds: mean ± std | ahead |",
                  "|---|---|---|---|---|---|"]
        for c in paired:
            n = len(c["seeds"])
            lines.append(
                f"| {c['mode']} | " + ", ".join(f"{100 * d:+.1f}" for d in c["final_diff"])
                + f" | {100 * c['final_diff_mean']:+.1f} ± {100 * c['final_diff_std']:.1f} | {c['ahead']}/{n} | "
                f"{100 * c['rounds_diff_mean']:+.1f} ± {100 * c['rounds_diff_std']:.1f} | {c['rounds_ahead']}/{n} |"
            )
    fallbacks = [f"{r['mode']} {r['fallback_rounds']}" for r in rows if r["fallback_rounds"]]
    if fallbacks:
        lines += ["", "Rounds where the mode could not score (e.g. a zero validation gradient) and selected at random "
                  "instead: " + ", ".join(fallbacks) + "."]
    lines += ["", "Mean wall time per run: " + ", ".join(f"{r['mode']} {r['wall_seconds_mean']:.0f} s" for r in rows) + ".",
              "", "Plots: `accuracy.png` (test accuracy per round and its change from round 0; mean and min-max band "
              "over seeds), "
              f"`selected_fraction.png` (fraction of {label} problems selected per round).", ""]
    return "\n".join(lines)


def plot_results(config: dict, results: Path, runs: Mapping[tuple[str, int], dict], modes: Sequence[str], seeds: Sequence[int], label: str) -> None:
    """accuracy.png: test accuracy per round (left) and its change from round 0, paired per seed (right);
    selected_fraction.png: the fraction of tracked problems selected per round. Lines are means over
    seeds, bands span the seeds' minimum to maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    chosen = {mode: [runs[(mode, s)] for s in seeds if (mode, s) in runs] for mode in modes}
    chosen = {mode: rs for mode, rs in chosen.items() if rs}

    def lines(ax, key: str, start: int, relative: bool = False) -> None:
        for mode, rs in chosen.items():
            ys = np.array([r[key] for r in rs], dtype=float) * 100
            if relative:
                ys = ys - ys[:, :1]
            xs = np.arange(start, start + ys.shape[1])
            (line,) = ax.plot(xs, ys.mean(axis=0), marker="o", markersize=3, label=f"{mode} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.1, linewidth=0)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)

    def save(fig, path: Path, bottom: float = 0.0) -> None:
        fig.tight_layout(rect=(0, bottom, 1, 1))
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    lines(left, "accuracy", 0)
    left.set_ylabel("held-out test accuracy (%)")
    left.set_title(f"{config['name']}: test accuracy (greedy)", fontsize=10)
    lines(right, "accuracy", 0, relative=True)
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_ylabel("change from round 0 (points)")
    right.set_title("change from the warm-started model, per seed", fontsize=10)
    right.legend(fontsize=8)
    fig.text(0.5, 0.01, "lines: mean over seeds; bands: min to max over seeds", fontsize=8, ha="center")
    save(fig, results / "accuracy.png", bottom=0.04)

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    lines(ax, "tracked_fraction", 1)
    everything = [r for rs in chosen.values() for r in rs]
    chunk = np.array([r["chunk_tracked_fraction"] for r in everything], dtype=float) * 100
    ax.plot(np.arange(1, 1 + chunk.shape[1]), chunk.mean(axis=0), color="grey", linestyle=":", label="in chunk (what random expects)")
    ax.set_ylabel(f"{label} problems selected (%)")
    ax.set_title(f"{config['name']}: fraction of {label} problems selected (mean, min-max band)", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, results / "selected_fraction.png")


# --- the command --------------------------------------------------------------------------------


def _parse_list(text: Optional[str], kind, what: str) -> list | None:
    if text is None:
        return None
    try:
        items = [kind(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{what}: a comma-separated list, got {text!r}") from None
    if not items:
        raise typer.BadParameter(f"{what}: empty list")
    return items


def quality_command(
    config: Path = typer.Option(..., "--config", help="regime config (YAML), e.g. benchmarks/quality/noisy_rewards.yaml"),
    results: Path = typer.Option(..., "--results", help="results folder: runs/, summary.md, summary.csv, plots"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds (default: the config's)"),
    modes: Optional[str] = typer.Option(None, "--modes", help="comma-separated selection modes (default: the config's)"),
    model_cache: Optional[Path] = typer.Option(None, "--model-cache", help="warm-started model cache (default: <results>/models); share it between regimes"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch threads (default: the config's)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Selection quality: every mode x seed through the real rollout, scoring, selection and training
    code on a regime with bad data; held-out test accuracy per round, tables and plots. Resumable."""
    from gradalign_common.selection import get_mode

    try:
        cfg = load_config(config)
        seed_list = _parse_list(seeds, int, "--seeds")
        mode_list = _parse_list(modes, str, "--modes")
        for m in mode_list or ():
            get_mode(m)
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    if threads is not None:
        cfg["threads"] = threads
    started = time.perf_counter()
    run_benchmark(cfg, results, seeds=seed_list, modes=mode_list, model_cache=model_cache, progress=progress, echo=typer.echo)
    typer.echo((results / "summary.md").read_text())
    typer.echo(f"wrote {results / 'summary.md'}, {results / 'summary.csv'}, {results / 'accuracy.png'}, "
               f"{results / 'selected_fraction.png'} in {time.perf_counter() - started:.0f} s")
