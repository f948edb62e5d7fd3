"""The exact scoring engine (batched, and the straightforward exact-loop) against an independent
plain-autograd computation of the spec, one group at a time."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from gradalign_common.errors import InvalidInputError, NotFoundError
from gradalign_common.records import RolloutRecord
from gradalign_common.selection import seeded_uniform_scores
from gradalign_common.modeling import load_model as load_causal_lm, parse_dtype
from services.scoring.batching import DEFAULT_MAX_BATCH_TOKENS
from services.scoring.engine import ScoringEngine
from services.scoring.score_records import score_without_gradients
from scoring_fixtures import ReferenceScorer, expected_score, random_rollouts, tiny_qwen2, uniform_rollouts

GRADIENT_MODES = ["sim", "dot", "simacc", "negsim"]
EXACT_METHODS = ["exact", "exact-loop"]


@pytest.fixture(scope="module")
def reference(model, candidates, validation):
    ref = ReferenceScorer(model).scores(candidates, validation)
    # the data covers the edge cases the spec names (a precondition of the tests, not a test)
    assert any(r["zero_advantage"] and r["n_responses"] > 1 for r in ref.values())
    assert any(r["n_responses"] == 1 for r in ref.values())
    assert sum(not r["zero_advantage"] for r in ref.values()) >= 4
    assert len({len(r.prompt_ids) for r in candidates}) > 1 and len({len(r.response_ids) for r in candidates}) > 1
    return ref


@pytest.fixture(scope="module")
def engine(model):
    return ScoringEngine(model, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine64(model):
    import copy

    return ScoringEngine(copy.deepcopy(model), dtype=torch.float64)


def _first_appearance(rollouts):
    return list(dict.fromkeys(r.problem_id for r in rollouts))


class _Handles(list):
    def remove(self):
        for h in self:
            h.remove()


def _count_forwards(engine):
    """Count forwards of the model and of its base model (the batched path calls the base model)."""
    calls = []
    handles = _Handles(
        m.register_forward_pre_hook(lambda module, args: calls.append(1)) for m in (engine.model, engine.model.model)
    )
    return calls, handles


def test_the_batched_path_supports_qwen2(engine):
    assert engine.batched, engine.layout.reason
    assert engine.layout.tied


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_float32_engine_matches_reference(engine, candidates, validation, reference, mode, method):
    scores = list(engine.score(candidates, mode, validation, method=method))
    assert [s.problem_id for s in scores] == _first_appearance(candidates)
    for s in scores:
        ref = reference[s.problem_id]
        assert s.score == pytest.approx(expected_score(mode, ref), abs=1e-5)
        assert s.accuracy == ref["accuracy"]
        assert s.n_responses == ref["n_responses"]
        assert s.zero_advantage == ref["zero_advantage"]
        if s.zero_advantage:
            assert s.score == 0.0


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_float64_engine_matches_reference_tightly(engine64, candidates, validation, reference, mode, method):
    for s in engine64.score(candidates, mode, validation, method=method):
        assert s.score == pytest.approx(expected_score(mode, reference[s.problem_id]), abs=1e-10)


@pytest.mark.parametrize("method", EXACT_METHODS)
def test_align_uses_the_candidates_as_validation(model, engine, candidates, method):
    reference = ReferenceScorer(model).scores(candidates, candidates)
    scores = list(engine.score(candidates, "align", method=method))
    assert [s.problem_id for s in scores] == _first_appearance(candidates)
    for s in scores:
        assert s.score == pytest.approx(reference[s.problem_id]["cosine"], abs=1e-5)


@pytest.mark.parametrize("strategy", ["form", "gram"])
@pytest.mark.parametrize("max_batch_tokens", [10_000, 40, 9])
def test_every_layer_strategy_and_batch_size_gives_the_reference(engine64, candidates, validation, reference,
                                                                 strategy, max_batch_tokens):
    """Per-group weight gradients formed or taken through token Gram matrices; many groups per batch,
    one group per batch, and groups split over several batches: all the same scores."""
    engine64.linear_strategy, engine64.max_batch_tokens = strategy, max_batch_tokens
    try:
        for s in engine64.score(candidates, "dot", validation):
            assert s.score == pytest.approx(reference[s.problem_id]["dot"], abs=1e-10)
    finally:
        engine64.linear_strategy, engine64.max_batch_tokens = "auto", DEFAULT_MAX_BATCH_TOKENS


@pytest.mark.parametrize("strategy", ["auto", "gram"])
def test_groups_with_equal_response_counts_use_one_matmul_per_layer(model, engine64, validation, strategy):
    uniform = uniform_rollouts(seed=4, n_problems=5, n_responses=3)
    reference = ReferenceScorer(model).scores(uniform, validation)
    engine64.linear_strategy = strategy
    try:
        for s in engine64.score(uniform, "sim", validation):
            assert s.score == pytest.approx(reference[s.problem_id]["cosine"], abs=1e-10)
    finally:
        engine64.linear_strategy = "auto"


def test_exact_equals_exact_loop_in_float32(engine, candidates, validation):
    g_v = engine.validation_gradient(validation)
    assert torch.allclose(g_v, engine.validation_gradient(validation, method="exact-loop"), atol=1e-6)
    fast = list(engine.score(candidates, "sim", validation_gradient=g_v))
    loop = list(engine.score(candidates, "sim", validation_gradient=g_v, method="exact-loop"))
    assert [s.problem_id for s in fast] == [s.problem_id for s in loop]
    for a, b in zip(fast, loop):
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_untied_model_and_embedding_padding_row(validation):
    """An untied lm_head is its own parameter; nn.Embedding's padding row gets no gradient."""
    import copy

    model = tiny_qwen2(seed=3, tied=False, pad_token_id=0)
    candidates = random_rollouts(seed=5, n_problems=6, prefix="c")
    candidates += [RolloutRecord("with-pad", (0, 5, 0), (0, 7), 1.0), RolloutRecord("with-pad", (0, 5, 0), (3,), 0.0)]
    reference = ReferenceScorer(model).scores(candidates, validation)
    engine = ScoringEngine(copy.deepcopy(model), dtype=torch.float64)
    assert engine.batched and not engine.layout.tied
    assert engine.n_parameters == sum(p.numel() for p in model.parameters())
    for s in engine.score(candidates, "dot", validation):
        assert s.score == pytest.approx(reference[s.problem_id]["dot"], abs=1e-10)


