"""The scoring engine: gradient-alignment scores of candidate problems (shared/spec/gradalign-score.md).

For a candidate problem i with responses j and GRPO advantages A_j (per group),
    L_i = - sum_j sum_t A_j log p_jt / (sum_j |response_j|),
and for the validation set (advantages per validation group, one token-mean over all of it)
    L_V = - sum A log p / (total validation response tokens).
With g_i = grad L_i and g_V = grad L_V / ||grad L_V|| over every trainable parameter
(a tied weight once), sim = cos(g_i, g_V) and dot = <g_i, g_V>. A zero-advantage
candidate scores 0 without a model pass. How a mode turns these into its score lives
in gradalign_common.selection.

With an optimizer state (a Preconditioner), every gradient, g_i and grad L_V alike, is
divided elementwise by Adam's sqrt(v_hat) + eps before normalising and taking products.

Methods (gradalign_common.scoring_methods): `exact` batches several groups into one forward and
one backward and separates each group's contribution in hooks (services.scoring.pergroup),
at the cost of one training step over the candidates' tokens; `exact-loop` is the
straightforward one-backward-per-group computation (its reference, and the fallback for
models whose layers the batched path does not know); the approximate methods are only
used when named. Per-module dot products and norms are reduced in float32 or wider (float64
for a float64 model) and summed in float64.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from gradalign_common.advantages import accuracy, grpo_advantages, is_zero_advantage
from gradalign_common.errors import InvalidInputError, ZeroValidationGradientError
from gradalign_common.logging_setup import get_logger
from gradalign_common.modeling import load_model, parse_dtype  # noqa: F401 - parse_dtype re-exported for callers
from gradalign_common.optimizer_state import AdamSecondMoment
from gradalign_common.records import RolloutRecord, ScoreRecord, group_rollouts
from gradalign_common.selection import GroupSignals, SelectionMode, ValidationSource, get_mode, seeded_uniform_scores
from gradalign_common.scoring_methods import MethodSpec, parse_method
from services.scoring import pergroup

ProgressCallback = Callable[[int, int], None]
"""Called as progress(done, total) after each group."""

log = get_logger("gradalign.scoring.engine")


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
    """The canonical name of scoring method `name` (e.g. project -> project-16), else InvalidInputError."""
    return parse_method(name).name


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


def subsample_indices(problem_id: str, n: int, m: int, seed: int) -> list[int]:
    """fewer-responses: which m of a group's n responses are used (all when m >= n), seeded per problem."""
    if m >= n:
        return list(range(n))
    key = int.from_bytes(hashlib.blake2b(problem_id.encode(), digest_size=8).digest(), "little")
    return sorted(np.random.default_rng([seed, key, 1]).choice(n, size=m, replace=False).tolist())


@dataclass(frozen=True)
class Preconditioner:
    """Per trainable parameter (model.parameters() order), 1 / (sqrt(v_hat) + eps) in float64.

    `key` identifies the optimizer state (e.g. its file's path, mtime and size) for caches.
    """

    inverse: tuple[torch.Tensor, ...]
    key: tuple = ()


