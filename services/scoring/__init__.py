"""The scoring service: scores candidate problems by the alignment of their GRPO gradients
with a validation gradient (shared/spec/gradalign-score.md).

- score_request: score one request (the service, the `gradalign score` command and the
  benchmark all go through it); gradient_source: whether and from what a request needs g_V.
- engine: the scoring engine (ScoringEngine): exact scores at the cost of one training step
  over the candidates' tokens, optional Adam preconditioning, approximate methods by name.
- methods: the registry of scoring-method implementations (exact, exact-loop, project[-K],
  top-layers[-N], fewer-responses[-M]; their names in gradalign_common.scoring_methods).
- the core of exact scoring, batched: layout (where a model's trainable parameters live),
  batching (groups packed into batches), passes (one forward and backward, with hooks),
  head_loss (lm_head's logits and their gradient in chunks of tokens), exact_collector (each
  group's exact signals from the hooks), head_signals (a group's lm_head statistics, dense in
  vocabulary slices or token-Gram); projection (the project method); exact_loop (one backward
  per group: exact's reference and fallback).
- memory: memory_budget (a budget in bytes or as a fraction of the device's memory),
  memory_plan (the model's cost model and the batch plan within a budget), cpu_allocator (large
  CPU blocks from the system, so a process's memory follows the plan).
- groups (GRPO groups and loss weights), loss (the scored loss), score_records (signals to
  ScoreRecords; modes without gradients).
- server: the gRPC ScoringService (scorer replicas for the benchmark: gradalign_tools.bench.replicas).
- cli: the `gradalign score` command. settings: the service's settings (GRADALIGN_SCORING_*).
Selection modes and ranking live in gradalign_common.selection; the optimizer state file in
gradalign_common.optimizer_state; the benchmark in gradalign_tools.bench.scoring.
"""
