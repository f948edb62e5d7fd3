"""Shared helpers and fixtures of the trainer tests (import the fixtures a test module uses)."""

from __future__ import annotations

from pathlib import Path


from gradalign_common.prompts import encode_messages
from gradalign_common.records import Problem
from gradalign_common.tiny_model import TinyModelSpec, build_and_save

ANSWER = "7"


def constant_answer_problems(n: int, answer: str = ANSWER) -> list[Problem]:
    """n distinct prompts ("0:", "1:", ...) that all have the same exact-match answer."""
    return [
        Problem(
            problem_id=str(i),
            prompt=encode_messages([{"role": "user", "content": f"{i}:"}]),
            data_source="exact_match",
            ground_truth=answer,
        )
        for i in range(n)
    ]


def build_random_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model (no warm start): instant to build."""
    return build_and_save(out_dir, TinyModelSpec(warmup_steps=0, seed=seed))


def made_up_rollouts(tokenizer, problems, n: int, answer: str = ANSWER) -> dict[str, list]:
    """n made-up responses per problem: the first half answer `answer` (reward 1), the rest "xy" (reward 0)."""
    from gradalign_common.generation import prompt_token_ids
    from gradalign_common.prompts import render_prompt
    from gradalign_common.records import RolloutRecord

    out = {}
    for p in problems:
        prompt = tuple(prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer)])[0])
        records = []
        for j in range(n):
            text = answer if j < n // 2 else "xy"
            ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            records.append(RolloutRecord(p.problem_id, prompt, ids, reward=float(text == answer), text=text))
        out[p.problem_id] = records
    return out