class ScoringEngine:
    """Scores candidate problems with one causal LM; not thread-safe (one request at a time).

    Gradient vectors (g_V) are flat tensors in float64 for a float64 model and float32
    otherwise: over the trainable parameters in model.parameters() order for exact,
    exact-loop and fewer-responses; over the top layers' parameters for top-layers; over
    the projected coordinates for project. A g_V can be passed back to `score` only with a
    method of the same space (MethodSpec.gradient_space) and the same preconditioner.
    `max_batch_tokens` bounds rows x width of one batched forward (memory per batch).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        max_batch_tokens: int = pergroup.DEFAULT_MAX_BATCH_TOKENS,
        projection_seed: int = 0,
    ):
        self.device = parse_device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise InvalidInputError("the model has no trainable parameters")
        self._numels = [p.numel() for p in self._params]
        self.gradient_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self._vocab_size = self.model.get_input_embeddings().num_embeddings
        self.max_batch_tokens = max_batch_tokens
        self.projection_seed = projection_seed
        self.layout = pergroup.inspect_model(self.model, self._params)
        if not self.layout.supported:
            log.warning("batched_scoring_unsupported", reason=self.layout.reason, fallback="exact-loop")
        self.linear_strategy = "auto"  # the batched path's per-layer choice: auto, form or gram
        self._plans: dict[tuple, pergroup.ProjectionPlan] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs
    ) -> "ScoringEngine":
        """An engine over the causal LM saved in directory `path`."""
        return cls(load_model(path, dtype=dtype), device=device, dtype=dtype, **kwargs)

    @property
    def n_parameters(self) -> int:
        """Length of a full gradient vector."""
        return sum(self._numels)

    @property
    def batched(self) -> bool:
        """Whether `exact` runs batched (else it falls back to exact-loop)."""
        return self.layout.supported

    # ------------------------------------------------------------------ public API

    def preconditioner(self, state: AdamSecondMoment, key: tuple = ()) -> Preconditioner:
        """The model's preconditioner from an optimizer state; InvalidInputError if it does not fit the model."""
        inverse = state.inverse_denominators(zip(self.layout.names, self._params), dtype=torch.float64)
        return Preconditioner(tuple(t.to(self.device) for t in inverse), key)

    def gradient_size(self, method: str | MethodSpec = "exact") -> int:
        """Length of a g_V for `method`."""
        spec = self._check_method(method)
        if spec.family == "top-layers":
            return sum(self._numels[i] for i in self._top_layers(spec.parameter)[1])
        if spec.family == "project":
            return self._plan(spec.parameter, None).size
        return self.n_parameters

    def validation_gradient(
        self,
        rollouts: Sequence[RolloutRecord],
        progress: ProgressCallback | None = None,
        *,
        method: str | MethodSpec = "exact",
        preconditioner: Preconditioner | None = None,
    ) -> torch.Tensor:
        """g_V = grad L_V / ||grad L_V|| (preconditioned when given) as a flat vector in `method`'s space;
        InvalidInputError if grad L_V is zero."""
        spec = self._check_method(method)
        groups = _groups(rollouts, "validation")
        self._check_token_ids(rollouts)
        n_tokens = sum(g.n_response_tokens for g in groups)
        if spec.family == "project":
            flat = self._projected_validation(groups, n_tokens, spec.parameter, preconditioner, progress)
        elif spec.family == "top-layers":
            cut, indices = self._top_layers(spec.parameter)
            flat = self._batched_plain_gradient(groups, n_tokens, indices, cut, preconditioner, progress)
        elif self.batched and spec.family != "exact-loop":
            indices = list(range(len(self._params)))
            flat = self._batched_plain_gradient(groups, n_tokens, indices, None, preconditioner, progress)
        else:
            flat = self._looped_validation_gradient(groups, n_tokens, preconditioner, progress)
        norm = torch.linalg.vector_norm(flat, dtype=torch.float64).item()
        if norm == 0.0 or not math.isfinite(norm):
            raise ZeroValidationGradientError(
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
        method: str | MethodSpec = "exact",
        preconditioner: Preconditioner | None = None,
        seed: int = 0,
        progress: ProgressCallback | None = None,
    ) -> Iterator[ScoreRecord]:
        """One ScoreRecord per candidate problem, in order of first appearance of each problem_id.

        Inputs are checked before this returns; the scores are computed as the iterator is
        consumed. `validation_gradient` (a g_V from `validation_gradient` with a method of the
        same space and the same preconditioner, e.g. cached) is used instead of computing it;
        otherwise g_V comes from `validation` (sim, dot, ...) or from the candidates themselves
        (align), computed when the first candidate needs it. `seed` is used by rand and by
        fewer-responses' choice of responses.
        """
        mode = get_mode(mode)
        spec = self._check_method(method)
        groups = _groups(candidates, "candidate")
        if not mode.needs_gradients:
            return self._report(iter(score_without_gradients(candidates, mode, seed)), len(groups), progress)
        if validation_gradient is not None:
            expected = self.gradient_size(spec)
            if validation_gradient.numel() != expected:
                raise ValueError(
                    f"validation gradient has {validation_gradient.numel()} entries, method {spec.name} needs {expected}"
                )
        elif mode.validation is ValidationSource.CANDIDATES:
            validation = candidates
        elif not validation:
            raise InvalidInputError(f"mode {mode.name!r} needs validation rollouts")
        self._check_token_ids(candidates)
        if validation_gradient is None:
            self._check_token_ids(validation)

        def g_v() -> torch.Tensor:
            nonlocal validation_gradient
            if validation_gradient is None:
                validation_gradient = self.validation_gradient(validation, method=spec, preconditioner=preconditioner)
            return validation_gradient

        signals = self._signals(groups, spec, g_v, preconditioner, seed)
        return self._report(self._records(groups, mode, signals), len(groups), progress)

    def plain_backward(self, rollouts: Sequence[RolloutRecord]) -> None:
        """One ordinary forward and backward over the rollouts' non-zero-advantage groups (their losses L_i
        summed), batched as exact batches them, every parameter gradient computed by autograd and dropped:
        the cost floor that exact scoring is measured against (`gradalign bench scoring`)."""
        if not self.batched:
            raise InvalidInputError(f"the batched path does not support this model ({self.layout.reason})")
        self._check_token_ids(rollouts)
        groups = [g for g in _groups(rollouts, "candidate") if not g.zero_advantage]
        indices = list(range(len(self._params)))
        for chunks in pergroup.plan_batches(self._weighted(groups, None), self.max_batch_tokens):
            pergroup.plain_gradient(self.layout, [self._batch(chunks)], indices)

    # ------------------------------------------------------------------ scoring

    def _check_method(self, method: str | MethodSpec) -> MethodSpec:
        spec = parse_method(method)
        if not spec.exact and not self.batched:
            raise InvalidInputError(
                f"method {spec.name} is not available for this model ({self.layout.reason}); use exact"
            )
        return spec

    @staticmethod
    def _records(groups: list[_Group], mode: SelectionMode, signals: Iterator[tuple[float, float]]) -> Iterator[ScoreRecord]:
        for group in groups:
            if group.zero_advantage:
                yield _score_record(group, mode, GroupSignals(group.accuracy, True))
                continue
            dot, sq_norm = next(signals)
            cosine = dot / math.sqrt(sq_norm) if sq_norm > 0.0 else 0.0
            yield _score_record(group, mode, GroupSignals(group.accuracy, False, cosine=cosine, dot=dot))

    def _signals(
        self, groups: list[_Group], spec: MethodSpec, g_v: Callable[[], torch.Tensor],
        preconditioner: Preconditioner | None, seed: int,
    ) -> Iterator[tuple[float, float]]:
        """(<g~_i, g_V>, ||g~_i||^2) of each non-zero-advantage group, in order, computed lazily."""
        todo = [g for g in groups if not g.zero_advantage]
        if not todo:
            return
        if spec.family == "exact-loop" or (spec.family == "exact" and not self.batched):
            yield from self._looped_signals(todo, g_v(), preconditioner)
            return
        if spec.family == "fewer-responses":
            todo = [self._subsample(g, spec.parameter, seed) for g in todo]
        cut, tracked = None, list(range(len(self._params)))
        if spec.family == "top-layers":
            cut, tracked = self._top_layers(spec.parameter)
        vector = g_v()
        c = self._inverse_by_index(preconditioner, tracked)
        if spec.family == "project":
            plan = self._plan(spec.parameter, preconditioner)
            collector = pergroup.ProjectionCollector(self.layout, plan, self.gradient_dtype, c)
            for features in self._batched_results(todo, collector, tracked, cut):
                f = features.to(torch.float64)
                yield torch.dot(f, vector.to(torch.float64)).item(), torch.dot(f, f).item()
            return
        v = dict(zip(tracked, (t.view_as(self._params[i]) for i, t in zip(tracked, self._split(vector, tracked)))))
        collector = pergroup.ExactCollector(self.layout, v, c, strategy=self.linear_strategy,
                                            accumulate_dtype=self.gradient_dtype)
        yield from self._batched_results(todo, collector, tracked, cut)

    def _batched_results(self, groups: list[_Group], collector, tracked: list[int], cut: int | None) -> Iterator:
        """The collector's result for each group, in order, from batches of consecutive groups."""
        results: dict[int, object] = {}
        batches = pergroup.plan_batches(self._weighted(groups, None), self.max_batch_tokens)
        for key, group in enumerate(groups):
            while key not in results:
                if not any(a != 0.0 for a in group.advantages):  # nothing of it survives the weighting
                    results[key] = (0.0, 0.0) if isinstance(collector, pergroup.ExactCollector) else torch.zeros(
                        collector.plan.size, dtype=torch.float64)
                    break
                batch = self._batch(next(batches))
                pergroup.run_batch(self.layout, batch, collector, tracked, cut)
                results.update(collector.finish())
            yield results.pop(key)

    @staticmethod
    def _weighted(groups: Sequence[_Group], denominator: int | None) -> Iterator[tuple[int, list, list]]:
        """(key, responses with non-zero advantage, their weights A_j / denominator) per group; the
        denominator is the group's own response tokens unless given."""
        for key, group in enumerate(groups):
            n_tokens = denominator or group.n_response_tokens
            kept = [(r, a / n_tokens) for r, a in zip(group.records, group.advantages) if a != 0.0]
            if kept:
                yield key, [r for r, _ in kept], [w for _, w in kept]

    def _subsample(self, group: _Group, m: int | None, seed: int) -> _Group:
        n = len(group.records)
        chosen = subsample_indices(group.problem_id, n, m if m is not None else (n + 1) // 2, seed)
        return _Group(group.problem_id, [group.records[j] for j in chosen], [group.advantages[j] for j in chosen],
                      group.zero_advantage, group.accuracy)

    def _top_layers(self, n_layers: int) -> tuple[int, list[int]]:
        try:
            return self.layout.top_layer_indices(n_layers)
        except ValueError as exc:
            raise InvalidInputError(f"method top-layers is not available for this model: {exc}") from None

    def _plan(self, k: int, preconditioner: Preconditioner | None) -> pergroup.ProjectionPlan:
        key = (k, None if preconditioner is None else (preconditioner.key, id(preconditioner)))
        if key not in self._plans:
            if len(self._plans) >= 4:  # a long-running scorer sees a new optimizer state every round
                self._plans.clear()
            tracked = list(range(len(self._params)))
            c = self._inverse_by_index(preconditioner, tracked)
            self._plans[key] = pergroup.ProjectionPlan(
                self.layout, tracked, k, self.projection_seed, self.gradient_dtype, self.device, c
            )
        return self._plans[key]

    def _batch(self, chunks: Sequence[pergroup.Chunk]) -> pergroup.Batch:
        embedding = self.layout.embedding
        return pergroup.Batch(chunks, self.device, embedding.padding_idx, embedding.num_embeddings)

    def _inverse_by_index(self, preconditioner: Preconditioner | None, indices: Iterable[int]) -> dict | None:
        if preconditioner is None:
            return None
        return {i: preconditioner.inverse[i] for i in indices}

    def _split(self, flat: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        return torch.split(flat, [self._numels[i] for i in indices])

    # ------------------------------------------------------------------ validation gradients

    def _batched_plain_gradient(
        self, groups: list[_Group], n_tokens: int, indices: list[int], cut: int | None,
        preconditioner: Preconditioner | None, progress: ProgressCallback | None,
    ) -> torch.Tensor:
        live = [g for g in groups if not g.zero_advantage]
        done = len(groups) - len(live)
        chunk_lists = list(pergroup.plan_batches(self._weighted(live, n_tokens), self.max_batch_tokens))
        total = [torch.zeros_like(self._params[i], dtype=self.gradient_dtype) for i in indices]
        for chunks in chunk_lists:
            batch = self._batch(chunks)
            for acc, g in zip(total, pergroup.plain_gradient(self.layout, [batch], indices, cut)):
                acc.add_(g)
            if progress is not None:
                for chunk in chunks:
                    if chunk.last:
                        done += 1
                        progress(done, len(groups))
        if preconditioner is not None:
            total = [t * preconditioner.inverse[i].to(t.dtype) for t, i in zip(total, indices)]
        return torch.cat([t.reshape(-1) for t in total])

    def _projected_validation(
        self, groups: list[_Group], n_tokens: int, k: int, preconditioner: Preconditioner | None,
        progress: ProgressCallback | None,
    ) -> torch.Tensor:
        tracked = list(range(len(self._params)))
        plan = self._plan(k, preconditioner)
        c = self._inverse_by_index(preconditioner, tracked)
        collector = pergroup.ProjectionCollector(self.layout, plan, self.gradient_dtype, c)
        total = torch.zeros(plan.size, dtype=self.gradient_dtype, device=self.device)
        done = sum(g.zero_advantage for g in groups)
        for chunks in pergroup.plan_batches(self._weighted([g for g in groups if not g.zero_advantage], n_tokens),
                                            self.max_batch_tokens):
            pergroup.run_batch(self.layout, self._batch(chunks), collector, tracked)
            for features in collector.finish().values():
                total += features
                done += 1
                if progress is not None:
                    progress(done, len(groups))
        return total

    def _looped_validation_gradient(
        self, groups: list[_Group], n_tokens: int, preconditioner: Preconditioner | None,
        progress: ProgressCallback | None,
    ) -> torch.Tensor:
        flat = torch.zeros(self.n_parameters, dtype=self.gradient_dtype, device=self.device)
        for done, group in enumerate(groups, start=1):
            if not group.zero_advantage:
                for chunk, grad in zip(torch.split(flat, self._numels), self._gradient(group, n_tokens)):
                    chunk.add_(grad.reshape(-1).to(flat.dtype))
            if progress is not None:
                progress(done, len(groups))
        if preconditioner is not None:
            for chunk, inverse in zip(torch.split(flat, self._numels), preconditioner.inverse):
                chunk.mul_(inverse.reshape(-1).to(flat.dtype))
        return flat

    # ------------------------------------------------------------------ the straightforward path (exact-loop)

    def _looped_signals(
        self, groups: list[_Group], g_v: torch.Tensor, preconditioner: Preconditioner | None
    ) -> Iterator[tuple[float, float]]:
        for group in groups:
            grads = self._gradient(group, group.n_response_tokens)
            if preconditioner is not None:
                grads = [g.to(torch.float64) * inv for g, inv in zip(grads, preconditioner.inverse)]
            yield self._dot_and_squared_norm(grads, g_v)

    @staticmethod
    def _report(scores: Iterator[ScoreRecord], total: int, progress: ProgressCallback | None) -> Iterator[ScoreRecord]:
        for done, record in enumerate(scores, start=1):
            if progress is not None:
                progress(done, total)
            yield record

    def _gradient(self, group: _Group, denominator: int) -> list[torch.Tensor]:
        """Gradients of -sum_j sum_t A_j log p_jt / denominator, one tensor per trainable parameter."""
        with pergroup.requires_grad_only(self._params, range(len(self._params))):
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
