"""Batched sampling with transformers' generate, and turning samples into rewarded rollouts.

Prompts are sorted by length (so a batch carries little padding), left-padded into batches
of `batch_size` prompts, and each prompt is sampled n times in the same generate call
(num_return_sequences), with the KV cache on. Results come back in the input order. A
batch's samples are deterministic for (seed, batch index), so a call is deterministic for
(seed, prompts, batch_size). Used by the rollout service (hf backend) and by the trainer for
its on-policy rollouts. `sample_responses_unbatched` (one generate call per response) is the
baseline that `gradalign bench rollout` compares against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gradalign_common.prompts import decode_messages, render_prompt
from gradalign_common.records import Problem, RolloutRecord
from gradalign_common.rewards import BatchJudge, RewardItem, get_reward_fn, score_batch


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled, the same for every backend (vLLM's SamplingParams, HF generate)."""

    n: int = 1  # responses per prompt
    max_tokens: int = 16  # new tokens per response at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept; 1 = all
    seed: int = 0  # the call's seed; each generate batch's torch seed is batch_seed(seed, batch index)
    stop: tuple[str, ...] = ()  # strings that end a response (the token completing one is kept)


@dataclass(frozen=True)
class Sample:
    """One sampled response: its token ids (EOS kept when it ended there), text and finish reason."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_tokens)


ProgressFn = Callable[[int, int], None]
Response = tuple[list[int], str]  # (response token ids, finish reason "stop" | "length")


def prompt_token_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of one generate batch: distinct per (seed, batch) and within int64."""
    return (seed * 1_000_003 + batch_index) % (2**63 - 1)


def length_sorted_batches(lengths: Sequence[int], batch_size: int, sort_by_length: bool = True) -> list[list[int]]:
    """Indices grouped into batches of at most batch_size, longest prompts first (stable) when sorting."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort_by_length else list(range(len(lengths)))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _generate(model, input_ids: torch.Tensor, attention: torch.Tensor, sampling: Sampling, n: int, eos_id, pad_id):
    do_sample = sampling.temperature > 0
    kwargs = dict(temperature=sampling.temperature, top_p=sampling.top_p) if do_sample else {}
    return model.generate(
        input_ids=input_ids, attention_mask=attention, eos_token_id=eos_id, pad_token_id=pad_id,
        max_new_tokens=sampling.max_tokens, num_return_sequences=n, do_sample=do_sample, top_k=None, **kwargs,
        use_cache=True,
    )


def _seeded(device: torch.device):
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@torch.inference_mode()
def sample_responses(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    sampling: Sampling,
    batch_size: int = 32,
    sort_by_length: bool = True,
    progress: ProgressFn | None = None,
) -> list[list[Response]]:
    """For each prompt (in input order), sampling.n (response_ids, finish_reason); response ids end
    at EOS (kept), at the first stop string, or at max_tokens. The caller's torch RNG is left as it was."""
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    out: list[list[Response] | None] = [None] * len(prompt_ids)
    batches = length_sorted_batches([len(p) for p in prompt_ids], batch_size, sort_by_length)
    done = 0
    for b, idx in enumerate(batches):
        chunk = [prompt_ids[i] for i in idx]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids) :] = 1
        with _seeded(device):
            torch.manual_seed(batch_seed(sampling.seed, b))
            generated = _generate(model, input_ids.to(device), attention.to(device), sampling, sampling.n, eos_id, pad_id)
        rows = generated[:, width:].cpu().tolist()
        for i, original in enumerate(idx):
            out[original] = [
                cut_response(rows[i * sampling.n + j], eos_id, tokenizer, sampling.stop) for j in range(sampling.n)
            ]
        done += len(idx)
        if progress:
            progress(done, len(prompt_ids))
    return out  # type: ignore[return-value]


