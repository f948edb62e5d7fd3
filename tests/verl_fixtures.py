"""Shared helpers of the verl backend tests (test_verl_*.py): the sample request and cluster that
the verl commands are built for."""

from __future__ import annotations

from services.trainer.backends.verl.options import VerlOptions
from services.trainer.grpo import GRPOConfig

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
