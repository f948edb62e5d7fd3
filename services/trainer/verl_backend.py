"""The `verl` training backend: our train request as a verl GRPO run in a subprocess (GPU clusters).

Targets **verl 0.9.1** (PyPI `verl==0.9.1`, installed as `verl[vllm]` with vllm 0.24.0, torch
2.11.0 and transformers 5.9.0, no flash-attn). Every key below exists in that version's
`verl/trainer/config/ppo_trainer.yaml` composed with its sub-configs (the reference listing
is `_generated_ppo_trainer.yaml`); the one key added with `+` is read by verl's workers.
tests/test_verl_config.py composes the real config with these overrides in Hydra's strict
mode and converts the actor, reference, rollout and model sections with verl's own
`omega_conf_to_dataclass`, as its workers do. Nothing here imports verl: it builds files
and argument lists, and `iter_verl`/`run_verl` execute them as subprocesses, so this
module runs without verl installed.

One request becomes:
1. the selected problems as a parquet file in verl's RL dataset format
   (`write_verl_dataset`: data_source, prompt = chat messages, ability,
   reward_model = {style: "rule", ground_truth}, extra_info = {index, split}); the
   same file serves as data.val_files, which verl requires but we never run
   (trainer.test_freq=-1, trainer.val_before_train=False);
2. `python3 -m verl.trainer.main_ppo <hydra overrides>` (`train_overrides`): GRPO
   advantages, `steps` optimizer steps of `batch_size` prompts x n responses (one
   mini-batch per step: ppo_mini_batch_size = train_batch_size, ppo_epochs = 1, as the
   torch backend), token-mean loss, the clip range on both sides, KL as a loss term with
   the low-variance (k3) estimator when kl_coef > 0, entropy bonus, AdamW lr / weight
   decay / gradient clipping (optim.clip_grad, what 0.9.1's FSDP engine clips with),
   vLLM rollouts, our reward function (services/trainer/verl_reward.py as
   reward.custom_reward_function: 0.9.1's main_ppo reads only that one; the legacy
   top-level custom_reward_function is migrated by its fully-async entry point alone),
   no resume (trainer.resume_mode=disable: a retry starts from the request's checkpoint),
   one actor checkpoint saved after the last step (trainer.save_freq=steps) under
   trainer.default_local_dir/global_step_<steps>/actor (verl/trainer/ppo/v1/trainer_base.py
   `_save_checkpoint`): model_world_size_<W>_rank_<r>.pt shards, fsdp_config.json and
   huggingface/ (config + tokenizer), written by verl/utils/checkpoint/fsdp_checkpoint_manager.py;
3. `python3 -m verl.model_merger merge --backend fsdp --local_dir <that actor dir>
   --target_dir <dir>` (`merge_command`), which writes a Hugging Face directory (weights,
   config, tokenizer) that rollout and scoring load.

Attention: 0.9.1's HFModelConfig asks transformers for `flash_attention_2` unless
`model.override_config.attn_implementation` says otherwise (verl/workers/config/model.py),
and transformers refuses to load a model so without the flash-attn package. Its default
`model.use_remove_padding=True` feeds the FSDP engine's forward one packed (padding-free)
sequence per micro-batch with no attention mask (verl/workers/engine/fsdp/transformer_impl.py),
a path built for flash-attention's variable-length kernels. The GPU stack installs no
flash-attn, so by default (VerlOptions.attn_implementation = "sdpa") we add
`+actor_rollout_ref.model.override_config.attn_implementation=sdpa` and set
`actor_rollout_ref.model.use_remove_padding=False` (padded batches with an attention mask,
the plain transformers path). With attn_implementation="flash_attention_2" (flash-attn
installed) verl's defaults stay.

The KL reference model: verl 0.9.1 builds the reference policy from the actor's model
config (verl/workers/engine_workers.py, ActorRolloutRefWorker.init_model:
`ref_config.model_config = deepcopy(model_config)`); its ref section has no model of its
own and `+actor_rollout_ref.ref.model.path` (what 0.7.0's legacy FSDP worker read) makes
the ref's dataclass conversion fail. So with this backend the reference is the actor's
initial weights, i.e. the request's starting checkpoint (`model_path`), not the run's
initial model that the torch backend uses: each round's KL anchors at that round's start.
A request whose reference differs is trained so, with a warning in the log.

Console metrics: verl's console logger prints one line per step,
`step:N - key:value - ...` (possibly prefixed by Ray's `(TaskRunner pid=...)`);
`parse_console_metrics` reads it and `step_metrics_from_verl` maps verl's keys onto our
StepMetrics.

Not supported by this backend (refused up front): sampling stop strings (verl's rollout
config has none) and exporting the optimizer state; rollout reuse is ignored (verl
samples every step itself).
"""