@torch.inference_mode()
def sample_responses_unbatched(
    model, tokenizer, prompt_ids: Sequence[Sequence[int]], sampling: Sampling
) -> list[list[Response]]:
    """The naive baseline: one generate call per response (batch of one, no padding)."""
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for p, ids in enumerate(prompt_ids):
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        attention = torch.ones_like(input_ids)
        samples = []
        for j in range(sampling.n):
            with _seeded(device):
                torch.manual_seed(batch_seed(sampling.seed, p * sampling.n + j))
                row = _generate(model, input_ids, attention, sampling, 1, eos_id, pad_id)[0, len(ids) :].cpu().tolist()
            samples.append(cut_response(row, eos_id, tokenizer, sampling.stop))
        out.append(samples)
    return out


def cut_response(row: list[int], eos_id: int, tokenizer, stop: Sequence[str] = ()) -> Response:
    """Trim generated ids after EOS (kept; finish "stop") or after the token that completes the
    first stop string (finish "stop"); otherwise all of them (finish "length")."""
    if eos_id in row:
        ids, reason = row[: row.index(eos_id) + 1], "stop"
    else:
        ids, reason = row, "length"
    stops = [s for s in stop if s]
    if stops:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if any(s in text for s in stops):
            lo, hi = 1, len(ids)  # the shortest prefix whose text contains a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s in tokenizer.decode(ids[:mid], skip_special_tokens=True) for s in stops):
                    hi = mid
                else:
                    lo = mid + 1
            return ids[:lo], "stop"
    return ids, reason


def problem_text(problem: Problem) -> str:
    """The problem's prompt as plain text (the chat messages' contents), for a model judge."""
    return "\n".join(m["content"] for m in decode_messages(problem.prompt))


def reward_items(problem: Problem, samples: Sequence[Sample], with_problem_text: bool) -> list[RewardItem]:
    """What the reward registry scores for one problem's samples (the problem's text only for a model judge)."""
    text = problem_text(problem) if with_problem_text else ""
    return [RewardItem(problem.data_source, s.text, problem.ground_truth, text) for s in samples]


def rollout_records(
    problems: Sequence[Problem],
    prompt_ids: Sequence[Sequence[int]],
    samples: Sequence[Sequence[Sample]],
    rewards: Sequence[Sequence[tuple[float, bool]]],
) -> list[RolloutRecord]:
    """Rewarded rollouts, grouped by problem in order: problem i's prompt, its samples and their (reward, correct)."""
    return [
        RolloutRecord(
            problem_id=problem.problem_id,
            prompt_ids=tuple(prompt),
            response_ids=tuple(sample.token_ids),
            reward=reward,
            correct=correct,
            text=sample.text,
            finish_reason=sample.finish_reason,
        )
        for problem, prompt, ss, rs in zip(problems, prompt_ids, samples, rewards)
        for sample, (reward, correct) in zip(ss, rs)
    ]


def generate_rollouts(
    model,
    tokenizer,
    problems: Sequence[Problem],
    sampling: Sampling,
    batch_size: int = 32,
    progress: ProgressFn | None = None,
    judge: BatchJudge | None = None,
) -> list[RolloutRecord]:
    """Sample sampling.n responses per problem and reward each; records grouped by problem, in order (the
    in-process counterpart of the rollout service's Generate, for the trainer and the benchmarks)."""
    for p in problems:  # fail before any generation on an unknown data_source
        get_reward_fn(p.data_source)
    ids = prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer) for p in problems])
    responses = sample_responses(model, tokenizer, ids, sampling, batch_size=batch_size, progress=progress)
    samples = [
        [Sample(tuple(r), tokenizer.decode(r, skip_special_tokens=True), finish) for r, finish in rs] for rs in responses
    ]
    scores = iter(score_batch([item for p, ss in zip(problems, samples) for item in reward_items(p, ss, judge is not None)], judge=judge))
    rewards = [[next(scores) for _ in ss] for ss in samples]
    return rollout_records(problems, ids, samples, rewards)
