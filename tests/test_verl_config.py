"""verl 0.9.1 itself accepts what services/trainer/backends/verl builds (no GPU needed).

verl's trainer cannot run on CPU, but its config tree, config dataclasses, custom reward
loader and model-merger argparse can. These tests need verl 0.9.1, hydra-core and omegaconf
in the test environment (`.venv/bin/python -m pip install --no-deps -r
requirements/verl-config.txt`, done by the Makefile) and fail, never skip, without them.

1. Our overrides compose with the installed verl's `verl/trainer/config/ppo_trainer.yaml` in
   Hydra's strict mode (an unknown key fails), for several requests and cluster shapes.
2. The composed config then goes through what verl 0.9.1 does with it before any GPU work:
   `validate_config` (verl/trainer/main_ppo.py main), `OmegaConf.resolve` (TaskRunnerV1.run)
   and the `omega_conf_to_dataclass` conversions of ActorRolloutRefWorker.init_model
   (verl/workers/engine_workers.py) for the model, reference, actor, rollout and checkpoint
   engine, so a key that Hydra accepts but a worker rejects fails here (the old
   `+actor_rollout_ref.ref.model.path` is such a key); our values must arrive in the dataclasses.
3. verl's reward loader finds our reward function where we put it, and the model merger's
   own argparse (verl/model_merger/base_model_merger.py) accepts our merge command.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

from services.trainer.backends.verl.command import (
    REWARD_FILE,
    VERL_VERSION,
    actor_checkpoint_dir,
    merge_command,
    micro_batch_per_gpu,
    train_command,
)
from services.trainer.backends.verl.options import VerlOptions
from verl_fixtures import SAMPLE, prepare_test_job

REQUIREMENTS = "requirements/verl-config.txt"

# the verl tests' sample request, with a gradient clip and a temperature away from the defaults (so the
# checks below see them arrive)
REQUEST = dataclasses.replace(SAMPLE, max_grad_norm=0.5, temperature=0.9)
CLUSTERS = {
    "1gpu": VerlOptions(n_gpus_per_node=1),
    "8gpu-tp2": VerlOptions(n_gpus_per_node=8, tensor_parallel_size=2, gpu_memory_utilization=0.5),
    "2x4gpu-tp4": VerlOptions(n_gpus_per_node=4, nnodes=2, tensor_parallel_size=4, micro_batch_size_per_gpu=2),
}


@pytest.fixture(scope="module")
def verl_config_dir() -> Path:
    """verl's `trainer/config` directory, from the installed package; fails (not skips) without verl/hydra."""
    missing = [m for m in ("verl", "hydra", "omegaconf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not importable: install verl's config packages with "
            f"`.venv/bin/python -m pip install --no-deps -r {REQUIREMENTS}`",
            pytrace=False,
        )
    try:
        import verl
        import verl.trainer.ppo.core_algos  # noqa: F401
        import verl.utils.config  # noqa: F401
        import verl.workers.config  # noqa: F401
    except ImportError as error:
        pytest.fail(f"verl does not import ({error}); install {REQUIREMENTS} with pip --no-deps", pytrace=False)
    assert verl.__version__ == VERL_VERSION, f"verl {verl.__version__} installed, {REQUIREMENTS} pins {VERL_VERSION}"
    config_dir = Path(importlib.util.find_spec("verl").submodule_search_locations[0]) / "trainer" / "config"
    assert (config_dir / "ppo_trainer.yaml").is_file(), config_dir
    return config_dir


@pytest.fixture(autouse=True)
def _quiet_hydra_instantiate():
    # hydra-core 1.4 warns on every instantiate() of a _target_ without a whitelist (verl's own calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def compose(config_dir: Path, overrides: list[str]):
    """ppo_trainer composed with overrides, as `python -m verl.trainer.main_ppo <overrides>` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = hydra_compose(config_name="ppo_trainer", overrides=overrides)
    assert OmegaConf.is_struct(cfg)  # strict: an override of a key the tree lacks (without `+`) fails
    return cfg


def as_verl_runs_it(cfg):
    """What verl 0.9.1 does with the composed config before touching a GPU; returns the dataclasses.

    main_ppo.main: validate_config; TaskRunnerV1.run: OmegaConf.resolve; then
    ActorRolloutRefWorker.init_model (verl/workers/engine_workers.py) on config.actor_rollout_ref.
    """
    from omegaconf import OmegaConf, open_dict
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    # need_reference_policy / need_critic (verl/trainer/ppo/utils.py; that module needs `datasets`)
    use_reference_policy = bool(cfg.algorithm.use_kl_in_reward or cfg.actor_rollout_ref.actor.use_kl_loss)
    assert cfg.critic.enable is None and cfg.algorithm.adv_estimator == "grpo"  # -> need_critic is False
    validate_config(cfg, use_reference_policy=use_reference_policy, use_critic=False)
    OmegaConf.resolve(cfg)
    out = {"algorithm": omega_conf_to_dataclass(cfg.algorithm)}
    arr = copy.deepcopy(cfg.actor_rollout_ref)
    out["model"] = model_config = omega_conf_to_dataclass(arr.model)
    if use_reference_policy:  # role actor_rollout_ref
        with open_dict(arr.ref):
            arr.ref.ppo_mini_batch_size = arr.actor.ppo_mini_batch_size
            arr.ref.ppo_micro_batch_size = arr.ref.pop("log_prob_micro_batch_size", None)
            arr.ref.ppo_micro_batch_size_per_gpu = arr.ref.pop("log_prob_micro_batch_size_per_gpu", None)
            arr.ref.use_dynamic_bsz = arr.ref.pop("log_prob_use_dynamic_bsz", False)
            arr.ref.ppo_max_token_len_per_gpu = arr.ref.pop("log_prob_max_token_len_per_gpu", None)
        out["ref"] = ref_config = omega_conf_to_dataclass(arr.ref)
        ref_config.model_config = copy.deepcopy(model_config)  # the reference IS the actor's model
    out["actor"] = actor_config = omega_conf_to_dataclass(arr.actor)
    actor_config.model_config = model_config
    assert arr.actor.use_dynamic_bsz == arr.rollout.log_prob_use_dynamic_bsz
    assert arr.rollout.log_prob_micro_batch_size_per_gpu is not None
    assert arr.actor.ppo_micro_batch_size_per_gpu is not None
    out["rollout"] = omega_conf_to_dataclass(arr.rollout)
    out["checkpoint_engine"] = omega_conf_to_dataclass(arr.rollout.checkpoint_engine)
    return out


def overrides_of(argv: list[str]) -> list[str]:
    assert argv[1:3] == ["-m", "verl.trainer.main_ppo"]
    return argv[3:]


def test_the_installed_hydra_composes_verls_tree_as_verl_lists_it(verl_config_dir):
    """verl ships the fully composed default config (_generated_ppo_trainer.yaml, made with its own
    Hydra); the Hydra/OmegaConf pair of requirements/verl-config.txt must compose the same tree."""
    from omegaconf import OmegaConf

    ours = OmegaConf.to_container(compose(verl_config_dir, []), resolve=False)
    ours.pop("model_engine")  # the defaults-list selector, dropped from verl's listing
    listed = OmegaConf.to_container(OmegaConf.load(verl_config_dir / "_generated_ppo_trainer.yaml"), resolve=False)
    assert ours == listed


def test_the_service_command_composes_and_converts_as_verl_workers_do(verl_config_dir, random_tiny_checkpoint, tmp_path):
    """A request with KL and a reference other than the starting checkpoint, as the service builds it."""
    from verl.utils.model import get_hf_auto_model_class
    from verl.workers.config import FSDPActorConfig, HFModelConfig, RolloutConfig

    options = CLUSTERS["8gpu-tp2"]
    job = prepare_test_job(
        REQUEST,
        random_tiny_checkpoint,
        tmp_path,
        n_problems=20,
        options=options,
        reference_path=tmp_path / "the-runs-initial-model",
        experiment_name="round-00004",
    )
    overrides = overrides_of(job.train_command)
    assert not any("actor_rollout_ref.ref.model" in o for o in overrides)  # verl 0.9.1 has no separate reference path
    cfg = compose(verl_config_dir, overrides)
    dc = as_verl_runs_it(cfg)
    micro = micro_batch_per_gpu(REQUEST, options)

    algorithm = dc["algorithm"]
    assert algorithm.adv_estimator == "grpo" and algorithm.norm_adv_by_std_in_grpo is True
    assert algorithm.use_kl_in_reward is False

    model = dc["model"]
    assert isinstance(model, HFModelConfig) and model.path == str(random_tiny_checkpoint)
    assert model.use_remove_padding is False and model.hf_config._attn_implementation == "sdpa"
    # the FSDP engine loads the actor/ref this way (verl/workers/engine/fsdp/transformer_impl.py
    # _build_module): with sdpa it needs no flash-attn
    module = get_hf_auto_model_class(hf_config=model.hf_config).from_pretrained(
        pretrained_model_name_or_path=model.local_path, config=model.hf_config
    )
    assert type(module).__name__ == model.architectures[0] and module.config._attn_implementation == "sdpa"

    actor = dc["actor"]
    assert isinstance(actor, FSDPActorConfig)
    assert actor.optim.lr == pytest.approx(1e-6) and actor.optim.weight_decay == pytest.approx(0.01)
    assert actor.optim.clip_grad == pytest.approx(0.5)  # what the FSDP engine clips with
    assert actor.clip_ratio == actor.clip_ratio_low == actor.clip_ratio_high == pytest.approx(0.28)
    assert actor.loss_agg_mode == "token-mean" and actor.policy_loss.loss_mode == "vanilla"
    assert actor.use_kl_loss is True and actor.kl_loss_type == "low_var_kl"
    assert actor.kl_loss_coef == pytest.approx(0.001) and actor.entropy_coeff == pytest.approx(0.001)
    assert actor.ppo_mini_batch_size == 8 and actor.ppo_micro_batch_size_per_gpu == micro and actor.ppo_epochs == 1
    assert actor.rollout_n == 8 and list(actor.checkpoint.save_contents) == ["model"]

    ref = dc["ref"]
    assert isinstance(ref, FSDPActorConfig) and ref.ppo_micro_batch_size_per_gpu == micro
    assert ref.model_config.path == str(random_tiny_checkpoint)  # the reference = the starting checkpoint

    rollout = dc["rollout"]
    assert isinstance(rollout, RolloutConfig) and rollout.name == "vllm"
    assert rollout.n == 8 and rollout.temperature == pytest.approx(0.9) and rollout.top_p == pytest.approx(0.95)
    assert rollout.tensor_model_parallel_size == 2 and rollout.gpu_memory_utilization == pytest.approx(0.5)
    assert rollout.log_prob_micro_batch_size_per_gpu == micro
    assert rollout.prompt_length == 1024 and rollout.response_length == 3072

    assert cfg.data.train_batch_size == 8 and cfg.data.train_files == str(job.train_files)
    assert cfg.trainer.total_training_steps == 4 and cfg.trainer.save_freq == 4
    assert cfg.trainer.n_gpus_per_node == 8 and cfg.trainer.nnodes == 1
    assert cfg.trainer.default_local_dir == str(job.checkpoint_dir) and cfg.trainer.resume_mode == "disable"
    assert list(cfg.trainer.logger) == ["console"] and cfg.trainer.use_v1 is True
    assert job.actor_dir == actor_checkpoint_dir(job.checkpoint_dir, 4)


PLAIN = dict(kl_coef=0.0, entropy_coef=0.0, clip_eps=0.2, max_grad_norm=1.0, top_p=1.0, batch_size=4, n_samples=4)


@pytest.mark.parametrize(
    "variant, cluster",
    [
        (dict(), "1gpu"),
        (dict(kl_coef=0.0), "8gpu-tp2"),
        (dict(entropy_coef=0.0), "2x4gpu-tp4"),
        (dict(kl_coef=0.0, entropy_coef=0.0), "1gpu"),
        (PLAIN, "2x4gpu-tp4"),
        (dict(PLAIN, kl_coef=0.05), "8gpu-tp2"),
    ],
    ids=["kl+entropy-1gpu", "no-kl-8gpu", "no-entropy-8gpu-2nodes", "neither-1gpu", "plain-8gpu-2nodes", "plain-kl-8gpu"],
)
def test_request_variants_compose_and_convert(verl_config_dir, random_tiny_checkpoint, cluster, variant):
    config = dataclasses.replace(REQUEST, **variant)
    options = CLUSTERS[cluster]
    argv = train_command(
        config,
        options=options,
        model_path=random_tiny_checkpoint,
        train_files="/scratch/train.parquet",
        val_files="/scratch/train.parquet",
        checkpoint_dir="/scratch/verl-checkpoints",
        num_problems=20,
        max_prompt_length=2048,
    )
    cfg = compose(verl_config_dir, overrides_of(argv))
    dc = as_verl_runs_it(cfg)
    actor, rollout = dc["actor"], dc["rollout"]
    assert ("ref" in dc) == (config.kl_coef > 0) and actor.use_kl_loss == (config.kl_coef > 0)
    assert actor.entropy_coeff == pytest.approx(config.entropy_coef)
    assert actor.clip_ratio_low == actor.clip_ratio_high == pytest.approx(config.clip_eps)
    assert actor.optim.clip_grad == pytest.approx(config.max_grad_norm)
    assert actor.ppo_micro_batch_size_per_gpu == micro_batch_per_gpu(config, options)
    assert rollout.n == config.n_samples and rollout.top_p == pytest.approx(config.top_p)
    assert rollout.tensor_model_parallel_size == options.tensor_parallel_size and rollout.prompt_length == 2048
    assert cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes == options.n_gpus


def test_flash_attention_keeps_verls_attention_defaults(verl_config_dir, random_tiny_checkpoint):
    argv = train_command(
        REQUEST,
        options=VerlOptions(attn_implementation="flash_attention_2"),
        model_path=random_tiny_checkpoint,
        train_files="/t.parquet",
        val_files="/t.parquet",
        checkpoint_dir="/c",
        num_problems=20,
    )
    assert not any("attn_implementation" in a or "use_remove_padding" in a for a in argv)
    model = as_verl_runs_it(compose(verl_config_dir, overrides_of(argv)))["model"]
    assert model.hf_config._attn_implementation == "flash_attention_2" and model.use_remove_padding is True


def _sample_overrides(model_path) -> list[str]:
    return overrides_of(
        train_command(
            REQUEST,
            options=CLUSTERS["1gpu"],
            model_path=model_path,
            train_files="/t.parquet",
            val_files="/t.parquet",
            checkpoint_dir="/c",
            num_problems=20,
        )
    )


def test_keys_verl_rejects_fail_here(verl_config_dir, random_tiny_checkpoint):
    """The checks above can fail: an unknown key fails composition; the 0.7.0-era reference path passes
    Hydra (`+`) but fails the reference worker's dataclass conversion."""
    from hydra.errors import ConfigCompositionException

    overrides = _sample_overrides(random_tiny_checkpoint)
    with pytest.raises(ConfigCompositionException):
        compose(verl_config_dir, [*overrides, "actor_rollout_ref.actor.not_a_verl_key=1"])
    assert [o for o in overrides if o.startswith("+")] == ["+actor_rollout_ref.model.override_config.attn_implementation=sdpa"]
    with pytest.raises(ConfigCompositionException):  # a key verl's tree lacks: `+` is needed
        compose(verl_config_dir, [o.lstrip("+") for o in overrides])
    cfg = compose(verl_config_dir, [*overrides, "+actor_rollout_ref.ref.model.path=/models/initial"])
    with pytest.raises(Exception, match="unexpected keyword argument 'model'"):
        as_verl_runs_it(cfg)


def test_verl_loads_our_reward_function_from_where_we_put_it(verl_config_dir, random_tiny_checkpoint):
    """0.9.1's reward loop (verl/experimental/reward_loop -> verl/trainer/ppo/reward.py load_reward_manager)
    reads reward.custom_reward_function; the legacy top-level custom_reward_function is only migrated by the
    fully-async entry point, so main_ppo would silently fall back to verl's built-in scorers."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = compose(verl_config_dir, _sample_overrides(random_tiny_checkpoint))
    OmegaConf.resolve(cfg)
    assert cfg.reward.custom_reward_function.path == str(REWARD_FILE)
    score = get_custom_reward_fn(cfg)
    assert score is not None
    # called as verl's naive reward manager calls it (verl/experimental/reward_loop/reward_manager/naive.py)
    extra = {"index": "1", "split": "train", "num_turns": None, "rollout_reward_scores": {}}
    assert score(data_source="exact_match", solution_str="7", ground_truth="7", extra_info=extra) == 1.0
    assert score(data_source="arith", solution_str="12", ground_truth="13", extra_info=extra) == 0.0

    legacy = compose(verl_config_dir, ["custom_reward_function.path=" + str(REWARD_FILE), "custom_reward_function.name=compute_score"])
    assert get_custom_reward_fn(legacy) is None


def test_verls_model_merger_accepts_our_merge_command(verl_config_dir, tmp_path, monkeypatch):
    from verl.model_merger.base_model_merger import generate_config_from_args, parse_args

    actor = actor_checkpoint_dir(tmp_path / "verl-checkpoints", 4)
    target = tmp_path / "merged"
    argv = merge_command(actor, target, python=sys.executable)
    assert argv[1:3] == ["-m", "verl.model_merger"]
    monkeypatch.setattr(sys, "argv", ["verl.model_merger", *argv[3:]])
    config = generate_config_from_args(parse_args())
    assert config.operation == "merge" and config.backend == "fsdp"
    assert config.local_dir == str(actor) and config.target_dir == str(target)
    assert config.hf_model_config_path == str(actor / "huggingface")  # where verl's FSDP checkpoint puts config + tokenizer
    assert config.hf_upload is False

    monkeypatch.setattr(sys, "argv", ["verl.model_merger", *argv[3:], "--not-a-flag"])
    with pytest.raises(SystemExit):
        parse_args()
