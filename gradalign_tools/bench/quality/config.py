"""A quality regime's config: the defaults, merging a YAML file over them, the checks, and the run hash."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any


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
    from gradalign_tools.bench import noisy_rewards  # noqa: F401 - registers the noisy data sources
    from gradalign_common.rewards import get_reward_fn
    from gradalign_common.selection import get_mode
    from gradalign_tools.bench.task_families import get_type

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
    grpo_config(config, seed=0).validate()
    model_spec(config, seed=0)


def model_spec(config: dict, seed: int):
    from gradalign_common.tiny_model import TinyModelSpec

    known = {f.name for f in fields(TinyModelSpec)}
    extra = set(config["model"]) - known
    if extra:
        raise InvalidInputError(f"config: unknown model key(s) {', '.join(sorted(extra))}; known: {', '.join(sorted(known))}")
    ws = config["warm_start"]
    return TinyModelSpec(
        **config["model"], warmup_steps=ws["steps"], batch_size=ws["batch_size"], learning_rate=ws["learning_rate"], seed=seed
    )


def grpo_config(config: dict, seed: int):
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


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_hash(config: dict) -> str:
    """Identity of a run's inputs: the config minus names, threads, modes and seeds."""
    return digest({"format": RUN_FORMAT, **{k: v for k, v in config.items() if k not in _NOT_IN_RUN_HASH}})
