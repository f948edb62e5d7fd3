"""Trainer service: GRPO updates on the selected problems from a checkpoint, writing the next checkpoint.

Modules: grpo (the torch GRPO loop), losses (policy-loss registry, k3 KL, entropy),
server (gRPC Train, atomic idempotent checkpoints), reuse (the scoring stage's rollouts as
the first step's batch), retention (keep-last/keep-best pruning, start-up sweep of
temporaries; the module is gradalign_common.checkpoint_retention), verl_backend + verl_reward
(verl 0.9.1 as a subprocess for GPU clusters),
settings (GRADALIGN_TRAINER_*).
"""
