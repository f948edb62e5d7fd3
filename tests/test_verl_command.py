"""The commands the verl backend (services/trainer/backends/verl) runs, without verl installed.

The train command for a sample request is checked against the expected argument list, and its
variants (no KL, the attention implementation, extra overrides, quoting) and batch checks; the
model-merger command and where verl 0.9.1 leaves the actor checkpoint; `prepare_job`, which writes
the dataset and both commands for a request. That the real verl 0.9.1 accepts these commands is
tests/test_verl_config.py's job.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from gradalign_common.errors import InvalidInputError
from services.trainer.backends.verl.checks import check_verl_request
from services.trainer.backends.verl.command import (
    REWARD_FILE,
    VERL_VERSION,
    actor_checkpoint_dir,
    epochs_for,
    hydra_value,
    merge_command,
    micro_batch_per_gpu,
    train_command,
)
from services.trainer.backends.verl.job import max_prompt_tokens
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.grpo import GRPOConfig
from services.trainer.settings import TrainerSettings
from trainer_fixtures import constant_answer_problems
from verl_fixtures import CLUSTER, SAMPLE, TINY_REQUEST, prepare_test_job


def sample_kwargs(**overrides) -> dict:
    """train_command's keyword arguments (beside the request) for round 4 of a sample experiment."""
    kwargs = dict(
        options=CLUSTER,
        model_path="/ckpt/round-00003",
        train_files="/scratch/job/train.parquet",
        val_files="/scratch/job/train.parquet",
        checkpoint_dir="/scratch/job/verl-checkpoints",
        num_problems=20,
        experiment_name="round-00004",
    )
    kwargs.update(overrides)
    return kwargs


def sample_command(**overrides) -> list[str]:
    return train_command(SAMPLE, **sample_kwargs(**overrides))


# --- the train command -------------------------------------------------------------------------------


def test_the_train_command_for_a_sample_request():
    assert VERL_VERSION == "0.9.1"
    assert sample_command() == [
        "python3",
        "-m",
        "verl.trainer.main_ppo",
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=True",
        "algorithm.use_kl_in_reward=False",
        "data.train_files=/scratch/job/train.parquet",
        "data.val_files=/scratch/job/train.parquet",
        "data.train_batch_size=8",
        "data.max_prompt_length=1024",
        "data.max_response_length=3072",
        "data.filter_overlong_prompts=False",
        "data.truncation=error",
        "data.shuffle=True",
        "data.seed=7",
        "actor_rollout_ref.model.path=/ckpt/round-00003",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.actor.optim.lr=1e-06",
        "actor_rollout_ref.actor.optim.weight_decay=0.01",
        "actor_rollout_ref.actor.optim.clip_grad=1.0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.ppo_epochs=1",
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.actor.kl_loss_coef=0.001",
        "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.actor.entropy_coeff=0.001",
        "actor_rollout_ref.actor.clip_ratio=0.28",
        "actor_rollout_ref.actor.clip_ratio_low=0.28",
        "actor_rollout_ref.actor.clip_ratio_high=0.28",
        "actor_rollout_ref.actor.loss_agg_mode=token-mean",
        "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model]",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.top_p=0.95",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.6",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        f"reward.custom_reward_function.path={REWARD_FILE}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.total_training_steps=4",
        "trainer.total_epochs=2",
        "trainer.n_gpus_per_node=8",
        "trainer.nnodes=1",
        "trainer.default_local_dir=/scratch/job/verl-checkpoints",
        "trainer.save_freq=4",
        "trainer.resume_mode=disable",
        "trainer.test_freq=-1",
        "trainer.val_before_train=False",
        "trainer.critic_warmup=0",
        "trainer.logger=[console]",
        "trainer.project_name=gradalign",
        "trainer.experiment_name=round-00004",
    ]


def test_command_variants():
    no_kl = train_command(dataclasses.replace(SAMPLE, kl_coef=0.0), **sample_kwargs())
    assert "actor_rollout_ref.actor.use_kl_loss=False" in no_kl
    # no separate reference model in verl 0.9.1 (the reference is the starting checkpoint)
    assert not any("actor_rollout_ref.ref.model" in a for a in [*no_kl, *sample_command()])
    # with flash-attn in verl's environment, verl's attention defaults stay (flash_attention_2, no padding)
    flash = sample_command(options=dataclasses.replace(CLUSTER, attn_implementation="flash_attention_2"))
    assert not any("attn_implementation" in a or "use_remove_padding" in a for a in flash)
    assert [a for a in sample_command() if a not in flash] == [
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
    ]
    eager = sample_command(options=dataclasses.replace(CLUSTER, attn_implementation="eager"))
    assert "+actor_rollout_ref.model.override_config.attn_implementation=eager" in eager
    with pytest.raises(InvalidInputError, match="attn_implementation"):
        sample_command(options=dataclasses.replace(CLUSTER, attn_implementation="flash_attention_3"))
    # the longest prompt raises max_prompt_length; extra overrides come last; odd strings are quoted
    extra = dataclasses.replace(CLUSTER, python="/opt/verl/bin/python", extra_overrides=("trainer.device=npu",))
    cmd = sample_command(options=extra, max_prompt_length=2048, model_path="/ckpt/a b,c", experiment_name="it's")
    assert cmd[0] == "/opt/verl/bin/python" and cmd[-1] == "trainer.device=npu"
    assert "data.max_prompt_length=2048" in cmd
    assert "actor_rollout_ref.model.path='/ckpt/a b,c'" in cmd
    assert "trainer.experiment_name='it\\'s'" in cmd


