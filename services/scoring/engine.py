"""The exact scoring engine: gradient-alignment scores of candidate problems (shared/spec/gradalign-score.md).

For a candidate problem i with responses j and GRPO advantages A_j (per group),
    L_i = - sum_j sum_t A_j log p_jt / (sum_j |response_j|),
and for the validation set (advantages per validation group, one token-mean over all of it)
    L_V = - sum A log p / (total validation response tokens).
With g_i = grad L_i and g_V = grad L_V / ||grad L_V|| over every trainable parameter
(a tied weight once), sim = cos(g_i, g_V) and dot = <g_i, g_V>. A zero-advantage
candidate scores 0 without a model pass. How a mode turns these into its score lives
in gradalign_common.selection.

Each group's responses go through the model in one right-padded forward with an
attention mask and explicit position ids, so padding does not change the scores.
Gradients of one group are taken with one backward; dot products and norms are
accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from transformers import PreTrainedModel

from gradalign_common.advantages import accuracy, grpo_advantages, is_zero_advantage
from gradalign_common.errors import InvalidInputError
from gradalign_common.modeling import load_model, parse_dtype  # noqa: F401 - parse_dtype re-exported for callers
from gradalign_common.records import RolloutRecord, ScoreRecord, group_rollouts
from gradalign_common.selection import GroupSignals, SelectionMode, ValidationSource, get_mode, seeded_uniform_scores

ProgressCallback = Callable[[int, int], None]
"""Called as progress(done, total) after each group."""

METHODS = ("exact",)


def parse_device(name: str | torch.device) -> torch.device:
    """The torch device called `name` (cpu, cuda, cuda:1, ...), if it is available here."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"unknown torch device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} requested but CUDA is not available")
    return device


def check_method(name: str) -> str:
    """`name` if it is a scoring method this engine implements, else InvalidInputError."""
    if name not in METHODS:
        raise InvalidInputError(f"unknown scoring method {name!r}; valid methods: {', '.join(METHODS)}")
    return name


@dataclass(frozen=True)
class _Group:
    """One problem's rollouts with their GRPO advantages."""

    problem_id: str
    records: list[RolloutRecord]
    advantages: list[float]
    zero_advantage: bool
    accuracy: float

    @property
    def n_response_tokens(self) -> int:
        return sum(len(r.response_ids) for r in self.records)


def _groups(rollouts: Sequence[RolloutRecord], what: str) -> list[_Group]:
    """Rollouts grouped by problem_id in order of first appearance, with advantages per group."""
    if not rollouts:
        raise InvalidInputError(f"no {what} rollouts")
    groups = []
    for pid, records in group_rollouts(rollouts).items():
        rewards = [r.reward for r in records]
        advantages = grpo_advantages(rewards)
        groups.append(_Group(pid, records, advantages, is_zero_advantage(advantages), accuracy(rewards)))
    return groups


def score_without_gradients(
    candidates: Sequence[RolloutRecord], mode: str | SelectionMode, seed: int = 0
) -> list[ScoreRecord]:
    """Scores of a mode that needs no model pass (accgreedy, rand), in order of first appearance."""
    mode = get_mode(mode)
    if mode.needs_gradients:
        raise ValueError(f"mode {mode.name!r} needs gradients: use ScoringEngine.score")
    groups = _groups(candidates, "candidate")
    uniform = seeded_uniform_scores((g.problem_id for g in groups), seed)
    return [
        _score_record(g, mode, GroupSignals(g.accuracy, g.zero_advantage, uniform=uniform[g.problem_id]))
        for g in groups
    ]


def _score_record(group: _Group, mode: SelectionMode, signals: GroupSignals) -> ScoreRecord:
    return ScoreRecord(
        problem_id=group.problem_id,
        score=mode.score(signals),
        accuracy=group.accuracy,
        n_responses=len(group.records),
        zero_advantage=group.zero_advantage,
    )


