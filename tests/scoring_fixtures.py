"""Shared test helpers for the scoring tests: a tiny random Qwen2 model, random rollouts, and an
independent plain-autograd computation of the spec's scores (shared/spec/gradalign-score.md).

Import what a test needs with `from scoring_fixtures import ...`.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import torch
import transformers

from gradalign_common.records import RolloutRecord

VOCAB_SIZE = 32


def tiny_qwen2(seed: int = 0, tied: bool = True, pad_token_id: int | None = None, vocab_size: int = VOCAB_SIZE,
               hidden_size: int = 32) -> transformers.Qwen2ForCausalLM:
    """A tiny random Qwen2 causal LM, with tied embeddings unless told otherwise."""
    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=128,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).eval()


def save_tiny_qwen2(directory: Path, seed: int = 0) -> Path:
    tiny_qwen2(seed).save_pretrained(directory)
    return directory


def random_rollouts(seed: int, n_problems: int, prefix: str = "p", vocab: int = VOCAB_SIZE) -> list[RolloutRecord]:
    """Random rollouts, records of a problem interleaved with others'.

    Groups have 1 to 4 responses with uneven prompt and response lengths; problem 0 is a
    zero-advantage group (all correct), problem 1 a group of one (also zero advantage),
    and the others have mixed 0/1 or fractional rewards.
    """
    rng = random.Random(seed)
    records = []
    for i in range(n_problems):
        pid = f"{prefix}{i:02d}"
        if i == 0:
            rewards = [1.0, 1.0, 1.0]
        elif i == 1:
            rewards = [rng.choice([0.0, 1.0])]
        elif i % 3 == 0:
            rewards = [round(rng.random(), 3) for _ in range(rng.randint(2, 4))]
        else:
            n = rng.randint(2, 4)
            rewards = [1.0] + [0.0] + [rng.choice([0.0, 1.0]) for _ in range(n - 2)]
        prompt_len = rng.randint(1, 6)
        prompt = tuple(rng.randrange(vocab) for _ in range(prompt_len))
        for reward in rewards:
            response = tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 7)))
            records.append(RolloutRecord(problem_id=pid, prompt_ids=prompt, response_ids=response, reward=reward))
    rng.shuffle(records)
    return records


# An independent computation of the spec, one response at a time without padding.


# The shared scoring setup of the engine, methods and preconditioning tests (import the fixtures by name).


def reference_advantages(rewards: list[float]) -> list[float]:
    n = len(rewards)
    if n == 1:
        return [0.0]
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1))
    return [(r - mean) / (std + 1e-6) for r in rewards]


def _groups(rollouts: list[RolloutRecord]) -> dict[str, list[RolloutRecord]]:
    groups: dict[str, list[RolloutRecord]] = {}
    for r in rollouts:
        groups.setdefault(r.problem_id, []).append(r)
    return groups


class ReferenceScorer:
    """The spec's losses and gradients with plain autograd on a float64 copy of a model.

    `inverse` (one tensor per parameter, model.parameters() order), when given, preconditions every
    gradient: g * inverse, i.e. g / (sqrt(v_hat) + eps).
    """

    def __init__(self, model: torch.nn.Module, inverse: list[torch.Tensor] | None = None):
        self.model = copy.deepcopy(model).double().eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.inverse = None if inverse is None else torch.cat([t.double().reshape(-1) for t in inverse])

    def _summed_log_prob(self, record: RolloutRecord) -> torch.Tensor:
        ids = torch.tensor([list(record.prompt_ids) + list(record.response_ids)])
        logits = self.model(input_ids=ids).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        start = len(record.prompt_ids)
        return sum(log_probs[start + t - 1, tok] for t, tok in enumerate(record.response_ids))

    def _flat_grad(self, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)])
        return flat if self.inverse is None else flat * self.inverse

    def group_gradient(self, records: list[RolloutRecord], advantages: list[float]) -> torch.Tensor:
        """grad of -sum_j A_j sum_t log p_jt / (sum_j |response_j|) for the given records and advantages."""
        total = torch.zeros((), dtype=torch.float64)
        for record, adv in zip(records, advantages):
            if adv != 0.0:
                total = total - adv * self._summed_log_prob(record)
        return self._flat_grad(total / sum(len(r.response_ids) for r in records))

    def offsets(self) -> list[tuple[int, int]]:
        """(start, stop) of each parameter in a flat gradient."""
        out, start = [], 0
        for p in self.params:
            out.append((start, start + p.numel()))
            start += p.numel()
        return out

    def _loss(self, groups: list[list[RolloutRecord]]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        n_tokens = 0
        for group in groups:
            for record, adv in zip(group, reference_advantages([r.reward for r in group])):
                n_tokens += len(record.response_ids)
                if adv != 0.0:
                    total = total - adv * self._summed_log_prob(record)
        return total / n_tokens

    def validation_gradient(self, validation: list[RolloutRecord]) -> torch.Tensor:
        g = self._flat_grad(self._loss(list(_groups(validation).values())))
        return g / g.norm()

    def scores(
        self, candidates: list[RolloutRecord], validation: list[RolloutRecord], restrict: torch.Tensor | None = None
    ) -> dict[str, dict]:
        """Per problem: cosine, dot, accuracy, zero_advantage, n_responses. `restrict` (a boolean mask over
        the flat gradient) keeps only some parameters' coordinates (g_V normalised over those)."""
        g_v = self._flat_grad(self._loss(list(_groups(validation).values())))
        if restrict is not None:
            g_v = g_v[restrict]
        g_v = g_v / g_v.norm()
        out = {}
        for pid, group in _groups(candidates).items():
            rewards = [r.reward for r in group]
            zero = all(abs(a) < 1e-6 for a in reference_advantages(rewards))
            cosine = dot = 0.0
            if not zero:
                g = self._flat_grad(self._loss([group]))
                if restrict is not None:
                    g = g[restrict]
                dot = float(g @ g_v)
                cosine = dot / float(g.norm())
            out[pid] = {
                "cosine": cosine,
                "dot": dot,
                "accuracy": sum(r > 0.5 for r in rewards) / len(rewards),
                "zero_advantage": zero,
                "n_responses": len(group),
            }
        return out