from __future__ import annotations

import collections
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from gradalign_common.artifacts import atomic_path
from gradalign_common.errors import InvalidInputError
from gradalign_common.logging_setup import get_logger
from gradalign_common.prompts import decode_messages
from gradalign_common.records import Problem
from gradalign_common.rewards import MATH_DATA_SOURCES, get_reward_fn
from services.trainer.grpo import GRPOConfig, StepMetrics

log = get_logger("gradalign.trainer.verl")

VERL_VERSION = "0.9.1"
TRAIN_MODULE = "verl.trainer.main_ppo"
MERGER_MODULE = "verl.model_merger"
REWARD_FILE = Path(__file__).resolve().with_name("verl_reward.py")
REWARD_FUNCTION = "compute_score"
REPO_ROOT = Path(__file__).resolve().parents[2]
# transformers' attention implementations verl's FSDP engine can load the actor/ref with;
# only flash_attention_2 needs the flash-attn package (and alone keeps verl's padding-free batches)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

VERL_DATASET_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.string()), ("split", pa.string())])),
    ]
)


class VerlRunError(RuntimeError):
    """verl or its model merger failed; the message ends with the tail of its output."""


@dataclass(frozen=True)
class VerlOptions:
    """The cluster-side knobs of a verl run (TrainerSettings.verl_options())."""

    python: str = "python3"
    n_gpus_per_node: int = 1
    nnodes: int = 1
    tensor_parallel_size: int = 1  # vLLM rollout tensor parallelism
    gpu_memory_utilization: float = 0.6  # vLLM's share of each GPU
    micro_batch_size_per_gpu: int = 4  # responses per forward/backward per GPU (at most; see micro_batch_per_gpu)
    max_prompt_length: int = 1024  # at least; raised to the longest prompt when a tokenizer is given
    attn_implementation: str = "sdpa"  # the FSDP actor/ref's attention (see the module docstring)
    extra_overrides: tuple[str, ...] = ()  # appended last, so they win

    @property
    def n_gpus(self) -> int:
        return self.n_gpus_per_node * self.nnodes

    def validate(self) -> None:
        for name in ("n_gpus_per_node", "nnodes", "tensor_parallel_size", "micro_batch_size_per_gpu"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"verl {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidInputError(f"verl gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_prompt_length < 1:
            raise InvalidInputError(f"verl max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InvalidInputError(
                f"verl attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}"
            )
        if self.n_gpus % self.tensor_parallel_size:
            raise InvalidInputError(
                f"verl tensor_parallel_size {self.tensor_parallel_size} must divide the GPU count {self.n_gpus}"
            )


# --- the dataset ---------------------------------------------------------------------------------


def ability_of(data_source: str) -> str:
    """verl's `ability` column (informational only): "math" for math data sources, else the data source."""
    return "math" if data_source in MATH_DATA_SOURCES or data_source == "arith" else data_source


def verl_record(problem: Problem, split: str = "train") -> dict:
    """One problem as a row of verl's RL dataset; extra_info.index is our problem id."""
    return {
        "data_source": problem.data_source,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in decode_messages(problem.prompt)],
        "ability": ability_of(problem.data_source),
        "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
        "extra_info": {"index": problem.problem_id, "split": split},
    }