class ScoringEngine:
    """Scores candidate problems with one causal LM; not thread-safe (one request at a time).

    Gradient vectors (g_V) are flat tensors over the trainable parameters in
    model.parameters() order, in float64 for a float64 model and float32 otherwise.
    """

    def __init__(self, model: PreTrainedModel, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = parse_device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise InvalidInputError("the model has no trainable parameters")
        self._numels = [p.numel() for p in self._params]
        self.gradient_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._vocab_size = self.model.get_input_embeddings().num_embeddings

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "ScoringEngine":
        """An engine over the causal LM saved in directory `path`."""
        return cls(load_model(path, dtype=dtype), device=device, dtype=dtype)

    @property
    def n_parameters(self) -> int:
        """Length of a gradient vector."""
        return sum(self._numels)

    def validation_gradient(
        self, rollouts: Sequence[RolloutRecord], progress: ProgressCallback | None = None
    ) -> torch.Tensor:
        """g_V = grad L_V / ||grad L_V|| as a flat vector; InvalidInputError if grad L_V is zero."""
        groups = _groups(rollouts, "validation")
        self._check_token_ids(rollouts)
        n_tokens = sum(g.n_response_tokens for g in groups)
        flat = torch.zeros(self.n_parameters, dtype=self.gradient_dtype, device=self.device)
        for done, group in enumerate(groups, start=1):
            if not group.zero_advantage:
                for chunk, grad in zip(torch.split(flat, self._numels), self._gradient(group, n_tokens)):
                    chunk.add_(grad.reshape(-1).to(flat.dtype))
            if progress is not None:
                progress(done, len(groups))
        norm = torch.linalg.vector_norm(flat, dtype=torch.float64).item()
        if norm == 0.0 or not math.isfinite(norm):
            raise InvalidInputError(
                "the validation gradient is zero or not finite "
                "(every validation group has zero advantage, or the model overflowed)"
            )
        return flat.div_(norm)

    def score(
        self,
        candidates: Sequence[RolloutRecord],
        mode: str | SelectionMode,
        validation: Sequence[RolloutRecord] | None = None,
        *,
        validation_gradient: torch.Tensor | None = None,
        seed: int = 0,
        progress: ProgressCallback | None = None,
    ) -> Iterator[ScoreRecord]:
        """One ScoreRecord per candidate problem, in order of first appearance of each problem_id.

        Inputs are checked before this returns; the scores are computed as the iterator is
        consumed. `validation_gradient` (a g_V from `validation_gradient`, e.g. cached) is used
        instead of computing it; otherwise g_V comes from `validation` (sim, dot, ...) or from
        the candidates themselves (align), computed when the first candidate needs it.
        `seed` is used by rand.
        """
        mode = get_mode(mode)
        groups = _groups(candidates, "candidate")
        if not mode.needs_gradients:
            return self._report(iter(score_without_gradients(candidates, mode, seed)), len(groups), progress)
        if validation_gradient is not None:
            if validation_gradient.numel() != self.n_parameters:
                raise ValueError(
                    f"validation gradient has {validation_gradient.numel()} entries, the model {self.n_parameters}"
                )
        elif mode.validation is ValidationSource.CANDIDATES:
            validation = candidates
        elif not validation:
            raise InvalidInputError(f"mode {mode.name!r} needs validation rollouts")
        self._check_token_ids(candidates)
        if validation_gradient is None:
            self._check_token_ids(validation)
        return self._report(self._gradient_scores(groups, mode, validation, validation_gradient), len(groups), progress)

    def _gradient_scores(
        self,
        groups: list[_Group],
        mode: SelectionMode,
        validation: Sequence[RolloutRecord] | None,
        g_v: torch.Tensor | None,
    ) -> Iterator[ScoreRecord]:
        for group in groups:
            if group.zero_advantage:
                yield _score_record(group, mode, GroupSignals(group.accuracy, True))
                continue
            if g_v is None:
                g_v = self.validation_gradient(validation)
            dot, sq_norm = self._dot_and_squared_norm(self._gradient(group, group.n_response_tokens), g_v)
            cosine = dot / math.sqrt(sq_norm) if sq_norm > 0.0 else 0.0
            yield _score_record(group, mode, GroupSignals(group.accuracy, False, cosine=cosine, dot=dot))

    @staticmethod
    def _report(scores: Iterator[ScoreRecord], total: int, progress: ProgressCallback | None) -> Iterator[ScoreRecord]:
        for done, record in enumerate(scores, start=1):
            if progress is not None:
                progress(done, total)
            yield record

    def _gradient(self, group: _Group, denominator: int) -> list[torch.Tensor]:
        """Gradients of -sum_j sum_t A_j log p_jt / denominator, one tensor per trainable parameter."""
        loss = self._policy_gradient_loss(group, denominator)
        grads = torch.autograd.grad(loss, self._params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self._params, grads)]

    def _policy_gradient_loss(self, group: _Group, denominator: int) -> torch.Tensor:
        """The group's responses in one right-padded forward; returns the advantage-weighted token loss."""
        rows = [r.prompt_ids + r.response_ids for r in group.records]
        width = max(len(row) for row in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        # Row b's logits at column c predict input_ids[b, c + 1]; response tokens are predicted
        # from columns len(prompt) - 1 .. len(row) - 2.
        token_weights = torch.zeros((len(rows), width - 1), dtype=torch.float64)
        for b, (row, record, advantage) in enumerate(zip(rows, group.records, group.advantages)):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention_mask[b, : len(row)] = 1
            token_weights[b, len(record.prompt_ids) - 1 : len(row) - 1] = advantage
        position_ids = torch.arange(width).expand(len(rows), width)
        is_weighted = token_weights != 0.0  # response tokens; a response with A_j = 0 adds nothing
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask, position_ids))

        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits
        is_weighted = is_weighted.to(self.device)
        token_logits = logits[:, :-1][is_weighted]
        token_logits = token_logits.to(torch.promote_types(token_logits.dtype, torch.float32))
        targets = input_ids[:, 1:][is_weighted]
        log_p = torch.log_softmax(token_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        weights = token_weights.to(device=self.device, dtype=log_p.dtype)[is_weighted]
        return -(weights * log_p).sum() / denominator

    def _dot_and_squared_norm(self, grads: list[torch.Tensor], g_v: torch.Tensor) -> tuple[float, float]:
        """(<g, g_V>, ||g||^2) accumulated in float64, parameter by parameter."""
        dot = torch.zeros((), dtype=torch.float64, device=self.device)
        sq_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        for grad, chunk in zip(grads, torch.split(g_v, self._numels)):
            g = grad.reshape(-1).to(torch.float64)
            dot += torch.dot(g, chunk.to(torch.float64))
            sq_norm += torch.dot(g, g)
        return dot.item(), sq_norm.item()

    def _check_token_ids(self, rollouts: Sequence[RolloutRecord]) -> None:
        """Every record has prompt and response tokens, all inside the model's vocabulary."""
        for r in rollouts:
            if not r.prompt_ids or not r.response_ids:
                raise InvalidInputError(f"problem {r.problem_id!r}: a rollout record needs prompt and response tokens")
            ids = r.prompt_ids + r.response_ids
            if min(ids) < 0 or max(ids) >= self._vocab_size:
                raise InvalidInputError(
                    f"problem {r.problem_id!r}: token ids must lie in [0, {self._vocab_size}) "
                    f"(the model's vocabulary), got {min(ids)}..{max(ids)}"
                )