def test_settings_reach_the_command():
    options = TrainerSettings(verl_attn_implementation="eager", verl_n_gpus_per_node=2).verl_options()
    assert options.attn_implementation == "eager" and options.n_gpus == 2
    assert VerlOptions().attn_implementation == "sdpa"


def test_hydra_values():
    assert [hydra_value(v) for v in (True, False, 3, 0.5, 1e-6, ["console"], [])] == [
        "True",
        "False",
        "3",
        "0.5",
        "1e-06",
        "[console]",
        "[]",
    ]
    assert hydra_value("/a/b-c_d.parquet") == "/a/b-c_d.parquet"
    assert hydra_value("123") == "'123'" and hydra_value("true") == "'true'" and hydra_value("null") == "'null'"
    assert hydra_value("a=b") == "'a=b'" and hydra_value("") == "''"
    with pytest.raises(InvalidInputError):
        hydra_value(float("nan"))


def test_batch_checks_and_micro_batches():
    assert micro_batch_per_gpu(SAMPLE, CLUSTER) == 4  # 64 responses / 8 GPUs = 8 per GPU
    assert micro_batch_per_gpu(dataclasses.replace(SAMPLE, batch_size=3), dataclasses.replace(CLUSTER, n_gpus_per_node=2)) == 4
    assert micro_batch_per_gpu(dataclasses.replace(SAMPLE, batch_size=3, n_samples=6), VerlOptions(micro_batch_size_per_gpu=4)) == 3
    assert micro_batch_per_gpu(SAMPLE, VerlOptions(micro_batch_size_per_gpu=1000)) == 64
    assert epochs_for(4, 8, 20) == 2 and epochs_for(1, 8, 8) == 1 and epochs_for(5, 2, 5) == 3
    cases = [
        (dataclasses.replace(SAMPLE, batch_size=3, n_samples=2), CLUSTER, 20, "divisible by the GPU count"),
        (SAMPLE, CLUSTER, 7, "larger than the selection"),
        (dataclasses.replace(SAMPLE, stop=("\n",)), CLUSTER, 20, "stop is not supported"),
        (SAMPLE, dataclasses.replace(CLUSTER, tensor_parallel_size=3), 20, "must divide the GPU count"),
        (SAMPLE, dataclasses.replace(CLUSTER, gpu_memory_utilization=0.0), 20, "gpu_memory_utilization"),
    ]
    for config, options, n, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            check_verl_request(config, n, options)


# --- the merge command -------------------------------------------------------------------------------


def test_merge_command_and_checkpoint_layout():
    actor = actor_checkpoint_dir("/scratch/job/verl-checkpoints", 4)
    assert actor == Path("/scratch/job/verl-checkpoints/global_step_4/actor")
    assert merge_command(actor, "/ckpt/.round-00004.tmp-1234abcd") == [
        "python3",
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        "/scratch/job/verl-checkpoints/global_step_4/actor",
        "--target_dir",
        "/ckpt/.round-00004.tmp-1234abcd",
    ]


# --- a job: the dataset and both commands ------------------------------------------------------------


def test_prepare_job_writes_the_dataset_and_both_commands(tmp_path, random_tiny_checkpoint):
    from gradalign_common.modeling import load_tokenizer

    tokenizer = load_tokenizer(random_tiny_checkpoint)
    job = prepare_test_job(TINY_REQUEST, random_tiny_checkpoint, tmp_path, options=VerlOptions(max_prompt_length=1), tokenizer=tokenizer)
    assert job.train_files == tmp_path / "work" / "train.parquet" and job.train_files.exists()
    assert job.actor_dir == tmp_path / "work" / "verl-checkpoints" / "global_step_2" / "actor"
    assert job.merge_command[-3:] == [str(job.actor_dir), "--target_dir", str(tmp_path / "out")]
    longest = max_prompt_tokens(constant_answer_problems(4), tokenizer)
    assert longest > 1 and f"data.max_prompt_length={longest}" in job.train_command  # raised to the longest prompt
    assert job.env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(REWARD_FILE).parents[2])


def test_a_reference_other_than_the_starting_checkpoint_is_logged_not_passed(tmp_path, random_tiny_checkpoint, capsys, caplog):
    config = GRPOConfig(steps=1, batch_size=2, n_samples=2, learning_rate=1e-6, max_tokens=4, kl_coef=0.01)
    job = prepare_test_job(config, random_tiny_checkpoint, tmp_path, reference_path=tmp_path / "the-runs-initial-model")
    assert "actor_rollout_ref.actor.use_kl_loss=True" in job.train_command
    assert not any("actor_rollout_ref.ref.model" in a for a in job.train_command)
    # structlog prints to stdout, or goes through stdlib logging once a command in this process configured it
    assert "verl_reference_is_the_starting_checkpoint" in capsys.readouterr().out + caplog.text
