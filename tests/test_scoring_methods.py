"""Scoring methods: names, the approximate methods against explicit computations of what they
approximate, and that an approximation is only ever used when named."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gradalign_common.errors import InvalidInputError
from services.scoring.batching import DEFAULT_MAX_BATCH_TOKENS
from services.scoring.engine import ScoringEngine
from services.scoring.groups import subsample_indices
from gradalign_common.scoring_methods import MethodSpec, parse_method
from scoring_fixtures import ReferenceScorer, reference_advantages


@pytest.fixture(scope="module")
def engine64(model):
    return ScoringEngine(copy.deepcopy(model), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(model):
    return ReferenceScorer(model)


def _groups(rollouts):
    out = {}
    for r in rollouts:
        out.setdefault(r.problem_id, []).append(r)
    return out


@pytest.fixture(scope="module")
def validation_flat(reference, validation):
    """grad L_V (not normalised) as a flat float64 vector."""
    return reference._flat_grad(reference._loss(list(_groups(validation).values())))


@pytest.fixture(scope="module")
def group_gradients(reference, candidates):
    """Each non-zero-advantage candidate's gradient g_i as a flat float64 vector."""
    out = {}
    for pid, group in _groups(candidates).items():
        advantages = reference_advantages([r.reward for r in group])
        if any(abs(a) >= 1e-6 for a in advantages):
            out[pid] = reference.group_gradient(group, advantages)
    return out


def test_method_names():
    assert parse_method("exact") == MethodSpec("exact")
    assert parse_method("project").name == "project-16"
    assert parse_method("project-32") == MethodSpec("project", 32)
    assert parse_method("top-layers").name == "top-layers-1"
    assert parse_method("fewer-responses").name == "fewer-responses"
    assert parse_method("fewer-responses-3").parameter == 3
    assert parse_method("exact").exact and parse_method("exact-loop").exact
    assert not parse_method("project").exact
    assert parse_method("fewer-responses").gradient_space == parse_method("exact").gradient_space == "full"
    assert parse_method("top-layers-2").gradient_space != parse_method("top-layers-1").gradient_space
    for bad in ["", "sketch", "exact-3", "project-0", "project-x", "top_layers"]:
        with pytest.raises(InvalidInputError, match="scoring method"):
            parse_method(bad)


def _project(plan, engine, flat: torch.Tensor) -> torch.Tensor:
    """The projection of a flat gradient as ProjectionPlan defines it, computed from the whole gradient."""
    out = torch.zeros(plan.size, dtype=torch.float64)
    start = 0
    for i, p in enumerate(engine.params):
        g = flat[start : start + p.numel()].view(p.shape)
        start += p.numel()
        lo, hi = plan.offsets[i]
        if i in plan.p_in:
            out[lo:hi] = (plan.p_out[i].T @ g @ plan.p_in[i]).reshape(-1)
        elif i in plan.bias_of:
            out[lo:hi] = plan.p_out[plan.bias_of[i]].T @ g
        else:
            out[lo:hi] = g.reshape(-1)
    return out


