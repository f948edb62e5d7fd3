"""Optimizer-preconditioned scores (the reference's --use_optimizer) against a hand computation:
every gradient divided elementwise by sqrt(exp_avg_sq / (1 - beta2^step)) + eps."""

from __future__ import annotations

import copy

import pytest
import torch

from gradalign_common.errors import InvalidInputError
from gradalign_common.optimizer_state import AdamSecondMoment, read_optimizer_state, write_optimizer_state
from services.scoring.engine import ScoringEngine
from scoring_fixtures import ReferenceScorer, expected_score, hand_inverse_denominators, random_adam_state


@pytest.fixture(scope="module")
def state(model, tmp_path_factory):
    """A random Adam state, through the file format (tied weight keyed by its lm_head name)."""
    path = tmp_path_factory.mktemp("optim") / "optimizer.safetensors"
    s = random_adam_state(model, alias_lm_head=True)
    write_optimizer_state(path, s.exp_avg_sq, step=s.step, beta2=s.beta2, eps=s.eps)
    return read_optimizer_state(path)


@pytest.fixture(scope="module")
def reference(model, state, candidates, validation):
    inverse = hand_inverse_denominators(model, state)
    flat = torch.cat([t.reshape(-1) for t in inverse])
    assert flat.std() / flat.mean() > 0.1  # a precondition: a constant preconditioner would only rescale the scores
    return ReferenceScorer(model, inverse=inverse).scores(candidates, validation)


@pytest.fixture(scope="module")
def engine64(model):
    return ScoringEngine(copy.deepcopy(model), dtype=torch.float64)


@pytest.mark.parametrize("method", ["exact", "exact-loop"])
@pytest.mark.parametrize("mode", ["sim", "dot", "simacc"])
def test_preconditioned_scores_match_the_hand_computation(engine64, state, candidates, validation, reference,
                                                          mode, method):
    preconditioner = engine64.preconditioner(state)
    for s in engine64.score(candidates, mode, validation, method=method, preconditioner=preconditioner):
        assert s.score == pytest.approx(expected_score(mode, reference[s.problem_id]), rel=1e-9, abs=1e-10)


def test_preconditioned_split_groups_and_float32(model, state, candidates, validation, reference):
    engine = ScoringEngine(copy.deepcopy(model), max_batch_tokens=12)
    preconditioner = engine.preconditioner(state)
    for s in engine.score(candidates, "sim", validation, preconditioner=preconditioner):
        assert s.score == pytest.approx(reference[s.problem_id]["cosine"], abs=1e-5)


def test_preconditioning_changes_the_scores(engine64, state, candidates, validation, reference):
    plain = {s.problem_id: s.score for s in engine64.score(candidates, "sim", validation)}
    assert any(abs(plain[pid] - r["cosine"]) > 1e-3 for pid, r in reference.items() if not r["zero_advantage"])


def test_preconditioned_validation_gradient(engine64, model, state, validation):
    ref = ReferenceScorer(model, inverse=hand_inverse_denominators(model, state)).validation_gradient(validation)
    g_v = engine64.validation_gradient(validation, preconditioner=engine64.preconditioner(state))
    assert torch.allclose(g_v, ref, atol=1e-12)


def test_approximate_methods_accept_a_preconditioner(engine64, state, candidates, validation):
    preconditioner = engine64.preconditioner(state)
    for method in ["project", "top-layers", "fewer-responses"]:
        scores = list(engine64.score(candidates, "sim", validation, method=method, preconditioner=preconditioner))
        assert all(-1.0 <= s.score <= 1.0 for s in scores) and any(s.score != 0.0 for s in scores)


def test_a_state_that_does_not_fit_the_model_is_refused(engine64, state):
    missing = dict(state.exp_avg_sq)
    missing.pop(next(iter(missing)))
    with pytest.raises(InvalidInputError, match="no exp_avg_sq for parameter"):
        engine64.preconditioner(AdamSecondMoment(missing, state.step, state.beta2, state.eps))
    reshaped = {k: (v.reshape(-1) if v.dim() > 1 else v) for k, v in state.exp_avg_sq.items()}
    with pytest.raises(InvalidInputError, match="has shape"):
        engine64.preconditioner(AdamSecondMoment(reshaped, state.step, state.beta2, state.eps))
