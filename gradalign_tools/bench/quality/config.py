"""A quality regime's config: its schema and defaults (pydantic), a YAML file read over them, the checks
that need the registries (problem types, rewards, modes), and the run hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


from pydantic import BaseModel, ConfigDict, ValidationError

from gradalign_common.errors import InvalidInputError


RUN_FORMAT = 1  # bump when a run's JSON or the loop changes meaning: older run files are redone


# a number as written: an int stays an int (the run hash of a config does not change with the parser)
Number = int | float


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """The tiny Qwen2 (gradalign_common.tiny_model.TinyModelSpec's architecture fields)."""

    hidden_size: int = 96  # residual width
    num_layers: int = 3  # decoder layers
    num_heads: int = 4  # attention heads of hidden_size / num_heads each
    num_kv_heads: int = 2  # key/value heads (grouped-query attention)
    intermediate_size: int = 288  # MLP width
    max_positions: int = 32  # prompt + response tokens at most


class WarmStart(_Section):
    mixture: dict[str, Number] = {"add2": 1.0}
    steps: int = 1600  # at most this many steps
    batch_size: int = 64
    learning_rate: Number = 3e-3
    until: dict[str, Number] = {}  # type -> accuracy on its validation reserve that ends the warm start early
    check_every: int = 100


class Noise(_Section):
    rate: Number = 0.0
    rewards: dict[str, Number] = {"arith_inverted": 1.0}
    types: list[str] = []


class Track(_Section):
    label: str = "noisy"
    noisy: bool = True
    types: list[str] = []


class Data(_Section):
    pool_size: int = 1024
    pool_mixture: dict[str, Number] = {"add2": 1.0}
    noise: Noise = Noise()
    validation: dict[str, int] = {"add2": 32}
    test: dict[str, int] = {"add2": 128}
    test_weights: dict[str, Number] = {}  # type -> weight of its accuracy in the overall accuracy; default: by count
    track: Track = Track()


class SkipDeadSection(_Section):
    """Skipping dead problems before rollout (gradalign_common.round_policy.draw_chunk; the scheduler's skip_dead)."""

    enabled: bool = False
    base: Number = 0.5  # skip probability after one zero-advantage round
    cap: Number = 0.9  # the largest skip probability (< 1)


class Loop(_Section):
    rounds: int = 8  # each: rollout, score, select, train
    chunk_size: int = 128  # candidates per round (M)
    k: int = 4  # keep M / k of them
    n_samples_train: int = 8  # responses per candidate
    n_samples_val: int = 8  # responses per validation problem
    max_tokens: int = 5  # per response
    temperature: Number = 1.0
    top_p: Number = 1.0
    generation_batch_size: int = 128  # problems per generate call
    scoring_method: str = "exact"  # a name parse_method accepts (gradalign_common.scoring_methods)
    skip_dead: SkipDeadSection = SkipDeadSection()


class Train(_Section):
    steps: int = 4
    batch_size: int = 16
    learning_rate: Number = 1e-4
    clip_eps: Number = 0.2
    kl_coef: Number = 0.0
    entropy_coef: Number = 0.0
    weight_decay: Number = 0.0
    micro_batch_size: int = 64
    policy_loss: str = "vanilla"
    reuse_rollouts: bool = True


class Eval(_Section):
    max_tokens: int = 5
    batch_size: int = 256


class RegimeConfig(_Section):
    """A regime file's schema: every key has a default; a file sets what differs. Mappings of problem types
    (mixtures, validation/test counts, weights, `until`, noise rewards) are replaced whole, not merged."""

    name: str = ""
    description: str = ""
    threads: int = 1
    model: ModelSection = ModelSection()
    warm_start: WarmStart = WarmStart()
    data: Data = Data()
    loop: Loop = Loop()
    train: Train = Train()
    eval: Eval = Eval()
    modes: list[str] = ["sim", "dot", "align", "accgreedy", "rand"]
    seeds: list[int] = [0, 1, 2]


DEFAULTS: dict[str, Any] = RegimeConfig().model_dump()


# keys whose value does not change a (mode, seed) run's outcome
_NOT_IN_RUN_HASH = ("name", "description", "threads", "modes", "seeds")


def parse_config(raw: dict) -> dict:
    """`raw` (a regime file's mapping) over the defaults, as a plain dict; InvalidInputError naming the key."""
    try:
        return RegimeConfig.model_validate(raw).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise InvalidInputError(f"config: unknown key {where}") from None
        raise InvalidInputError(f"config: {where}: {error['msg']}") from None


def read_yaml_mapping(path: str | Path, what: str, missing: str) -> dict:
    """The YAML (or JSON) mapping in `path` (empty file: {}); InvalidInputError `missing: path` when there is no
    such file, or naming the file when it is not YAML or not a mapping (`the {what} must be a mapping`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{missing}: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{path}: the {what} must be a mapping")
    return raw


def load_config(path: str | Path) -> dict:
    """A regime config (YAML or JSON) merged over DEFAULTS and checked; InvalidInputError naming the defect."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config", "config file not found")
    config = parse_config(raw)
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
    try:
        skip_setting(config)
    except ValueError as exc:
        raise InvalidInputError(f"config: loop.skip_dead: {exc}") from None
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


def skip_setting(config: dict):
    """loop.skip_dead as the round policy's SkipDead (ValueError on a bad base or cap)."""
    from gradalign_common.round_policy import SkipDead

    skip = config["loop"]["skip_dead"]
    return SkipDead(enabled=bool(skip["enabled"]), base=float(skip["base"]), cap=float(skip["cap"]))


def run_hash(config: dict) -> str:
    """Identity of a run's inputs: the config minus names, threads, modes and seeds. loop.skip_dead counts only when
    it is not the default (off), so runs made before the key existed keep their hash."""
    hashed = {k: v for k, v in config.items() if k not in _NOT_IN_RUN_HASH}
    if "loop" in hashed and hashed["loop"].get("skip_dead") == SkipDeadSection().model_dump():
        hashed["loop"] = {k: v for k, v in hashed["loop"].items() if k != "skip_dead"}
    return digest({"format": RUN_FORMAT, **hashed})
