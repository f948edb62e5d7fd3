"""Trainer service: GRPO updates on the selected problems from a checkpoint, writing the next checkpoint.

Modules: server (gRPC Train: validation, idempotency, the request gate, cancellation), plan
(TrainPlan, a validated request), marker (the gradalign-train.json record that makes retries
idempotent), backends (the training backends chosen by settings.backend: backends.torch runs
grpo in process, backends.verl runs verl 0.9.1 as subprocesses for GPU clusters, with
verl_reward as its reward function), grpo (the torch GRPO loop), losses (policy-loss registry,
k3 KL, entropy), reuse (the scoring stage's rollouts as the first step's batch), settings
(GRADALIGN_TRAINER_*). Checkpoint retention and the start-up sweep of temporaries live in
gradalign_common.checkpoint_retention.
"""
