"""The scoring engine: gradient-alignment scores of candidate problems (shared/spec/gradalign-score.md).

For a candidate problem i with responses j and GRPO advantages A_j (per group),
    L_i = - sum_j sum_t A_j log p_jt / (sum_j |response_j|),
and for the validation set (advantages per validation group, one token-mean over all of it)
    L_V = - sum A log p / (total validation response tokens).
With g_i = grad L_i and g_V = grad L_V / ||grad L_V|| over every trainable parameter
(a tied weight once), sim = cos(g_i, g_V) and dot = <g_i, g_V>. A zero-advantage
candidate scores 0 without a model pass. How a mode turns these into its score lives
in gradalign_common.selection; the loss itself in services.scoring.loss.

With an optimizer state (a Preconditioner), every gradient, g_i and grad L_V alike, is
divided elementwise by Adam's sqrt(v_hat) + eps before normalising and taking products.

Methods (gradalign_common.scoring_methods) are implemented in the registry
services.scoring.methods, which this engine asks: `exact` batches several groups into one
forward and one backward and separates each group's contribution in hooks
(services.scoring.passes, exact_collector), at the cost of one training step over the
candidates' tokens; `exact-loop` (services.scoring.exact_loop) is the straightforward
one-backward-per-group computation (its reference, and the fallback for models whose layers
the batched path does not know); the approximate methods are only used when named. Per-module
dot products and norms are reduced in float32 or wider (float64 for a float64 model) and
summed in float64. The engine holds the model and what the methods share: its layout, the
batching of groups, preconditioner factors and projection plans.

Memory: every pass is planned within a memory budget (gradalign_common.memory_budget: bytes, or a
fraction of the device's memory, on top of the resident model and g_V) from a cost model of the
model itself (services.scoring.memory_plan): batches of groups, lm_head's logits in chunks of
tokens (services.scoring.head_loss) and bounded per-group gradient slices. Within the budget, batches are
packed up to a target size where one is set (on CPU by default: services.scoring.memory_plan.
resolve_batch_target). `max_batch_tokens`, when set, overrides both by a token count (rows x width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from transformers import PreTrainedModel

from gradalign_common.errors import InvalidInputError, ZeroValidationGradientError
from gradalign_common.logging_setup import get_logger
from gradalign_common.modeling import load_model
from gradalign_common.optimizer_state import AdamSecondMoment
from gradalign_common.records import RolloutRecord, ScoreRecord
from gradalign_common.scoring_methods import MethodSpec, parse_method
from gradalign_common.selection import SelectionMode, get_mode
from services.scoring.batching import Batch
from services.scoring.cpu_allocator import map_large_blocks, release_freed_memory
from services.scoring.gradient_source import GradientSource, gradient_source
from services.scoring.groups import Group, groups_of, weighted_responses
from services.scoring.layout import accumulation_dtype, inspect_model
from gradalign_common.memory_budget import DEFAULT_MEMORY_BUDGET, MemoryBudget, parse_memory_budget
from services.scoring.memory_plan import (COLLECT, PLAIN, BatchPlan, CostModel, plan_pass, probe_cost_model,
                                          check_batch_target, resolve_batch_target)
from services.scoring.methods import get_method
from services.scoring.passes import plain_gradient, run_batch
from services.scoring.projection import ProjectionPlan
from services.scoring.score_records import ProgressCallback, records_from_signals, score_without_gradients, with_progress

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
    `memory_budget` (bytes, a fraction of the device's memory, or their text: "4GiB", "0.8") bounds the
    working memory of every pass; `target_batch_tokens` is the rows x width batches are packed to at most
    within it (None: the device's default, on CPU 768 MiB of activations' worth, none on CUDA; 0: none, batches
    fill the budget); `max_batch_tokens`, when set, bounds rows x width of one batched forward instead. They
    are attributes a caller may change between requests (memory_budget through set_memory_budget); none
    changes any score.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        memory_budget: str | int | float | MemoryBudget = DEFAULT_MEMORY_BUDGET,
        max_batch_tokens: int | None = None,
        target_batch_tokens: int | None = None,
        projection_seed: int = 0,
    ):
        self.device = parse_device(device)
        if self.device.type == "cpu":
            map_large_blocks()  # freed activations go back to the system: memory follows the plan
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise InvalidInputError("the model has no trainable parameters")
        self.numels = [p.numel() for p in self.params]
        self.gradient_dtype = accumulation_dtype(dtype)
        self._vocab_size = self.model.get_input_embeddings().num_embeddings
        self.memory_budget = parse_memory_budget(memory_budget)
        self.max_batch_tokens = max_batch_tokens  # None: batches sized by the memory budget
        self.target_batch_tokens = check_batch_target(target_batch_tokens)  # None: the device's default; 0: none
        self.head_chunk_tokens: int | None = None  # None: lm_head's chunk sized by the memory budget
        self.chunked_logits = True  # False: a batch's logits at once (the earlier path, kept as a reference)
        self._cost_model: CostModel | None = None
        self.projection_seed = projection_seed
        self.layout = inspect_model(self.model, self.params)
        if not self.layout.supported:
            log.warning("batched_scoring_unsupported", reason=self.layout.reason, fallback="exact-loop")
        self.linear_strategy = "auto"  # the batched path's per-layer choice: auto, form or gram
        self._plans: dict[tuple, ProjectionPlan] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kwargs
    ) -> "ScoringEngine":
        """An engine over the causal LM saved in directory `path`."""
        return cls(load_model(path, dtype=dtype), device=device, dtype=dtype, **kwargs)

    @property
    def n_parameters(self) -> int:
        """Length of a full gradient vector."""
        return sum(self.numels)

    @property
    def batched(self) -> bool:
        """Whether `exact` runs batched (else it falls back to exact-loop)."""
        return self.layout.supported

    # ------------------------------------------------------------------ public API

    def preconditioner(self, state: AdamSecondMoment, key: tuple = ()) -> Preconditioner:
        """The model's preconditioner from an optimizer state; InvalidInputError if it does not fit the model."""
        inverse = state.inverse_denominators(zip(self.layout.names, self.params), dtype=torch.float64)
        return Preconditioner(tuple(t.to(self.device) for t in inverse), key)

    def gradient_size(self, method: str | MethodSpec = "exact") -> int:
        """Length of a g_V for `method`."""
        spec = self._check_method(method)
        return get_method(spec).gradient_size(self, spec)

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
        groups = groups_of(rollouts, "validation")
        self._check_token_ids(rollouts)
        n_tokens = sum(g.n_response_tokens for g in groups)
        flat = get_method(spec).validation_gradient(self, groups, n_tokens, spec, preconditioner, progress)
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
        otherwise g_V comes from `validation` when given, else from the candidates themselves
        (align; services.scoring.gradient_source), computed when the first candidate needs it.
        `seed` is used by rand and by fewer-responses' choice of responses.
        """
        mode = get_mode(mode)
        spec = self._check_method(method)
        groups = groups_of(candidates, "candidate")
        source = gradient_source(mode, validation_gradient is not None or bool(validation))
        if source is GradientSource.NONE:
            return with_progress(iter(score_without_gradients(candidates, mode, seed)), len(groups), progress)
        if validation_gradient is not None:
            expected = self.gradient_size(spec)
            if validation_gradient.numel() != expected:
                raise ValueError(
                    f"validation gradient has {validation_gradient.numel()} entries, method {spec.name} needs {expected}"
                )
        elif source is GradientSource.CANDIDATES:
            validation = candidates
        self._check_token_ids(candidates)
        if validation_gradient is None:
            self._check_token_ids(validation)

        def g_v() -> torch.Tensor:
            nonlocal validation_gradient
            if validation_gradient is None:
                validation_gradient = self.validation_gradient(validation, method=spec, preconditioner=preconditioner)
            return validation_gradient

        live = [g for g in groups if not g.zero_advantage]
        signals = get_method(spec).candidate_signals(self, live, spec, g_v, preconditioner, seed) if live else iter(())
        return with_progress(records_from_signals(groups, mode, signals), len(groups), progress)

    def plain_backward(self, rollouts: Sequence[RolloutRecord]) -> None:
        """One ordinary forward and backward over the rollouts' non-zero-advantage groups (their losses L_i
        summed), batched as exact batches them, every parameter gradient computed by autograd and dropped:
        the cost floor that exact scoring is measured against (`gradalign bench scoring`). Its memory is
        exact's batches' and a full gradient besides: a reference of time, not planned within the budget."""
        if not self.batched:
            raise InvalidInputError(f"the batched path does not support this model ({self.layout.reason})")
        self._check_token_ids(rollouts)
        groups = [g for g in groups_of(rollouts, "candidate") if not g.zero_advantage]
        indices = list(range(len(self.params)))
        plan = self.plan(groups, COLLECT)
        for batch in self.batches(groups, None, plan):
            plain_gradient(self.layout, [batch], indices, head_chunk_tokens=self._head_chunk(plan))
            self._after_batch()

    # ------------------------------------------------------------------ memory

    def set_memory_budget(self, budget: str | int | float | MemoryBudget) -> None:
        """Use `budget` for the passes from now on (InvalidInputError if it is not a budget)."""
        self.memory_budget = parse_memory_budget(budget)

    @property
    def cost_model(self) -> CostModel:
        """The model's memory cost model (services.scoring.memory_plan), probed on first use."""
        if self._cost_model is None:
            self._cost_model = probe_cost_model(self.layout)
        return self._cost_model

    def plan(self, groups: Sequence[Group], path: str = COLLECT) -> BatchPlan:
        """How a pass over `groups` (COLLECT: per-group statistics; PLAIN: a summed gradient) is cut within
        the memory budget, with the max_batch_tokens and head_chunk_tokens overrides when set."""
        budget = self.memory_budget.working_bytes(self.device)
        largest = max((g.n_response_tokens for g in groups), default=0)
        target = resolve_batch_target(self.device, self.target_batch_tokens, self.cost_model)
        plan = plan_pass(self.cost_model, budget, path, largest, target)
        if self.max_batch_tokens is None and not plan.fits(1, 2):
            log.warning("memory_budget_below_one_response", budget_bytes=budget, fixed_bytes=plan.fixed,
                        budget=str(self.memory_budget))
        if self.max_batch_tokens is not None:
            plan = replace(plan, token_limit=self.max_batch_tokens)
        if self.head_chunk_tokens is not None:
            plan = replace(plan, head_chunk_tokens=self.head_chunk_tokens)
        return plan

    def _head_chunk(self, plan: BatchPlan) -> int | None:
        return plan.head_chunk_tokens if self.chunked_logits else None

    def _after_batch(self) -> None:
        if self.device.type == "cpu":
            release_freed_memory()  # what one batch freed cannot pile up under the next

    # ------------------------------------------------------------------ what the methods share

    def batches(self, groups: Sequence[Group], denominator: int | None, plan: BatchPlan | None = None) -> Iterator[Batch]:
        """The groups' weighted responses (services.scoring.groups.weighted_responses) in batches of the plan."""
        plan = plan or self.plan(groups)
        for chunks in plan.pack(weighted_responses(groups, denominator)):
            yield self._batch(chunks)

    def run_batch(self, batch: Batch, collector, tracked: list[int], cut: int | None, plan: BatchPlan) -> None:
        """One forward and backward of `batch`, the collector's hooks seeing the tracked parameters
        (services.scoring.passes.run_batch), lm_head in the plan's chunks."""
        run_batch(self.layout, batch, collector, tracked, cut, self._head_chunk(plan))
        self._after_batch()

    def collect(self, groups: list[Group], collector, tracked: list[int], cut: int | None,
                plan: BatchPlan | None = None) -> Iterator:
        """The collector's result for each group, in order, from batches of consecutive groups."""
        plan = plan or self.plan(groups)
        results: dict[int, object] = {}
        batches = plan.pack(weighted_responses(groups, None))
        for key, group in enumerate(groups):
            while key not in results:
                if not any(a != 0.0 for a in group.advantages):  # nothing of it survives the weighting
                    results[key] = collector.empty_result()
                    break
                batch = self._batch(next(batches))
                self.run_batch(batch, collector, tracked, cut, plan)
                results.update(collector.finish())
            yield results.pop(key)

    def plain_gradient(
        self, groups: list[Group], n_tokens: int, indices: list[int], cut: int | None,
        preconditioner: Preconditioner | None, progress: ProgressCallback | None,
    ) -> torch.Tensor:
        """The summed gradient of the groups' losses (weights A_j / n_tokens) with respect to params[indices],
        by ordinary autograd in batches, preconditioned when given, as one flat vector."""
        live = [g for g in groups if not g.zero_advantage]
        done = len(groups) - len(live)
        plan = self.plan(live, PLAIN)
        chunk_lists = list(plan.pack(weighted_responses(live, n_tokens)))
        total = [torch.zeros_like(self.params[i], dtype=self.gradient_dtype) for i in indices]
        for chunks in chunk_lists:
            plain_gradient(self.layout, [self._batch(chunks)], indices, cut, self._head_chunk(plan), total)
            self._after_batch()
            if progress is not None:
                for chunk in chunks:
                    if chunk.last:
                        done += 1
                        progress(done, len(groups))
        if preconditioner is not None:
            total = [t * preconditioner.inverse[i].to(t.dtype) for t, i in zip(total, indices)]
        return torch.cat([t.reshape(-1) for t in total])

    def top_layers(self, n_layers: int) -> tuple[int, list[int]]:
        """(the decoder layer the backward is cut at, the trainable parameters above it) for top-layers-N."""
        try:
            return self.layout.top_layer_indices(n_layers)
        except ValueError as exc:
            raise InvalidInputError(f"method top-layers is not available for this model: {exc}") from None

    def projection_plan(self, k: int, preconditioner: Preconditioner | None) -> ProjectionPlan:
        """project-K's projections for this model (and preconditioner), drawn once and kept."""
        key = (k, None if preconditioner is None else (preconditioner.key, id(preconditioner)))
        if key not in self._plans:
            if len(self._plans) >= 4:  # a long-running scorer sees a new optimizer state every round
                self._plans.clear()
            tracked = list(range(len(self.params)))
            c = self.preconditioner_factors(preconditioner, tracked)
            self._plans[key] = ProjectionPlan(
                self.layout, tracked, k, self.projection_seed, self.gradient_dtype, self.device, c
            )
        return self._plans[key]

    def preconditioner_factors(self, preconditioner: Preconditioner | None, indices: Iterable[int]) -> dict | None:
        """{parameter index: 1 / (sqrt(v_hat) + eps)} of params[indices], or None without a preconditioner."""
        if preconditioner is None:
            return None
        return {i: preconditioner.inverse[i] for i in indices}

    def split(self, flat: torch.Tensor, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """A flat vector over params[indices], cut into one flat piece per parameter."""
        return torch.split(flat, [self.numels[i] for i in indices])

    # ------------------------------------------------------------------ checks

    def _check_method(self, method: str | MethodSpec) -> MethodSpec:
        spec = parse_method(method)
        if get_method(spec).needs_batched and not self.batched:
            raise InvalidInputError(
                f"method {spec.name} is not available for this model ({self.layout.reason}); use exact"
            )
        return spec

    def _batch(self, chunks) -> Batch:
        embedding = self.layout.embedding
        return Batch(chunks, self.device, embedding.padding_idx, embedding.num_embeddings)

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