@pytest.mark.parametrize("k", [4, 16])
def test_project_is_the_cosine_of_projected_gradients(engine64, candidates, validation, validation_flat,
                                                      group_gradients, k):
    """Per-layer projections of inputs and output gradients give exactly P_out^T G P_in of each
    group's gradient G (the tied embedding's rows included), without forming G."""
    plan = engine64.projection_plan(k, None)
    v = _project(plan, engine64, validation_flat)
    v = v / v.norm()
    g_v = engine64.validation_gradient(validation, method=f"project-{k}")
    assert g_v.shape == (plan.size,) == (engine64.gradient_size(f"project-{k}"),)
    assert torch.allclose(g_v, v, atol=1e-10)
    engine64.max_batch_tokens = 12  # some groups split over batches too
    try:
        scores = list(engine64.score(candidates, "sim", validation, method=f"project-{k}"))
    finally:
        engine64.max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS
    for s in scores:
        if s.zero_advantage:
            assert s.score == 0.0
            continue
        g = _project(plan, engine64, group_gradients[s.problem_id])
        assert s.score == pytest.approx(float(g @ v) / float(g.norm()), abs=1e-10)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_top_layers_is_the_cosine_over_the_top_parameters(engine64, reference, candidates, validation,
                                                          validation_flat, group_gradients, n_layers):
    cut, indices = engine64.layout.top_layer_indices(n_layers)
    assert cut == 2 - n_layers
    assert engine64.layout.embedding_index not in indices  # tied with lm_head: below every layer
    mask = torch.zeros(engine64.n_parameters, dtype=torch.bool)
    for i in indices:
        lo, hi = reference.offsets()[i]
        mask[lo:hi] = True
    v = validation_flat[mask] / validation_flat[mask].norm()
    for s in engine64.score(candidates, "sim", validation, method=f"top-layers-{n_layers}"):
        if s.zero_advantage:
            assert s.score == 0.0
            continue
        g = group_gradients[s.problem_id][mask]
        assert s.score == pytest.approx(float(g @ v) / float(g.norm()), abs=1e-10)


@pytest.mark.parametrize("m", [None, 1, 2])
def test_fewer_responses_uses_m_responses_with_the_groups_advantages(engine64, reference, candidates, validation,
                                                                    validation_flat, group_gradients, m):
    g_v = validation_flat / validation_flat.norm()
    method = "fewer-responses" if m is None else f"fewer-responses-{m}"
    scores = list(engine64.score(candidates, "sim", validation, method=method, seed=5))
    for s in scores:
        group = _groups(candidates)[s.problem_id]
        advantages = reference_advantages([r.reward for r in group])
        chosen = subsample_indices(s.problem_id, len(group), m or math.ceil(len(group) / 2), 5)
        assert len(chosen) == min(len(group), m or math.ceil(len(group) / 2))
        if s.zero_advantage or all(advantages[j] == 0.0 for j in chosen):
            assert s.score == 0.0
            continue
        if len(chosen) == len(group):
            g = group_gradients[s.problem_id]
        else:
            g = reference.group_gradient([group[j] for j in chosen], [advantages[j] for j in chosen])
        assert s.score == pytest.approx(float(g @ g_v) / float(g.norm()), abs=1e-10)


def test_approximations_give_sensible_scores_in_float32(model, candidates, validation):
    engine = ScoringEngine(copy.deepcopy(model))
    exact = {s.problem_id: s for s in engine.score(candidates, "sim", validation)}
    for method in ["project", "project-8", "top-layers", "top-layers-2", "fewer-responses", "fewer-responses-1"]:
        scores = list(engine.score(candidates, "sim", validation, method=method))
        assert [s.problem_id for s in scores] == list(exact)
        for s in scores:
            assert math.isfinite(s.score) and -1.0 - 1e-6 <= s.score <= 1.0 + 1e-6
            e = exact[s.problem_id]
            assert (s.accuracy, s.n_responses, s.zero_advantage) == (e.accuracy, e.n_responses, e.zero_advantage)
            if s.zero_advantage:
                assert s.score == 0.0
        assert any(s.score != 0.0 for s in scores)


def test_exact_is_the_default_and_approximations_are_never_chosen_silently(model, candidates, validation):
    engine = ScoringEngine(copy.deepcopy(model), dtype=torch.float64)
    default = [s.score for s in engine.score(candidates, "dot", validation)]
    loop = [s.score for s in engine.score(candidates, "dot", validation, method="exact-loop")]
    assert default == pytest.approx(loop, abs=1e-10)
    # A validation gradient of another method's space is refused, not silently reinterpreted.
    g_project = engine.validation_gradient(validation, method="project")
    with pytest.raises(ValueError, match="validation gradient has"):
        engine.score(candidates, "dot", validation_gradient=g_project)
    with pytest.raises(InvalidInputError, match="unknown scoring method"):
        engine.score(candidates, "dot", validation, method="approximate")
