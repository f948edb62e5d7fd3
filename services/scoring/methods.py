"""The registry of scoring-method implementations: how each method family computes g_V and its candidates' signals.

Beside the selection-mode registry (gradalign_common.selection): a method's name and what it
means (exact or not, its gradient space) live in gradalign_common.scoring_methods; here each
family registers what the scoring engine does for it:
- `parameters`: which trainable parameters its gradients cover, and where the backward may stop
  (the index of the decoder layer it is cut at, or None);
- `validation_gradient`: grad L_V in its gradient space (preconditioned, not yet normalised);
- `candidate_signals`: (<g~_i, g_V>, ||g~_i||^2) of each non-zero-advantage candidate group;
- `gradient_size`: the length of its g_V;
- `needs_batched`: whether it is only available on the batched path (a model the layout knows).
The engine (services.scoring.engine) asks `get_method` and never compares family names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from gradalign_common.registry import Registry
from gradalign_common.scoring_methods import FAMILIES, MethodSpec, parse_method
from services.scoring import exact_loop
from services.scoring.exact_collector import ExactCollector
from services.scoring.groups import Group, subsample
from services.scoring.projection import ProjectionCollector
from services.scoring.score_records import ProgressCallback

if TYPE_CHECKING:
    from services.scoring.engine import Preconditioner, ScoringEngine

Signals = Iterator[tuple[float, float]]
Parameters = tuple["int | None", list[int]]


@dataclass(frozen=True)
class ScoringMethod:
    """One method family's implementation (see the module docstring for each field)."""

    family: str
    needs_batched: bool
    parameters: Callable[["ScoringEngine", MethodSpec], Parameters]
    validation_gradient: Callable[
        ["ScoringEngine", list[Group], int, MethodSpec, "Preconditioner | None", "ProgressCallback | None"], torch.Tensor
    ]
    candidate_signals: Callable[
        ["ScoringEngine", list[Group], MethodSpec, Callable[[], torch.Tensor], "Preconditioner | None", int], Signals
    ]
    gradient_size: Callable[["ScoringEngine", MethodSpec], int]


_METHODS: Registry[ScoringMethod] = Registry("scoring method family", "families")


def register_method(method: ScoringMethod) -> ScoringMethod:
    """Register the implementation of a method family named in gradalign_common.scoring_methods.FAMILIES."""
    if method.family not in FAMILIES:
        raise ValueError(f"scoring method family {method.family!r} has no name in gradalign_common.scoring_methods")
    return _METHODS.add(method.family, method)


def get_method(method: str | MethodSpec) -> ScoringMethod:
    """The implementation of `method`'s family; InvalidInputError (from parse_method) for an unknown name."""
    return _METHODS.get(parse_method(method).family)


# ----------------------------------------------------------------------------- shared pieces


def every_parameter(engine: "ScoringEngine", spec: MethodSpec) -> Parameters:
    """Every trainable parameter, the backward running to the embedding."""
    return None, list(range(len(engine.params)))


def top_layers(engine: "ScoringEngine", spec: MethodSpec) -> Parameters:
    """top-layers-N: the parameters above the last N decoder layers' input, the backward cut there."""
    return engine.top_layers(spec.parameter)


def tracked_size(engine: "ScoringEngine", spec: MethodSpec) -> int:
    """The number of entries of the method's parameters."""
    return sum(engine.numels[i] for i in get_method(spec).parameters(engine, spec)[1])


def plain_validation_gradient(engine, groups, n_tokens, spec, preconditioner, progress) -> torch.Tensor:
    """grad L_V over the method's parameters by ordinary autograd, in batches."""
    cut, indices = get_method(spec).parameters(engine, spec)
    return engine.plain_gradient(groups, n_tokens, indices, cut, preconditioner, progress)


