"""Exact scoring with lm_head's logits in chunks of tokens (services.scoring.head_loss), in either form of a
group's lm_head statistics (services.scoring.head_signals), against an independent plain-autograd computation
of the spec (scoring_fixtures.ReferenceScorer): at the tiny vocabulary and at Qwen2.5's real one (151,936)
with a tied embedding, and through SDPA attention against an eager-attention reference."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from gradalign_common.records import RolloutRecord
from services.scoring.engine import ScoringEngine
from services.scoring.head_loss import chunked_head_loss, head_chunks
from services.scoring.head_signals import dense_signals, gram_is_cheaper, gram_signals, rows_at, tensor_signals
from services.scoring.loss import policy_gradient_loss
from scoring_fixtures import (ReferenceScorer, hand_inverse_denominators, random_adam_state, random_rollouts,
                              tiny_qwen2)

REAL_VOCAB = 151_936  # Qwen2.5's


@pytest.fixture(scope="module")
def engine64(model):
    return ScoringEngine(copy.deepcopy(model), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(model, candidates, validation):
    return ReferenceScorer(model).scores(candidates, validation)


@pytest.fixture
def overrides(engine64):
    """Resets the engine's overrides after a test."""
    yield engine64
    engine64.head_chunk_tokens = engine64.max_batch_tokens = None
    engine64.linear_strategy, engine64.chunked_logits = "auto", True


# ----------------------------------------------------------------------------- the chunked loss itself