def write_verl_dataset(path: str | Path, problems: Sequence[Problem], split: str = "train") -> Path:
    """Write problems as verl's RL dataset parquet (atomically); returns path."""
    if not problems:
        raise InvalidInputError("no problems to write")
    table = pa.Table.from_pylist([verl_record(p, split) for p in problems], schema=VERL_DATASET_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


# --- the command lines ---------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_./~+-]+")
_LOOKS_TYPED = re.compile(r"(?i)[+-]?(\d[\d_]*(\.\d*)?(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|inf|nan|true|false|null)")


def hydra_value(value) -> str:
    """A value as Hydra's override grammar reads it back (bools True/False, lists [a,b], strings quoted if needed)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"not a finite number: {value}")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if _BARE.fullmatch(text) and not _LOOKS_TYPED.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def micro_batch_per_gpu(config: GRPOConfig, options: VerlOptions) -> int:
    """Responses per forward/backward per GPU: the largest divisor of a GPU's share of the step's
    responses that is at most options.micro_batch_size_per_gpu (verl requires divisibility;
    gradient accumulation makes the choice numerically irrelevant)."""
    per_gpu = config.batch_size * config.n_samples // options.n_gpus
    cap = min(options.micro_batch_size_per_gpu, per_gpu)
    return max(d for d in range(1, cap + 1) if per_gpu % d == 0)


def check_verl_request(config: GRPOConfig, num_problems: int, options: VerlOptions) -> None:
    """Raise InvalidInputError for what verl would reject (or that we cannot express) before launching it."""
    options.validate()
    config.validate()
    if config.batch_size > num_problems:
        raise InvalidInputError(
            f"hyperparams.batch_size {config.batch_size} is larger than the selection ({num_problems} problems)"
        )
    responses = config.batch_size * config.n_samples
    if responses % options.n_gpus:
        raise InvalidInputError(
            f"verl needs batch_size x n ({config.batch_size} x {config.n_samples} = {responses}) "
            f"divisible by the GPU count ({options.n_gpus})"
        )
    if config.stop:
        raise InvalidInputError("hyperparams.sampling.stop is not supported by the verl backend")


def check_problems(problems: Sequence[Problem]) -> None:
    """Raise InvalidInputError for a selection verl would choke on minutes in: empty, duplicate ids,
    a data source our reward function (verl_reward.py) does not know."""
    if not problems:
        raise InvalidInputError("the selection is empty: no problems to train on")
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("the selection has duplicate problem ids")
    for data_source in sorted({p.data_source for p in problems}):
        get_reward_fn(data_source)


def epochs_for(steps: int, batch_size: int, num_problems: int) -> int:
    """Passes over the selection verl needs for `steps` batches (its loader drops the last partial batch)."""
    per_epoch = num_problems // batch_size
    return max(1, math.ceil(steps / per_epoch))


def train_overrides(
    config: GRPOConfig,
    *,
    model_path: str | Path,
    train_files: str | Path,
    val_files: str | Path,
    checkpoint_dir: str | Path,
    num_problems: int,
    options: VerlOptions = VerlOptions(),
    max_prompt_length: int | None = None,
    experiment_name: str = "gradalign",
) -> list[str]:
    """The Hydra overrides of verl 0.9.1's main_ppo for one train request (see the module docstring).

    The KL reference is the actor's starting weights (`model_path`): verl 0.9.1 has no
    separate reference model path."""
    check_verl_request(config, num_problems, options)
    micro = micro_batch_per_gpu(config, options)
    use_kl = config.kl_coef > 0
    prompt_length = max(options.max_prompt_length, max_prompt_length or 0)
    pairs: list[tuple[str, object]] = [
        ("algorithm.adv_estimator", "grpo"),
        ("algorithm.norm_adv_by_std_in_grpo", True),
        ("algorithm.use_kl_in_reward", False),
        ("data.train_files", str(train_files)),
        ("data.val_files", str(val_files)),
        ("data.train_batch_size", config.batch_size),
        ("data.max_prompt_length", prompt_length),
        ("data.max_response_length", config.max_tokens),
        ("data.filter_overlong_prompts", False),
        ("data.truncation", "error"),
        ("data.shuffle", True),
        ("data.seed", config.seed),
        ("actor_rollout_ref.model.path", str(model_path)),
    ]
    if options.attn_implementation != "flash_attention_2":
        pairs += [
            # read by HFModelConfig.__post_init__ (verl/workers/config/model.py); the dict is empty by default
            ("+actor_rollout_ref.model.override_config.attn_implementation", options.attn_implementation),
            # padded batches with an attention mask: verl's packed path is built for flash-attention's varlen kernels
            ("actor_rollout_ref.model.use_remove_padding", False),
        ]
    pairs += [
        ("actor_rollout_ref.actor.optim.lr", float(config.learning_rate)),
        ("actor_rollout_ref.actor.optim.weight_decay", float(config.weight_decay)),
        ("actor_rollout_ref.actor.optim.clip_grad", float(config.max_grad_norm)),
        ("actor_rollout_ref.actor.ppo_mini_batch_size", config.batch_size),
        ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", micro),
        ("actor_rollout_ref.actor.ppo_epochs", 1),
        ("actor_rollout_ref.actor.use_kl_loss", use_kl),
        ("actor_rollout_ref.actor.kl_loss_coef", float(config.kl_coef)),
        ("actor_rollout_ref.actor.kl_loss_type", "low_var_kl"),
        ("actor_rollout_ref.actor.entropy_coeff", float(config.entropy_coef)),
        ("actor_rollout_ref.actor.clip_ratio", float(config.clip_eps)),
        ("actor_rollout_ref.actor.clip_ratio_low", float(config.clip_eps)),
        ("actor_rollout_ref.actor.clip_ratio_high", float(config.clip_eps)),
        ("actor_rollout_ref.actor.loss_agg_mode", "token-mean"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode", config.policy_loss),
        ("actor_rollout_ref.actor.checkpoint.save_contents", ["model"]),
        ("actor_rollout_ref.rollout.name", "vllm"),
        ("actor_rollout_ref.rollout.n", config.n_samples),
        ("actor_rollout_ref.rollout.temperature", float(config.temperature)),
        ("actor_rollout_ref.rollout.top_p", float(config.top_p)),
        ("actor_rollout_ref.rollout.tensor_model_parallel_size", options.tensor_parallel_size),
        ("actor_rollout_ref.rollout.gpu_memory_utilization", float(options.gpu_memory_utilization)),
        ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", micro),
        ("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", micro),
        ("reward.custom_reward_function.path", str(REWARD_FILE)),
        ("reward.custom_reward_function.name", REWARD_FUNCTION),
        ("trainer.total_training_steps", config.steps),
        ("trainer.total_epochs", epochs_for(config.steps, config.batch_size, num_problems)),
        ("trainer.n_gpus_per_node", options.n_gpus_per_node),
        ("trainer.nnodes", options.nnodes),
        ("trainer.default_local_dir", str(checkpoint_dir)),
        ("trainer.save_freq", config.steps),
        ("trainer.resume_mode", "disable"),
        ("trainer.test_freq", -1),
        ("trainer.val_before_train", False),
        ("trainer.critic_warmup", 0),
        ("trainer.logger", ["console"]),
        ("trainer.project_name", "gradalign"),
        ("trainer.experiment_name", experiment_name),
    ]
    overrides = [f"{key}={hydra_value(value)}" for key, value in pairs]
    overrides.extend(options.extra_overrides)
    return overrides


def train_command(config: GRPOConfig, *, options: VerlOptions = VerlOptions(), **kwargs) -> list[str]:
    """argv of verl's GRPO trainer: [python, -m, verl.trainer.main_ppo, *train_overrides(...)]."""
    return [options.python, "-m", TRAIN_MODULE, *train_overrides(config, options=options, **kwargs)]


def actor_checkpoint_dir(checkpoint_dir: str | Path, steps: int) -> Path:
    """Where verl 0.9.1 saves the actor after step `steps` (verl/trainer/ppo/v1/trainer_base.py `_save_checkpoint`)."""
    return Path(checkpoint_dir) / f"global_step_{steps}" / "actor"


def merge_command(actor_dir: str | Path, target_dir: str | Path, python: str = "python3") -> list[str]:
    """argv of verl's model merger: FSDP actor shards -> a Hugging Face directory."""
    return [
        python,
        "-m",
        MERGER_MODULE,
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        str(actor_dir),
        "--target_dir",
        str(target_dir),
    ]


# --- one job ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerlJob:
    """Everything one verl run needs: its scratch directory, dataset, commands and where the result goes."""

    work_dir: Path
    train_files: Path
    checkpoint_dir: Path  # verl's trainer.default_local_dir
    actor_dir: Path  # checkpoint_dir/global_step_<steps>/actor
    output_dir: Path  # the Hugging Face directory the merger writes
    steps: int
    train_command: list[str]
    merge_command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the subprocesses' environment


def max_prompt_tokens(problems: Sequence[Problem], tokenizer) -> int:
    """The longest prompt in tokens, as verl renders it (the chat template with the generation prompt)."""
    from gradalign_common.prompts import render_prompt

    return max(len(tokenizer(render_prompt(p.prompt, tokenizer), add_special_tokens=False)["input_ids"]) for p in problems)


def prepare_job(
    problems: Sequence[Problem],
    config: GRPOConfig,
    *,
    model_path: str | Path,
    output_dir: str | Path,
    work_dir: str | Path,
    options: VerlOptions = VerlOptions(),
    reference_path: str | Path | None = None,
    tokenizer=None,
    experiment_name: str = "gradalign",
) -> VerlJob:
    """Write the dataset under work_dir and build both commands; nothing runs yet.

    `reference_path` (the KL reference the request names) cannot be honoured by verl 0.9.1:
    its reference policy is the actor's starting weights, `model_path` (module docstring).
    A different one is logged and otherwise ignored."""
    check_problems(problems)
    check_verl_request(config, len(problems), options)
    if config.kl_coef > 0 and reference_path is not None and Path(reference_path) != Path(model_path):
        log.warning(
            "verl_reference_is_the_starting_checkpoint",
            requested=str(reference_path),
            used=str(model_path),
            reason=f"verl {VERL_VERSION} builds its reference policy from the actor's model",
        )
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    train_files = write_verl_dataset(work_dir / "train.parquet", problems)
    checkpoint_dir = work_dir / "verl-checkpoints"
    actor_dir = actor_checkpoint_dir(checkpoint_dir, config.steps)
    prompt_length = max_prompt_tokens(problems, tokenizer) if tokenizer is not None else None
    command = train_command(
        config,
        options=options,
        model_path=model_path,
        train_files=train_files,
        val_files=train_files,
        checkpoint_dir=checkpoint_dir,
        num_problems=len(problems),
        max_prompt_length=prompt_length,
        experiment_name=experiment_name,
    )
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return VerlJob(
        work_dir=work_dir,
        train_files=train_files,
        checkpoint_dir=checkpoint_dir,
        actor_dir=actor_dir,
        output_dir=Path(output_dir),
        steps=config.steps,
        train_command=command,
        merge_command=merge_command(actor_dir, output_dir, options.python),
        env={"PYTHONPATH": pythonpath, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"},
    )


def new_work_dir(root: str | Path, name: str) -> Path:
    """A fresh scratch directory named like an atomic_path temporary (`.NAME-verl.tmp-xxxxxxxx`), so the
    start-up sweep removes it if the trainer is killed mid-run."""
    return Path(root) / f".{name}-verl.tmp-{uuid.uuid4().hex[:8]}"


# --- console metrics ----------------------------------------------------------------------------

_STEP_LINE = re.compile(r"(?:^|\s)step:(\d+) - (.*)$")
_NUMBER = re.compile(r"^(?:np\.\w+\(|numpy\.\w+\(|tensor\()?\s*([-+]?(?:\d[\d.]*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf|nan))\s*\)?$")


def parse_console_metrics(line: str) -> dict[str, float] | None:
    """The metrics of one verl console line `step:N - key:value - ...` (step included), or None."""
    m = _STEP_LINE.search(line.rstrip("\r\n"))
    if not m:
        return None
    metrics: dict[str, float] = {"step": float(m.group(1))}
    for part in m.group(2).split(" - "):
        key, sep, raw = part.rpartition(":")
        if not sep or not key:
            continue
        number = _NUMBER.match(raw.strip())
        if number:
            metrics[key.strip()] = float(number.group(1))
    return metrics


def step_metrics_from_verl(
    metrics: dict[str, float], config: GRPOConfig, n_gpus: int = 1
) -> StepMetrics | None:
    """Our StepMetrics from one step's verl metrics; None unless it carries a training update.

    loss = actor/pg_loss + kl_coef x actor/kl_loss - entropy_coef x actor/entropy (verl logs
    the terms apart); tokens/s = response tokens of the step / its wall time (timing_s/step),
    else verl's perf/throughput (all tokens per GPU-second) x GPUs.
    """
    if "actor/pg_loss" not in metrics:
        return None
    get = metrics.get
    kl = get("actor/kl_loss", 0.0)
    entropy = get("actor/entropy", 0.0)
    response_length = get("response_length/mean", 0.0)
    seconds = get("timing_s/step", 0.0)
    responses = config.batch_size * config.n_samples
    if seconds > 0:
        tokens_per_second = response_length * responses / seconds
    else:
        tokens_per_second = get("perf/throughput", 0.0) * n_gpus
    return StepMetrics(
        step=int(metrics["step"]),
        loss=metrics["actor/pg_loss"] + config.kl_coef * kl - config.entropy_coef * entropy,
        mean_reward=get("critic/score/mean", get("critic/rewards/mean", 0.0)),
        kl=kl,
        grad_norm=get("actor/grad_norm", 0.0),
        entropy=entropy,
        response_length=response_length,
        tokens_per_second=tokens_per_second,
        clip_fraction=get("actor/pg_clipfrac", 0.0),
    )


# --- running it ---------------------------------------------------------------------------------

ShouldStop = Callable[[], bool]


# Runs first in the child (a fresh interpreter, so nothing of the trainer's threads is inherited):
# asks Linux to SIGKILL it when the trainer dies (prctl PR_SET_PDEATHSIG survives exec), gives up
# if the trainer is already gone, then becomes the real command.
_LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """argv behind a launcher that ties its life to the trainer's (Linux), so a killed trainer does not
    leave verl holding the GPUs; argv unchanged elsewhere. Best effort: it covers verl's driver process
    (and with it the Ray cluster it started, which ends with its driver), not processes that detach."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]


class _Process:
    """A subprocess in its own session whose merged output is read line by line on a thread."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: Path, tail_lines: int = 60):
        self.argv = list(argv)
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            _with_parent_death_signal(self.argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(cwd),
            env={**os.environ, **env},
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stop() ends verl's children too
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def output(self, should_stop: ShouldStop | None, deadline: float | None) -> Iterator[str]:
        """Yield output lines until the process closes its output; stop it on should_stop or the deadline."""
        while True:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if should_stop is not None and should_stop():
                    self.stop()
                    raise VerlRunError(f"cancelled: {self.argv[2] if len(self.argv) > 2 else self.argv[0]}")
                if deadline is not None and time.monotonic() > deadline:
                    self.stop()
                    raise VerlRunError(f"timed out: {' '.join(self.argv[:3])}\n" + "\n".join(self.tail))
                continue
            if line is None:
                return
            line = line.rstrip("\r\n")
            self.tail.append(line)
            yield line

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after grace_s."""
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def _run_checked(
    argv: Sequence[str],
    job: VerlJob,
    what: str,
    should_stop: ShouldStop | None,
    deadline: float | None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    proc = _Process(argv, job.env, job.work_dir)
    try:
        for line in proc.output(should_stop, deadline):
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    except BaseException:
        proc.stop()
        raise
    if code != 0:
        raise VerlRunError(f"{what} exited with status {code}; last output:\n" + "\n".join(proc.tail))


def iter_verl(
    job: VerlJob,
    config: GRPOConfig,
    n_gpus: int = 1,
    should_stop: ShouldStop | None = None,
    timeout_s: float | None = None,
) -> Iterator[StepMetrics]:
    """Run verl's trainer (yielding each step's metrics as its console prints them), then the merger.

    On success job.output_dir is a Hugging Face directory. Raises VerlRunError when either
    command fails, verl leaves no actor checkpoint, the deadline passes or should_stop()
    turns true (the subprocess group is then terminated).
    """
    deadline = time.monotonic() + timeout_s if timeout_s else None
    log.info("verl_started", command=" ".join(job.train_command[:3]), work_dir=str(job.work_dir))
    proc = _Process(job.train_command, job.env, job.work_dir)
    try:
        for line in proc.output(should_stop, deadline):
            parsed = parse_console_metrics(line)
            if parsed is None:
                continue
            metrics = step_metrics_from_verl(parsed, config, n_gpus)
            if metrics is not None:
                yield metrics
        code = proc.wait()
    except BaseException:  # including GeneratorExit: the consumer went away
        proc.stop()
        raise
    if code != 0:
        raise VerlRunError(f"verl exited with status {code}; last output:\n" + "\n".join(proc.tail))
    if not job.actor_dir.is_dir():
        raise VerlRunError(f"verl finished without an actor checkpoint at {job.actor_dir}")
    _run_checked(job.merge_command, job, "verl model merger", should_stop, deadline)
    if not (job.output_dir / "config.json").is_file():
        raise VerlRunError(f"the model merger wrote no Hugging Face config to {job.output_dir}")
    log.info("verl_finished", output=str(job.output_dir))


def run_verl(
    job: VerlJob,
    config: GRPOConfig,
    n_gpus: int = 1,
    on_step: Callable[[StepMetrics], None] | None = None,
    should_stop: ShouldStop | None = None,
    timeout_s: float | None = None,
) -> list[StepMetrics]:
    """iter_verl to the end; returns the step metrics (on_step is called with each as it arrives)."""
    history = []
    for metrics in iter_verl(job, config, n_gpus, should_stop, timeout_s):
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
    return history