def test_models_the_batched_path_does_not_know_fall_back_to_exact_loop(validation):
    """GPT-2's Conv1D layers are not nn.Linear: exact still computes the spec, one group at a time."""
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2,
                                                                n_positions=64)).eval()
    engine = ScoringEngine(gpt2, dtype=torch.float64)
    assert not engine.batched and engine.layout.reason
    candidates = random_rollouts(seed=6, n_problems=4, prefix="g")
    reference = ReferenceScorer(gpt2).scores(candidates, validation)
    for s in engine.score(candidates, "sim", validation):
        assert s.score == pytest.approx(reference[s.problem_id]["cosine"], abs=1e-10)
    with pytest.raises(InvalidInputError, match="not available for this model"):
        engine.score(candidates, "sim", validation, method="project")


def test_validation_gradient_is_the_normalised_reference(model, engine64, validation):
    g_v = engine64.validation_gradient(validation)
    ref = ReferenceScorer(model).validation_gradient(validation)
    assert g_v.dtype == torch.float64
    assert g_v.shape == ref.shape == (engine64.n_parameters,)
    assert torch.allclose(g_v, ref, atol=1e-12)
    # A tied weight counts once.
    assert engine64.n_parameters == sum(p.numel() for p in model.parameters())


def test_precomputed_validation_gradient_gives_the_same_scores(engine, candidates, validation):
    g_v = engine.validation_gradient(validation)
    direct = list(engine.score(candidates, "dot", validation))
    cached = list(engine.score(candidates, "dot", validation_gradient=g_v))
    assert direct == cached


def test_padding_and_response_order_do_not_change_scores(engine64, candidates, validation):
    """Reordering a group's responses moves padding between rows; adding long groups elsewhere changes nothing."""
    baseline = {s.problem_id: s.score for s in engine64.score(candidates, "sim", validation)}
    shuffled = list(candidates)
    random.Random(5).shuffle(shuffled)
    long_group = [
        RolloutRecord("zz-long", tuple(range(20)), tuple(range(30)), 1.0),
        RolloutRecord("zz-long", (3,), (4,), 0.0),
    ]
    scores = {s.problem_id: s.score for s in engine64.score(shuffled + long_group, "sim", validation)}
    for pid, score in baseline.items():
        assert scores[pid] == pytest.approx(score, abs=1e-12)


def test_zero_advantage_candidates_need_no_forward(engine, validation):
    g_v = engine.validation_gradient(validation)
    all_solved = [RolloutRecord("solved", (1, 2), (3,), 1.0), RolloutRecord("solved", (1, 2), (4, 5), 1.0)]
    single = [RolloutRecord("single", (1,), (2,), 0.0)]
    calls, handle = _count_forwards(engine)
    try:
        scores = list(engine.score(all_solved + single, "sim", validation_gradient=g_v))
    finally:
        handle.remove()
    assert calls == []
    assert [(s.problem_id, s.score, s.zero_advantage, s.accuracy) for s in scores] == [
        ("solved", 0.0, True, 1.0),
        ("single", 0.0, True, 0.0),
    ]


