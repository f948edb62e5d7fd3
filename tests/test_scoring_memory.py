"""Scoring within a memory budget (gradalign_common.memory_budget, memory_plan): the budget's forms, the cost
model and the batch plan, and, measured, that a pass's peak stays within the budget while the scores do not
depend on it.

Peak memory is measured with torch's profiler (gradalign_tools.bench.scoring_measure.peak_tensor_bytes):
every CPU tensor allocation and free, summed in time order; the peak above what was live before the call is
compared to the budget (which, by its definition, excludes the resident model and g_V)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import transformers

from gradalign_common.errors import InvalidInputError
from gradalign_common.memory_budget import MemoryBudget, device_memory, parse_memory_budget
from gradalign_common.records import RolloutRecord
from services.scoring.batching import plan_batches
from services.scoring.engine import ScoringEngine
from services.scoring.groups import groups_of, weighted_responses
from services.scoring.memory_plan import COLLECT, PLAIN, TRANSIENT_LAYERS, CostModel, plan_pass, probe_cost_model
from gradalign_tools.bench.scoring_measure import peak_tensor_bytes
from scoring_fixtures import ReferenceScorer, spread_rollouts, tiny_qwen2

REAL_VOCAB = 151_936
MiB = 1 << 20


# ----------------------------------------------------------------------------- budgets


def test_memory_budgets_in_bytes_or_as_a_fraction():
    assert parse_memory_budget("4GiB") == MemoryBudget(bytes=4 << 30)
    assert parse_memory_budget("4G") == MemoryBudget(bytes=4 << 30)
    assert parse_memory_budget("512MB") == MemoryBudget(bytes=512 * 10**6)
    assert parse_memory_budget(" 1.5 gib ") == MemoryBudget(bytes=3 << 29)
    assert parse_memory_budget("4000000000") == MemoryBudget(bytes=4_000_000_000)
    assert parse_memory_budget(1 << 20) == MemoryBudget(bytes=1 << 20)
    assert parse_memory_budget("0.8") == MemoryBudget(fraction=0.8)
    assert parse_memory_budget("80%") == MemoryBudget(fraction=0.8)
    assert parse_memory_budget(0.5) == MemoryBudget(fraction=0.5)
    assert parse_memory_budget("1") == MemoryBudget(fraction=1.0)
    for bad in ["", "lots", "4 parsecs", "0", "-1GiB", "150%", "0%", True, "1e999", "1e999GiB", "9" * 40, "nan%",
                float("inf"), float("nan"), 10**30, "2000PiB"]:
        with pytest.raises(InvalidInputError):
            parse_memory_budget(bad)


def test_a_fraction_of_the_cpu_is_of_what_the_machine_has():
    total, resident, available = device_memory(torch.device("cpu"))
    assert 0 < resident < total and 0 < available <= total
    working = parse_memory_budget("0.5").working_bytes(torch.device("cpu"))
    assert 0 < working <= 0.5 * available
    assert parse_memory_budget("3MiB").working_bytes(torch.device("cpu")) == 3 * MiB


def test_a_containers_memory_limit_is_the_machines_memory(tmp_path, monkeypatch):
    """In a pod limited to 16 GiB on a large host, a fraction is of the 16 GiB (cgroup v2 and v1); no limit
    ("max", or v1's huge number) or no cgroup leaves the host's figures."""
    from gradalign_common import memory_budget

    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{16 << 30}\n")
    (v2 / "memory.current").write_text(f"{6 << 30}\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{8 << 30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    assert memory_budget.cgroup_memory(v2) == (16 << 30, 6 << 30)
    assert memory_budget.cgroup_memory(v1) == (8 << 30, 1 << 30)
    assert memory_budget.cgroup_memory(tmp_path / "none") is None
    (v2 / "memory.max").write_text("max\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")
    assert memory_budget.cgroup_memory(v2) is None and memory_budget.cgroup_memory(v1) is None
    host_total, _, host_available = device_memory(torch.device("cpu"))
    monkeypatch.setattr(memory_budget, "cgroup_memory", lambda: (host_total // 4, host_total // 8))
    total, _, available = device_memory(torch.device("cpu"))
    assert total == host_total // 4 and available <= host_total // 4 - host_total // 8


# ----------------------------------------------------------------------------- the cost model and the plan


def _qwen2(layers: int, dtype: torch.dtype = torch.float32, vocab: int = 64):
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).to(dtype).eval()


def test_the_cost_model_is_the_models_own():
    """Activations per token grow with the layers and shrink with the dtype; lm_head's per-token and dense
    costs follow the vocabulary, hidden size and dtype."""
    two, four = (ScoringEngine(_qwen2(n)).cost_model for n in (2, 4))
    saved = {n: c.row_token / (1 + TRANSIENT_LAYERS / n) for n, c in ((2, two), (4, four))}  # the probe's count
    assert 1.5 < saved[4] / saved[2] < 2.5
    half = ScoringEngine(_qwen2(2, torch.bfloat16), dtype=torch.bfloat16).cost_model
    assert 0.4 < half.row_token / two.row_token < 0.8
    assert two.head_token == 64 * 4 and half.head_token == 64 * (4 + 2)  # float32 logits (+ bf16 ones)
    assert two.head_dense == 64 * 32 * 4 == half.head_dense
    n_params = sum(p.numel() for p in _qwen2(2).parameters())
    assert two.gradient == 4 * n_params == half.gradient  # the accumulation dtype: float32
    assert two.batch_gradient == 0 and half.batch_gradient == 2 * n_params  # bf16 gradients beside the sum


def test_every_planned_batch_is_within_the_budget():
    cost = CostModel(row_token=20_000.0, row_quadratic=8.0, head_token=600_000.0, head_dense=40 * MiB,
                     gradient=60 * MiB, batch_gradient=0)
    rollouts = spread_rollouts(seed=1, n_problems=9, n_responses=6, n_tokens=30, vocab=1000)
    groups = groups_of(rollouts, "candidate")
    largest = max(g.n_response_tokens for g in groups)
    for budget in (48 * MiB, 80 * MiB, 200 * MiB, 2 << 30):
        plan = plan_pass(cost, budget, COLLECT, largest)
        assert plan.head_chunk_tokens * cost.head_token <= budget / 4 or plan.head_chunk_tokens == 16
        spans = largest > plan.head_chunk_tokens  # a group spread over head chunks: its dense lm_head gradient
        assert plan.fixed == 3 * plan.slice_bytes + (cost.head_dense if spans else 0)
        for chunks in plan_batches(weighted_responses(groups, None), plan.fits):
            records = [r for c in chunks for r in c.records]
            rows, width = len(records), max(len(r.prompt_ids) + len(r.response_ids) for r in records)
            split = not all(c.complete for c in chunks)
            assert plan.peak(rows, width, split) <= budget or rows == 1
    plain = plan_pass(cost, 1 << 30, PLAIN, largest)  # the sum; dW added into it; the embedding's gradient
    assert plain.fixed == 3 * plain.slice_bytes + cost.gradient + cost.head_dense
    bf16 = replace(cost, batch_gradient=30 * MiB)  # a batch's gradients in another dtype, lm_head's among them
    assert plan_pass(bf16, 1 << 30, PLAIN, largest).fixed == plain.fixed + 30 * MiB + 2 * cost.head_dense
    assert plan_pass(cost, 1 << 30, COLLECT, largest).split_extra == cost.gradient


def _sizes(batches) -> list[int]:
    return [sum(len(c.records) for c in b) * max(len(r.prompt_ids) + len(r.response_ids) for c in b for r in c.records)
            for b in batches]


def test_batches_are_balanced_without_adding_a_pass():
    """Greedy packing fills batches to the limit and leaves the rest to the last one; the plan keeps greedy's
    number of batches and makes the largest as small as that number allows, in the groups' order."""
    groups = [(k, [RolloutRecord(f"g{k}", (1,) * 20, (2,) * 60, float(j % 2)) for j in range(4)], [1.0] * 4)
              for k in range(8)]  # every group 4 rows x 80 tokens: 320
    for n, limit, sizes in ((8, 1000, [3, 3, 2]), (8, 700, [2, 2, 2, 2]), (8, 1300, [4, 4]), (8, 2600, [8]),
                            (5, 1300, [3, 2]), (4, 1000, [2, 2])):  # greedy: [4, 1], [3, 1]
        batches = list(plan_batches(groups[:n], limit))
        assert [len(b) for b in batches] == sizes, (n, limit)
        assert [c.key for b in batches for c in b] == list(range(n))
    uneven = groups[:4] + [(k, [RolloutRecord(f"g{k}", (1,) * 10, (2,) * 10, float(j % 2)) for j in range(4)], [1.0] * 4)
                           for k in range(4, 10)]  # 4 groups of 320, then 6 of 80
    greedy_largest = 12 * 80  # greedy at 1000: [3 wide] 960, [1 wide + 2 narrow] 960, [4 narrow] 320
    batches = list(plan_batches(uneven, 1000))
    sizes = _sizes(batches)
    assert len(batches) == 3 and max(sizes) < greedy_largest and all(size <= 1000 for size in sizes)


def test_batches_are_packed_up_to_the_target_and_never_split_for_it():
    """Within what fits, groups are packed together only up to the target (rows x width); a group larger than the
    target is a batch of its own, whole; balancing never packs past the target to save a pass."""
    def group(k, rows, width):
        return k, [RolloutRecord(f"g{k}", (1,) * 10, (2,) * (width - 10), float(j % 2)) for j in range(rows)], [1.0] * rows

    even = [group(k, 4, 80) for k in range(8)]  # 320 each
    for target, sizes in ((None, [8]), (320, [1] * 8), (512, [1] * 8), (700, [2, 2, 2, 2]), (1000, [3, 3, 2])):
        batches = list(plan_batches(even, 10_000, target))
        assert [len(b) for b in batches] == sizes, target
        assert all(c.complete for b in batches for c in b)
    mixed = [group(0, 5, 100)] + [group(k, 4, 25) for k in range(1, 5)]  # 500, then four of 100
    batches = list(plan_batches(mixed, 10_000, 250))
    assert [len(b) for b in batches] == [1, 2, 2] and _sizes(batches) == [500, 200, 200]
    assert all(c.complete for b in batches for c in b)  # the 500 group is over the target but fits: not split
    assert [len(b) for b in plan_batches(mixed, 10_000)] == [5]  # no target: one batch
    fits_two = list(plan_batches(even, 700, 10_000))  # the budget's test still bounds a batch below the target
    assert [len(b) for b in fits_two] == [2, 2, 2, 2]


def test_the_cpu_packs_to_a_target_and_cuda_fills_the_budget():
    """On CPU the default target is the tokens whose activations (the cost model's) take
    DEFAULT_CPU_BATCH_ACTIVATION_BYTES; on CUDA none; a requested target wins (0: none); negatives are refused."""
    from pydantic import ValidationError

    from services.scoring.memory_plan import DEFAULT_CPU_BATCH_ACTIVATION_BYTES, resolve_batch_target
    from services.scoring.settings import ScoringSettings

    cost = CostModel(row_token=2 * MiB, row_quadratic=0.0, head_token=1.0, head_dense=1, gradient=1, batch_gradient=0)
    assert resolve_batch_target(torch.device("cpu"), None, cost) == DEFAULT_CPU_BATCH_ACTIVATION_BYTES // (2 * MiB)
    assert resolve_batch_target(torch.device("cuda", 0), None, cost) is None
    assert resolve_batch_target(torch.device("cpu"), 0, cost) is None
    assert resolve_batch_target(torch.device("cuda"), 300, cost) == 300
    with pytest.raises(InvalidInputError, match="target_batch_tokens"):
        resolve_batch_target(torch.device("cpu"), -1, cost)
    with pytest.raises(InvalidInputError, match="target_batch_tokens"):
        ScoringEngine(_qwen2(1), target_batch_tokens=-1)
    engine = ScoringEngine(_qwen2(1))
    groups = groups_of(spread_rollouts(seed=3, n_problems=4, n_responses=4, n_tokens=20, vocab=64), "candidate")
    expected = int(DEFAULT_CPU_BATCH_ACTIVATION_BYTES // engine.cost_model.row_token)
    assert engine.plan(groups).target_tokens == expected > 0
    engine.target_batch_tokens = 40  # below one group: every group alone
    assert [len(b) for b in engine.plan(groups).pack(weighted_responses(groups, None))] == [1, 1, 1, 1]
    engine.max_batch_tokens = 4096  # the override: rows x width alone, no target
    assert [len(b) for b in engine.plan(groups).pack(weighted_responses(groups, None))] == [4]
    assert ScoringEngine(_qwen2(1), target_batch_tokens=0).plan(groups).target_tokens is None
    assert ScoringSettings(target_batch_tokens=0).target_batch_tokens == 0
    with pytest.raises(ValidationError, match="target_batch_tokens"):
        ScoringSettings(target_batch_tokens=-5)


# ----------------------------------------------------------------------------- measured


@pytest.fixture(scope="module")
def real_vocab_engine():
    """Qwen2 with the real vocabulary (151,936), a tied embedding, hidden size 64: lm_head's logits are what
    dominates memory, as at real scale."""
    return ScoringEngine(tiny_qwen2(seed=7, vocab_size=REAL_VOCAB, hidden_size=64), dtype=torch.float32)


@pytest.fixture(scope="module")
def real_vocab_round():
    candidates = spread_rollouts(seed=1, n_problems=6, n_responses=4, n_tokens=24, vocab=REAL_VOCAB, prefix="c")
    validation = spread_rollouts(seed=2, n_problems=3, n_responses=4, n_tokens=24, vocab=REAL_VOCAB, prefix="v")
    return candidates, validation


def test_exact_stays_within_the_budget_and_its_scores_do_not_depend_on_it(real_vocab_engine, real_vocab_round):
    engine = real_vocab_engine
    candidates, validation = real_vocab_round
    g_v = engine.validation_gradient(validation)
    list(engine.score(candidates[:8], "sim", validation_gradient=g_v))  # warm up
    peaks, scores = {}, {}
    engine.target_batch_tokens = 0  # batches fill the budget (as on CUDA): the plan's room is the budget's
    for budget in (64 * MiB, 128 * MiB, 512 * MiB):
        engine.set_memory_budget(budget)
        peaks[budget], records = peak_tensor_bytes(lambda: list(engine.score(candidates, "sim", validation_gradient=g_v)))
        scores[budget] = {s.problem_id: s.score for s in records}
        assert peaks[budget] <= budget, (budget, peaks[budget])
    assert peaks[64 * MiB] < peaks[512 * MiB]  # the plan uses the room it is given
    first = scores[64 * MiB]
    for other in scores.values():  # float32: batch shapes change the rounding only (~1e-7)
        assert other == pytest.approx(first, abs=1e-6)
    engine.set_memory_budget("0.75")
    engine.target_batch_tokens = None


def test_the_validation_gradient_stays_within_the_budget(real_vocab_engine, real_vocab_round):
    engine = real_vocab_engine
    _, validation = real_vocab_round
    gradients = []
    for budget in (256 * MiB, 1 << 30):
        engine.set_memory_budget(budget)
        peak, g = peak_tensor_bytes(lambda: engine.validation_gradient(validation))
        assert peak - g.numel() * g.element_size() <= budget, (budget, peak)  # g_V itself is the result
        gradients.append(g)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-7)
    engine.set_memory_budget("0.75")


@pytest.mark.parametrize("budget, target", [("2MiB", None), ("8MiB", None), ("1GiB", None), ("1GiB", 1), ("1GiB", 0)])
def test_float64_scores_are_the_reference_at_every_budget(model, candidates, validation, budget, target):
    """Tiny budgets: one group or less per batch, lm_head in short chunks; a target of 1 (every group alone) and
    none (the budget filled); the reference's scores to 1e-10."""
    reference = ReferenceScorer(model).scores(candidates, validation)
    engine = ScoringEngine(copy.deepcopy(model), dtype=torch.float64, memory_budget=budget, target_batch_tokens=target)
    for s in engine.score(candidates, "dot", validation):
        assert s.score == pytest.approx(reference[s.problem_id]["dot"], abs=1e-10)


def test_the_cost_model_probe_leaves_the_model_as_it_was():
    model = _qwen2(2)
    engine = ScoringEngine(model)
    flags = [p.requires_grad for p in model.parameters()]
    probe_cost_model(engine.layout)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())


def test_large_cpu_blocks_come_straight_from_the_system():
    import platform

    from services.scoring.cpu_allocator import map_large_blocks

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert map_large_blocks()
