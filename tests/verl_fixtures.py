"""Shared helpers of the verl backend tests (test_verl_*.py): the sample request and cluster that
the verl commands are built for, and a job prepared for constant-answer problems."""

from __future__ import annotations

from pathlib import Path

from services.trainer.backends.verl.job import VerlJob, prepare_job
from services.trainer.backends.verl.options import VerlOptions
from services.trainer.grpo import GRPOConfig
from trainer_fixtures import constant_answer_problems

# a round's GRPO request with every loss term on (KL, entropy, clipping, weight decay)
SAMPLE = GRPOConfig(
    steps=4,
    batch_size=8,
    n_samples=8,
    learning_rate=1e-6,
    clip_eps=0.28,
    kl_coef=0.001,
    entropy_coef=0.001,
    max_grad_norm=1.0,
    max_tokens=3072,
    temperature=1.0,
    top_p=0.95,
    seed=7,
    weight_decay=0.01,
)
# one node of 8 GPUs, the rollouts tensor-parallel over 2
CLUSTER = VerlOptions(n_gpus_per_node=8, nnodes=1, tensor_parallel_size=2, gpu_memory_utilization=0.6, micro_batch_size_per_gpu=4)
# a request the tiny test model runs in moments: 2 steps of 2 problems, 2 samples each, 4 new tokens
TINY_REQUEST = GRPOConfig(steps=2, batch_size=2, n_samples=2, learning_rate=1e-6, max_tokens=4)


def prepare_test_job(config: GRPOConfig, checkpoint: Path, tmp_path: Path, n_problems: int = 4, work_dir: str = "work", **kwargs) -> VerlJob:
    """`prepare_job` for `n_problems` constant-answer problems trained from `checkpoint`: the model is
    written to tmp_path/"out", the dataset and verl's checkpoints under tmp_path/work_dir; `kwargs` go
    to prepare_job (options, reference_path, tokenizer, experiment_name)."""
    return prepare_job(
        constant_answer_problems(n_problems),
        config,
        model_path=checkpoint,
        output_dir=tmp_path / "out",
        work_dir=tmp_path / work_dir,
        **kwargs,
    )