def collected_signals(engine, groups, spec, g_v, preconditioner, seed) -> Signals:
    """Each group's exact signals over the method's parameters, separated in a batch's hooks (ExactCollector)."""
    cut, tracked = get_method(spec).parameters(engine, spec)
    vector = g_v()
    v = dict(zip(tracked, (t.view_as(engine.params[i]) for i, t in zip(tracked, engine.split(vector, tracked)))))
    plan = engine.plan(groups)
    collector = ExactCollector(engine.layout, v, engine.preconditioner_factors(preconditioner, tracked),
                               strategy=engine.linear_strategy, accumulate_dtype=engine.gradient_dtype,
                               chunk_bytes=plan.slice_bytes)
    yield from engine.collect(groups, collector, tracked, cut, plan)


# ----------------------------------------------------------------------------- the families


def _exact_validation_gradient(engine, groups, n_tokens, spec, preconditioner, progress) -> torch.Tensor:
    if not engine.batched:
        return exact_loop.validation_gradient(engine, groups, n_tokens, preconditioner, progress)
    return plain_validation_gradient(engine, groups, n_tokens, spec, preconditioner, progress)


def _exact_signals(engine, groups, spec, g_v, preconditioner, seed) -> Signals:
    if not engine.batched:
        yield from exact_loop.candidate_signals(engine, groups, g_v(), preconditioner)
        return
    yield from collected_signals(engine, groups, spec, g_v, preconditioner, seed)


def _looped_validation_gradient(engine, groups, n_tokens, spec, preconditioner, progress) -> torch.Tensor:
    return exact_loop.validation_gradient(engine, groups, n_tokens, preconditioner, progress)


def _looped_signals(engine, groups, spec, g_v, preconditioner, seed) -> Signals:
    yield from exact_loop.candidate_signals(engine, groups, g_v(), preconditioner)


def _fewer_responses_signals(engine, groups, spec, g_v, preconditioner, seed) -> Signals:
    chosen = [subsample(g, spec.parameter, seed) for g in groups]
    yield from collected_signals(engine, chosen, spec, g_v, preconditioner, seed)


def _projection_collector(engine, spec, preconditioner) -> tuple[list[int], ProjectionCollector]:
    """(the tracked parameters, a collector of their projected gradients) for project-K."""
    _, tracked = every_parameter(engine, spec)
    plan = engine.projection_plan(spec.parameter, preconditioner)
    factors = engine.preconditioner_factors(preconditioner, tracked)
    return tracked, ProjectionCollector(engine.layout, plan, engine.gradient_dtype, factors)


def _projected_validation_gradient(engine, groups, n_tokens, spec, preconditioner, progress) -> torch.Tensor:
    tracked, collector = _projection_collector(engine, spec, preconditioner)
    total = torch.zeros(collector.plan.size, dtype=engine.gradient_dtype, device=engine.device)
    done = sum(g.zero_advantage for g in groups)
    live = [g for g in groups if not g.zero_advantage]
    plan = engine.plan(live)
    for batch in engine.batches(live, n_tokens, plan):
        engine.run_batch(batch, collector, tracked, None, plan)
        for features in collector.finish().values():
            total += features
            done += 1
            if progress is not None:
                progress(done, len(groups))
    return total


def _projected_signals(engine, groups, spec, g_v, preconditioner, seed) -> Signals:
    vector = g_v()
    tracked, collector = _projection_collector(engine, spec, preconditioner)
    for features in engine.collect(groups, collector, tracked, None):
        f = features.to(torch.float64)
        yield torch.dot(f, vector.to(torch.float64)).item(), torch.dot(f, f).item()


def _projected_size(engine, spec) -> int:
    return engine.projection_plan(spec.parameter, None).size


# The families: (family, needs_batched, parameters, validation_gradient, candidate_signals, gradient_size).
for _method in (
    ScoringMethod("exact", False, every_parameter, _exact_validation_gradient, _exact_signals, tracked_size),
    ScoringMethod("exact-loop", False, every_parameter, _looped_validation_gradient, _looped_signals, tracked_size),
    ScoringMethod("fewer-responses", True, every_parameter, plain_validation_gradient, _fewer_responses_signals,
                  tracked_size),
    ScoringMethod("top-layers", True, top_layers, plain_validation_gradient, collected_signals, tracked_size),
    ScoringMethod("project", True, every_parameter, _projected_validation_gradient, _projected_signals,
                  _projected_size),
):
    register_method(_method)