def test_head_chunks_cover_the_tokens_in_whole_slots_where_they_fit():
    assert head_chunks([(0, 3), (3, 5), (5, 20), (20, 22)], 6) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 22)]
    assert head_chunks([(0, 2), (2, 4), (4, 6)], 4) == [(0, 4), (4, 6)]
    assert head_chunks([(0, 7)], 3) == [(0, 2), (2, 4), (4, 7)]
    assert head_chunks([(0, 4)], 100) == [(0, 4)]
    rng = random.Random(0)
    for _ in range(200):
        bounds = sorted(rng.sample(range(1, 60), rng.randint(0, 8)))
        slots = list(zip([0, *bounds], [*bounds, 60]))
        size = rng.randint(1, 20)
        chunks = head_chunks(slots, size)
        assert [t0 for t0, _ in chunks] == [0, *[t1 for _, t1 in chunks[:-1]]] and chunks[-1][1] == 60
        assert all(0 < t1 - t0 <= size for t0, t1 in chunks)
        for t0, t1 in slots:  # a slot that fits in a chunk is never cut
            assert t1 - t0 > size or any(c0 <= t0 and t1 <= c1 for c0, c1 in chunks)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_chunked_head_loss_and_gradients_equal_autograd(dtype, tol, chunk):
    generator = torch.Generator().manual_seed(chunk)
    n, hidden, vocab = 13, 8, 50
    h = torch.randn(n, hidden, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    weights = torch.randn(n, generator=generator, dtype=torch.float64)
    expected = policy_gradient_loss(torch.nn.functional.linear(h, weight, bias), targets, weights)
    expected_grads = torch.autograd.grad(2.5 * expected, (h, weight, bias))
    loss = chunked_head_loss(h, weight, bias, targets, weights, head_chunks([(0, 5), (5, n)], chunk))
    grads = torch.autograd.grad(2.5 * loss, (h, weight, bias))
    assert loss.dtype == expected.dtype and torch.allclose(loss, expected, rtol=tol, atol=tol)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype and torch.allclose(got, want, rtol=tol, atol=tol)


def test_bfloat16_chunks_take_log_softmax_in_float32_as_the_materialised_loss_does():
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(20, 16, generator=generator).bfloat16().requires_grad_(True)
    weight = torch.randn(300, 16, generator=generator).bfloat16().requires_grad_(True)
    targets, weights = torch.randint(0, 300, (20,), generator=generator), torch.rand(20, dtype=torch.float64)
    expected = policy_gradient_loss(h @ weight.T, targets, weights)
    loss = chunked_head_loss(h, weight, None, targets, weights, head_chunks([(0, 20)], 6))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(loss, (h, weight)), torch.autograd.grad(expected, (h, weight))):
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_a_consumer_sees_each_chunk_and_needs_the_loss_differentiated_directly():
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(9, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=generator, dtype=torch.float64)
    targets, weights = torch.randint(0, 11, (9,), generator=generator), torch.rand(9, dtype=torch.float64)
    logits = (h @ weight.T).detach().requires_grad_(True)
    (expected_dz,) = torch.autograd.grad(policy_gradient_loss(logits, targets, weights), logits)
    seen = []
    loss = chunked_head_loss(h, weight, None, targets, weights, [(0, 4), (4, 9)],
                             lambda t0, t1, hc, dz: seen.append((t0, t1, hc.clone(), dz.clone())))
    assert [(t0, t1) for t0, t1, _, _ in seen] == [(0, 4), (4, 9)]
    assert torch.allclose(torch.cat([dz for *_, dz in seen]), expected_dz, atol=1e-14)
    assert torch.equal(torch.cat([hc for _, _, hc, _ in seen]), h.detach())
    torch.autograd.grad(loss, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated directly"):
        torch.autograd.grad(3.0 * loss, h)


def test_lm_head_statistics_in_both_forms_equal_the_dense_gradient():
    generator = torch.Generator().manual_seed(3)
    n, vocab, hidden = 7, 40, 6
    dz = torch.randn(n, vocab, generator=generator, dtype=torch.float64)
    h = torch.randn(n, hidden, generator=generator, dtype=torch.float64)
    v = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    c = torch.rand(vocab, hidden, generator=generator, dtype=torch.float64)
    g = dz.T @ h
    for step in (1, 3, 40, 100):
        for got in (dense_signals(dz, h, v, None, torch.float64, step), gram_signals(dz, h, v, torch.float64, step),
                    tensor_signals(g, v, None, step)):
            assert got[0].item() == pytest.approx((g * v).sum().item(), abs=1e-12)
            assert got[1].item() == pytest.approx((g * g).sum().item(), abs=1e-12)
        for got in (dense_signals(dz, h, v, c, torch.float64, step), tensor_signals(g, v, c, step)):
            assert got[0].item() == pytest.approx((g * c * v).sum().item(), abs=1e-12)
            assert got[1].item() == pytest.approx((g * c).square().sum().item(), abs=1e-12)
    ids = torch.tensor([0, 5, 39])
    assert torch.allclose(rows_at(dz, h, ids, torch.float64), g[ids])
    assert gram_is_cheaper(8, 151_936, 896) and not gram_is_cheaper(512, 151_936, 896)


# ----------------------------------------------------------------------------- the engine, tiny vocabulary


@pytest.mark.parametrize("head_chunk, max_batch_tokens, strategy", [
    (1, None, "auto"), (3, None, "form"), (7, None, "gram"), (None, None, "gram"),
    (1, 9, "form"), (3, 9, "gram"), (7, 9, "auto"), (None, 9, "auto"),
])
def test_exact_with_chunked_logits_is_the_reference(overrides, candidates, validation, reference, head_chunk,
                                                    max_batch_tokens, strategy):
    """lm_head chunks of 1, 3, 7 tokens or the budget's (groups within one chunk, and spread over several),
    groups split over batches or not, lm_head's statistics dense or Gram: all the reference's scores."""
    engine = overrides
    engine.head_chunk_tokens, engine.max_batch_tokens, engine.linear_strategy = head_chunk, max_batch_tokens, strategy
    for s in engine.score(candidates, "dot", validation):
        assert s.score == pytest.approx(reference[s.problem_id]["dot"], abs=1e-10)


@pytest.mark.parametrize("head_chunk", [2, None])
def test_preconditioned_exact_with_chunked_logits_is_the_reference(model, overrides, candidates, validation, head_chunk):
    engine = overrides
    engine.head_chunk_tokens = head_chunk
    state = random_adam_state(model, seed=1)
    reference = ReferenceScorer(model, hand_inverse_denominators(model, state)).scores(candidates, validation)
    for s in engine.score(candidates, "sim", validation, preconditioner=engine.preconditioner(state)):
        assert s.score == pytest.approx(reference[s.problem_id]["cosine"], abs=1e-10)


def test_validation_gradient_with_chunked_logits_is_the_reference(model, overrides, validation):
    engine = overrides
    engine.head_chunk_tokens = 2
    assert torch.allclose(engine.validation_gradient(validation), ReferenceScorer(model).validation_gradient(validation),
                          atol=1e-12)


@pytest.mark.parametrize("method", ["project", "top-layers-1", "fewer-responses"])
def test_every_method_scores_the_same_with_chunked_and_materialised_logits(overrides, candidates, validation, method):
    engine = overrides
    g_v = engine.validation_gradient(validation, method=method)
    engine.chunked_logits = False
    materialised = list(engine.score(candidates, "sim", validation_gradient=g_v, method=method))
    engine.chunked_logits, engine.head_chunk_tokens = True, 3
    assert torch.allclose(engine.validation_gradient(validation, method=method), g_v, atol=1e-12)
    for a, b in zip(materialised, engine.score(candidates, "sim", validation_gradient=g_v, method=method)):
        assert a.problem_id == b.problem_id and a.score == pytest.approx(b.score, abs=1e-10)


def test_untied_lm_head_with_chunked_logits(validation):
    model = tiny_qwen2(seed=3, tied=False)
    candidates = random_rollouts(seed=5, n_problems=6, prefix="c")
    reference = ReferenceScorer(model).scores(candidates, validation)
    engine = ScoringEngine(copy.deepcopy(model), dtype=torch.float64)
    engine.head_chunk_tokens = 3
    for s in engine.score(candidates, "dot", validation):
        assert s.score == pytest.approx(reference[s.problem_id]["dot"], abs=1e-10)


@pytest.mark.parametrize("head_chunk", [3, None])
def test_sdpa_attention_scores_are_those_of_an_eager_reference(validation, head_chunk):
    """The models attend with PyTorch's SDPA (transformers' default); the engine's batches (padded rows, an
    attention mask) through SDPA give the scores of a reference run one unpadded response at a time through
    eager attention (softmax(QK^T) V written out). transformers' eager attention takes its softmax in float32
    even for a float64 model, hence a float32-sized tolerance (a wrong mask or padding moves a score by 1e-3
    or more)."""
    model = tiny_qwen2(seed=11)
    assert model.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    candidates = random_rollouts(seed=12, n_problems=6, prefix="c")
    reference = ReferenceScorer(eager).scores(candidates, validation)
    engine = ScoringEngine(copy.deepcopy(model), dtype=torch.float64)
    engine.head_chunk_tokens, engine.max_batch_tokens = head_chunk, 40
    for s in engine.score(candidates, "sim", validation):
        assert s.score == pytest.approx(reference[s.problem_id]["cosine"], rel=1e-5, abs=1e-8)


# ----------------------------------------------------------------------------- the real vocabulary


@pytest.fixture(scope="module")
def real_vocab_model():
    return tiny_qwen2(seed=7, vocab_size=REAL_VOCAB, hidden_size=16)


@pytest.fixture(scope="module")
def real_vocab_rollouts():
    candidates = random_rollouts(seed=8, n_problems=6, prefix="c", vocab=REAL_VOCAB)
    # a group repeating high and low token ids (the tied weight's rows at the group's ids, in several slices)
    candidates += [RolloutRecord("repeats", (151_935, 7, 151_935), (7, 151_935, 90_000, 7), 1.0),
                   RolloutRecord("repeats", (151_935, 7, 151_935), (90_000, 90_000, 3), 0.0)]
    return candidates, random_rollouts(seed=9, n_problems=4, prefix="v", vocab=REAL_VOCAB)


@pytest.fixture(scope="module")
def real_vocab_reference(real_vocab_model, real_vocab_rollouts):
    candidates, validation = real_vocab_rollouts
    return ReferenceScorer(real_vocab_model).scores(candidates, validation)


def test_real_vocabulary_and_tied_embedding_in_float64(real_vocab_model, real_vocab_rollouts, real_vocab_reference):
    """A 64 MiB budget: lm_head chunks of a few tokens (groups spread over several), vocabulary slices of a
    few thousand rows; the scores are the reference's."""
    candidates, validation = real_vocab_rollouts
    engine = ScoringEngine(copy.deepcopy(real_vocab_model), dtype=torch.float64, memory_budget="64MiB")
    assert engine.batched and engine.layout.tied
    plan = engine.plan(engine_groups(candidates))
    assert plan.head_chunk_tokens < 20 and plan.slice_bytes // (16 * 8) < REAL_VOCAB
    for mode, key in (("dot", "dot"), ("sim", "cosine")):
        for s in engine.score(candidates, mode, validation):
            assert s.score == pytest.approx(real_vocab_reference[s.problem_id][key], abs=1e-10)


def test_real_vocabulary_in_float32(real_vocab_model, real_vocab_rollouts, real_vocab_reference):
    candidates, validation = real_vocab_rollouts
    engine = ScoringEngine(copy.deepcopy(real_vocab_model), dtype=torch.float32, memory_budget="256MiB")
    for s in engine.score(candidates, "sim", validation):
        assert s.score == pytest.approx(real_vocab_reference[s.problem_id]["cosine"], abs=1e-5)


def engine_groups(rollouts):
    from services.scoring.groups import groups_of

    return groups_of(rollouts, "candidate")


def test_the_weight_gradient_can_be_added_straight_into_a_sum():
    """The plain path's form: dW added into the running sum in the forward, none handed to autograd."""
    generator = torch.Generator().manual_seed(4)
    h = torch.randn(10, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    targets, weights = torch.randint(0, 30, (10,), generator=generator), torch.rand(10, dtype=torch.float64)
    expected_h, expected_w = torch.autograd.grad(policy_gradient_loss(h @ weight.T, targets, weights), (h, weight))
    running = torch.ones_like(weight)
    loss = chunked_head_loss(h, weight, None, targets, weights, [(0, 3), (3, 10)], weight_grad_into=running)
    got_h, got_w = torch.autograd.grad(loss, (h, weight), allow_unused=True)
    assert got_w is None and torch.allclose(running, 1.0 + expected_w, atol=1e-14)
    assert torch.allclose(got_h, expected_h, atol=1e-14)
