"""The scoring service: scores candidate problems by the alignment of their GRPO gradients
with a validation gradient (shared/spec/gradalign-score.md).

- engine: the exact scoring engine (ScoringEngine) and model loading.
- server: the gRPC ScoringService.
- cli: the `gradalign score` command.
- settings: the service's settings (GRADALIGN_SCORING_*).
Selection modes and ranking live in gradalign_common.selection.
"""
