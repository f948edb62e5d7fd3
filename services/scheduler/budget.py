"""What an experiment may ask of the workers, checked when it is created (before anything is stored).

- The model's context: `max_tokens` plus the longest prompt (rendered with the model's chat template
  and tokenized, as the rollout service will) must fit `max_position_embeddings`; otherwise every
  rollout would fail, rounds later.
- The per-experiment budgets in settings: the tokens the experiment may generate over all its rounds
  (candidate and validation rollouts, and the GRPO steps' own samples), and its GRPO steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from gradalign_common.errors import FieldError
from gradalign_common.prompts import render_prompt
from gradalign_common.records import Problem
from services.scheduler.spec import ExperimentSpec

LONGEST_PROMPTS_CHECKED = 8  # tokenizing every prompt of a large pool at creation would take minutes


def model_context(model_dir: Path) -> int | None:
    """The model's context length from its config.json (None when it does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def check_context(spec: ExperimentSpec, model_dir: Path, problems: Sequence[Problem]) -> None:
    """FieldError on max_tokens when a response of max_tokens after the longest prompts cannot fit the context."""
    context = model_context(model_dir)
    if context is None:
        return
    if spec.max_tokens >= context:
        raise FieldError("max_tokens", f"max_tokens={spec.max_tokens} leaves no room for a prompt in the model's context of {context} tokens")
    from gradalign_common.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    longest = sorted(problems, key=lambda p: len(p.prompt), reverse=True)[:LONGEST_PROMPTS_CHECKED]
    for problem in longest:
        n_prompt = len(tokenizer(render_prompt(problem.prompt, tokenizer), add_special_tokens=False)["input_ids"])
        if n_prompt + spec.max_tokens > context:
            raise FieldError(
                "max_tokens",
                f"problem {problem.problem_id!r}: its prompt of {n_prompt} tokens + max_tokens={spec.max_tokens} exceeds "
                f"the model's context of {context} tokens",
            )


def generated_tokens(spec: ExperimentSpec, n_validation: int) -> int:
    """Tokens the experiment may generate over all its rounds: per round, the candidates' and the validation set's
    rollouts and the samples of each GRPO step, each up to max_tokens."""
    per_round = (
        spec.chunk_size * spec.n_samples_train
        + n_validation * spec.n_samples_val
        + spec.iters_per_select * spec.train_batch_size * spec.n_samples_train
    )
    return spec.num_selections * per_round * spec.max_tokens


def check_budget(spec: ExperimentSpec, n_validation: int, max_generated_tokens: int, max_train_steps: int) -> None:
    steps = spec.num_selections * spec.iters_per_select
    if steps > max_train_steps:
        raise FieldError(
            "iters_per_select",
            f"num_selections x iters_per_select = {steps} GRPO steps exceeds this scheduler's budget of {max_train_steps}",
        )
    tokens = generated_tokens(spec, n_validation)
    if tokens > max_generated_tokens:
        raise FieldError(
            "num_selections",
            f"the experiment may generate up to {tokens:,} tokens over its rounds, more than this scheduler's budget "
            f"of {max_generated_tokens:,} (lower num_selections, chunk_size, the samples or max_tokens)",
        )
