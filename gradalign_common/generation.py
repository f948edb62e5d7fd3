"""Batched sampling with transformers' generate, and turning samples into rewarded rollouts.

Prompts are left-padded into one batch and each is sampled n times in the same
generate call (num_return_sequences), with the KV cache on. A batch's samples are
deterministic for (seed, batch index). Used by the rollout service (hf backend) and
by the trainer for its on-policy rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gradalign_common.prompts import render_prompt
from gradalign_common.records import Problem, RolloutRecord
from gradalign_common.rewards import compute_reward, get_reward_fn


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


ProgressFn = Callable[[int, int], None]


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, batch_size: int = 32
) -> list[list[tuple[list[int], str]]]:
    """For each prompt, sampling.n (response_ids, finish_reason); response ids end at EOS (kept) or max_tokens."""
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[tuple[list[int], str]]] = []
    for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        torch.manual_seed(sampling.seed * 1_000_003 + b)
        do_sample = sampling.temperature > 0
        kwargs = dict(temperature=sampling.temperature, top_p=sampling.top_p) if do_sample else {}
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=sampling.max_tokens,
            do_sample=do_sample,
            num_return_sequences=sampling.n,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            use_cache=True,
            top_k=None,
            **kwargs,
        )[:, width:].cpu()
        for i in range(len(chunk)):
            samples = []
            for j in range(sampling.n):
                row = generated[i * sampling.n + j].tolist()
                samples.append(_cut_response(row, eos_id, pad_id, tokenizer, sampling.stop))
            out.append(samples)
    return out


def _cut_response(row: list[int], eos_id: int, pad_id: int, tokenizer, stop: Sequence[str]) -> tuple[list[int], str]:
    if eos_id in row:
        ids, reason = row[: row.index(eos_id) + 1], "stop"
    else:
        ids, reason = row, "length"
    if stop:
        for k in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:k], skip_special_tokens=True)
            if any(s and text.endswith(s) for s in stop):
                return ids[:k], "stop"
    return ids, reason


def generate_rollouts(
    model,
    tokenizer,
    problems: Sequence[Problem],
    sampling: Sampling,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
) -> list[RolloutRecord]:
    """Sample sampling.n responses per problem and reward each; records grouped by problem, in order."""
    for p in problems:  # fail before any generation on an unknown data_source
        get_reward_fn(p.data_source)
    records: list[RolloutRecord] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start : start + batch_size]
        ids = prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer) for p in batch])
        chunk_sampling = Sampling(**{**sampling.__dict__, "seed": sampling.seed + start})
        samples = sample_responses(model, tokenizer, ids, chunk_sampling, batch_size=len(batch))
        for problem, prompt, responses in zip(batch, ids, samples):
            for response_ids, finish in responses:
                text = tokenizer.decode(response_ids, skip_special_tokens=True)
                reward, correct = compute_reward(problem.data_source, text, problem.ground_truth)
                records.append(
                    RolloutRecord(
                        problem_id=problem.problem_id,
                        prompt_ids=tuple(prompt),
                        response_ids=tuple(response_ids),
                        reward=reward,
                        correct=correct,
                        text=text,
                        finish_reason=finish,
                    )
                )
        if progress:
            progress(min(start + batch_size, len(problems)), len(problems))
    return records