def expected_score(mode: str, ref: dict) -> float:
    """A mode's score from a reference entry, as the spec and the registry define it."""
    acc = ref["accuracy"]
    return {
        "sim": ref["cosine"],
        "align": ref["cosine"],
        "negsim": ref["cosine"],
        "dot": ref["dot"],
        "simacc": ref["cosine"] * 4 * acc * (1 - acc),
        "accgreedy": abs(acc - 0.5),
    }[mode]


def uniform_rollouts(seed: int, n_problems: int, n_responses: int, prefix: str = "u") -> list[RolloutRecord]:
    """Groups with the same number of responses (the batched path's one-matmul-per-layer case),
    uneven lengths, mixed rewards (problem 0 all correct: zero advantage)."""
    rng = random.Random(seed)
    records = []
    for i in range(n_problems):
        prompt = tuple(rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 6)))
        for j in range(n_responses):
            reward = 1.0 if i == 0 else float(j % 2 == 0 or rng.random() < 0.3)
            response = tuple(rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 7)))
            records.append(RolloutRecord(problem_id=f"{prefix}{i:02d}", prompt_ids=prompt, response_ids=response, reward=reward))
    return records


def random_adam_state(model: torch.nn.Module, seed: int = 0, step: int = 7, beta2: float = 0.99, eps: float = 1e-3,
                      alias_lm_head: bool = False):
    """An AdamSecondMoment with random positive exp_avg_sq for every trainable parameter of `model`, keyed by
    name (the tied weight under lm_head.weight when alias_lm_head)."""
    from gradalign_common.optimizer_state import AdamSecondMoment

    generator = torch.Generator().manual_seed(seed)
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in names or (alias_lm_head and name == "lm_head.weight"):
            names[id(p)] = (name, p)
    exp_avg_sq = {name: torch.rand(p.shape, generator=generator, dtype=torch.float64).float() * 1e-4 + 1e-7
                  for name, p in names.values()}
    return AdamSecondMoment(exp_avg_sq, step, beta2, eps)


def hand_inverse_denominators(model: torch.nn.Module, state) -> list[torch.Tensor]:
    """1 / (sqrt(v / (1 - beta2 ** step)) + eps) per parameter (model.parameters() order), by hand."""
    by_id = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state.exp_avg_sq:
            by_id[id(p)] = state.exp_avg_sq[name].double()
    out = []
    for p in model.parameters():
        v_hat = by_id[id(p)] / (1.0 - state.beta2**state.step)
        out.append(1.0 / (v_hat.sqrt() + state.eps))
    return out


def spread_rollouts(seed: int, n_problems: int, n_responses: int, n_tokens: int, vocab: int,
                    prefix: str = "s") -> list[RolloutRecord]:
    """Groups of n_responses responses of n_tokens tokens each (ids over the whole vocabulary), prompts of 4 to
    12 tokens, mixed 0/1 rewards (every group has a non-zero advantage)."""
    rng = random.Random(seed)
    records = []
    for i in range(n_problems):
        prompt = tuple(rng.randrange(vocab) for _ in range(rng.randint(4, 12)))
        for j in range(n_responses):
            response = tuple(rng.randrange(vocab) for _ in range(n_tokens))
            records.append(RolloutRecord(f"{prefix}{i:02d}", prompt, response, float(j % 2 == 0 or rng.random() < 0.3)))
    return records
