"""The command lines of a verl run: verl 0.9.1's GRPO trainer with our Hydra overrides, then its model merger.

Targets **verl 0.9.1** (PyPI `verl==0.9.1`, installed as `verl[vllm]` with vllm 0.24.0, torch
2.11.0 and transformers 5.9.0, no flash-attn). Every key below exists in that version's
`verl/trainer/config/ppo_trainer.yaml` composed with its sub-configs (the reference listing
is `_generated_ppo_trainer.yaml`); the one key added with `+` is read by verl's workers.
tests/test_verl_config.py composes the real config with these overrides in Hydra's strict
mode and converts the actor, reference, rollout and model sections with verl's own
`omega_conf_to_dataclass`, as its workers do. Nothing here imports verl.

`python3 -m verl.trainer.main_ppo <hydra overrides>` (`train_overrides`): GRPO
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
huggingface/ (config + tokenizer), written by verl/utils/checkpoint/fsdp_checkpoint_manager.py.
Then `python3 -m verl.model_merger merge --backend fsdp --local_dir <that actor dir>
--target_dir <dir>` (`merge_command`) writes a Hugging Face directory (weights, config,
tokenizer) that rollout and scoring load.

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
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from gradalign_common.errors import InvalidInputError
from services.trainer.backends.verl.checks import check_verl_request
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.grpo import GRPOConfig

VERL_VERSION = "0.9.1"
TRAIN_MODULE = "verl.trainer.main_ppo"
MERGER_MODULE = "verl.model_merger"
# verl loads the reward file by path, outside our package (services/trainer/verl_reward.py)
REWARD_FILE = Path(__file__).resolve().parents[2] / "verl_reward.py"
REWARD_FUNCTION = "compute_score"

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
    """The Hydra overrides of verl 0.9.1's main_ppo for one train request (see this module's docstring).

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