def test_accgreedy_and_rand_need_no_model_pass(engine, candidates, reference):
    calls, handle = _count_forwards(engine)
    try:
        accgreedy = list(engine.score(candidates, "accgreedy"))
        rand = list(engine.score(candidates, "rand", seed=3))
    finally:
        handle.remove()
    assert calls == []
    for s in accgreedy:
        assert s.score == abs(reference[s.problem_id]["accuracy"] - 0.5)
    draws = seeded_uniform_scores(reference, seed=3)
    assert {s.problem_id: s.score for s in rand} == draws
    assert [s.problem_id for s in rand] == _first_appearance(candidates)


def test_rand_is_deterministic_and_independent_of_input_order(candidates):
    a = {s.problem_id: s.score for s in score_without_gradients(candidates, "rand", seed=11)}
    b = {s.problem_id: s.score for s in score_without_gradients(list(reversed(candidates)), "rand", seed=11)}
    c = {s.problem_id: s.score for s in score_without_gradients(candidates, "rand", seed=12)}
    assert a == b
    assert a != c


def test_progress_is_reported_per_group(engine, candidates, validation):
    seen = []
    list(engine.score(candidates, "sim", validation, progress=lambda done, total: seen.append((done, total))))
    n = len(_first_appearance(candidates))
    assert seen == [(i, n) for i in range(1, n + 1)]


def test_errors(engine, candidates, validation):
    with pytest.raises(InvalidInputError, match="unknown selection mode"):
        engine.score(candidates, "bogus", validation)
    with pytest.raises(InvalidInputError, match="needs validation rollouts"):
        engine.score(candidates, "sim")
    with pytest.raises(InvalidInputError, match="no candidate rollouts"):
        engine.score([], "sim", validation)
    too_big = [dataclasses.replace(candidates[0], response_ids=(1, 99))]
    with pytest.raises(InvalidInputError, match="vocabulary"):
        engine.score(too_big, "sim", validation)
    no_tokens = [dataclasses.replace(candidates[0], response_ids=())]
    with pytest.raises(InvalidInputError, match="needs prompt and response tokens"):
        engine.score(no_tokens, "sim", validation)
    all_solved = [RolloutRecord("v", (1,), (2,), 1.0), RolloutRecord("v", (1,), (3,), 1.0)]
    with pytest.raises(InvalidInputError, match="validation gradient is zero"):
        engine.validation_gradient(all_solved)
    with pytest.raises(InvalidInputError, match="unknown dtype"):
        parse_dtype("float8")


def test_load_causal_lm_errors_name_the_path(tmp_path):
    with pytest.raises(NotFoundError, match=str(tmp_path / "missing")):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="not a Hugging Face model directory"):
        load_causal_lm(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match=str(broken)):
        load_causal_lm(broken)


def _live_tensors() -> int:
    import gc
    import warnings

    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("method", ["exact", "project", "top-layers", "fewer-responses"])
def test_no_tensor_outlives_its_batch(engine, candidates, validation, method):
    """Hooks must not keep tensors alive (a tensor's hook holding the tensor is a cycle through C++ that
    the garbage collector cannot break): every batch's activations are freed when the batch ends, so
    memory stays flat however many groups are scored."""
    g_v = engine.validation_gradient(validation, method=method)
    list(engine.score(candidates, "sim", validation_gradient=g_v, method=method))  # warm caches
    before = _live_tensors()
    for _ in range(2):
        list(engine.score(candidates, "sim", validation_gradient=g_v, method=method))
    assert _live_tensors() == before


def test_very_uneven_groups_in_one_batch(model, engine64, candidates, validation):
    """A long group next to short ones: lm_head's per-group gradients are formed group by group instead
    of padding its output gradient; rows are padded. Scores are unchanged."""
    long_group = [RolloutRecord("zz-long", (1, 2), tuple(range(1, 30)), 1.0), RolloutRecord("zz-long", (1, 2), (3,), 0.0)]
    rollouts = candidates + long_group
    reference = ReferenceScorer(model).scores(rollouts, validation)
    engine64.max_batch_tokens = 100_000
    try:
        for s in engine64.score(rollouts, "sim", validation):
            assert s.score == pytest.approx(reference[s.problem_id]["cosine"], abs=1e-10)
    finally:
        engine64.max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS
