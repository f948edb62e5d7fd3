"""The scoring service: scores candidate problems by the alignment of their GRPO gradients
with a validation gradient (shared/spec/gradalign-score.md).

- engine: the scoring engine (ScoringEngine): exact scores at the cost of one training step
  over the candidates' tokens, optional Adam preconditioning, approximate methods by name.
- pergroup: per-group gradient statistics from batched forward/backward passes (hooks).
- the scoring methods by name (gradalign_common.scoring_methods: exact, exact-loop, project[-K], top-layers[-N], fewer-responses[-M]).
- server: the gRPC ScoringService.
- replicas: scorer processes, and a round sharded over them.
- cli: the `gradalign score` command.
- settings: the service's settings (GRADALIGN_SCORING_*).
Selection modes and ranking live in gradalign_common.selection; the optimizer state file in
gradalign_common.optimizer_state; the benchmark in services.bench.scoring.
"""
