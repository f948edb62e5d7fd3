"""`gradalign bench quality`: does a selection mode make RL train better on bad data than random?

The package: config (defaults, checks, run hash), warm_start (the cached starting model), run
(one mode x seed), benchmark (all of them, resumable), report (tables and plots), command.

A regime is a config file (benchmarks/quality/*.yaml): a tiny Qwen2 model warm-started on the
built-in task families (gradalign_tools.bench.task_families), a training pool with some kind of
mess in it (noisy rewards, a dominant easy type, useless problems), a trusted validation set
and a held-out test set per problem type. For every mode x seed the benchmark runs the
GradAlign loop in-process through the product's own code, round by round:

1. the round's chunk of `chunk_size` pool problems (gradalign_common.round_policy, the
   scheduler's own round policy: chunks, stage seeds, selection and the zero-gradient
   fallback), `n_samples_train` responses each (gradalign_common.generation,
   rewarded by the problems' data sources, noisy ones included);
2. for modes that need it, `n_samples_val` responses per validation problem (correct rewards);
3. scores (services.scoring.engine.ScoringEngine, method exact) and the top
   chunk_size // k problems (gradalign_common.round_policy.select_round);
4. `train.steps` GRPO steps of `train.batch_size` problems on the selection
   (services.trainer.grpo.GRPOTrainer, the chunk's rollouts reused for the first step, as
   the trainer service does), so every mode gets the same training budget;
5. held-out test accuracy, greedy, per problem type and overall (a weighted mean over types).

The warm-started model is cached per (model spec, warm start, seed) in the model cache
(default <results>/models, shareable between regimes), so every mode starts from the same
weights. Each finished (mode, seed) run is written to <results>/runs/<mode>-seed<seed>.json;
a rerun skips those whose config matches and redoes the rest, so a killed benchmark resumes.
At the end it writes summary.md, summary.csv, paired.csv (each mode against rand, seed by seed),
flags.csv (suspect-reward flags against the known noisy problems, per round: quality/flags.py;
`gradalign bench quality-flags` recomputes them offline), accuracy.png and selected_fraction.png.
"""

from gradalign_tools.bench.quality.command import quality_command, quality_flags_command
from gradalign_tools.bench.quality.config import load_config, run_hash
from gradalign_tools.bench.quality.report import paired_against

__all__ = ["load_config", "paired_against", "quality_command", "quality_flags_command", "run_hash"]
