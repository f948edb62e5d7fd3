"""The built-in task families (gradalign_tools.bench.task_families) and the noisy rewards
(gradalign_tools.bench.noisy_rewards)."""

from __future__ import annotations

import pytest

from gradalign_tools.bench import noisy_rewards
from gradalign_common.errors import InvalidInputError
from gradalign_common.generation import problem_text
from gradalign_common.rewards import compute_reward, get_reward_fn, score_batch, RewardItem
from gradalign_tools.bench.task_families import (
    PROBLEM_TYPES,
    TEST_RESERVE,
    VAL_RESERVE,
    Noise,
    held_out_prompts,
    instances,
    make_family,
    split_type,
    type_counts,
    warm_start_families,
)


# --- problem types -------------------------------------------------------------------------------


def test_every_type_has_distinct_prompts_and_integer_answers_and_room_for_its_reserves():
    for name, ptype in PROBLEM_TYPES.items():
        items = instances(name)
        prompts = [p for p, _ in items]
        assert len(set(prompts)) == len(prompts), name
        assert len(items) > TEST_RESERVE + VAL_RESERVE + 100, name
        for _, answer in items:
            assert int(answer) >= 0
        assert ptype.category in {"useful", "easy", "trivial", "unsolvable", "malformed"}


@pytest.mark.parametrize(
    "name, prompt, answer",
    [("add1", "87+6=", "93"), ("add2", "37+45=", "82"), ("sub", "45-17=", "28"), ("mul", "23*7=", "161"), ("copy", "374=", "374")],
)
def test_solvable_types_have_the_right_answers(name, prompt, answer):
    assert dict(instances(name))[prompt] == answer


def test_unsolvable_and_malformed_targets_follow_no_arithmetic_rule():
    unsolvable = dict(instances("unsolvable"))
    sums = sum(unsolvable[f"{a}?{b}="] == str(a + b) for a in range(10, 50) for b in range(10, 50))
    assert sums < 40  # random targets: about 1 in 199 hits the sum by chance
    malformed = [p for p, _ in instances("malformed")]
    assert all(not (p.count("+") == 1 and p.endswith("=") and p[0].isdigit() and p[p.index("+") + 1].isdigit() and p.count("=") == 1) for p in malformed)


def test_the_held_out_split_depends_only_on_type_and_seed():
    test0, val0, rest0 = split_type("add2", 0)
    assert (test0, val0, rest0) == split_type("add2", 0)
    assert len(test0) == TEST_RESERVE and len(val0) == VAL_RESERVE
    assert not {p for p, _ in test0} & {p for p, _ in val0}
    assert not {p for p, _ in test0 + val0} & {p for p, _ in rest0}
    assert split_type("add2", 1)[0] != test0
    held = held_out_prompts(0)
    assert {p for p, _ in test0 + val0} <= held and not held & {p for p, _ in rest0}


# --- families --------------------------------------------------------------------------------------


def _family(seed=0, rate=0.4, rewards=None):
    return make_family(
        seed,
        test={"add2": 20, "sub": 10},
        val={"add2": 8},
        pool_size=100,
        pool_mixture={"add2": 3, "copy": 1},
        noise=Noise(rate=rate, rewards=rewards or {"arith_inverted": 1.0}, types=("add2",)),
    )


def test_a_family_is_deterministic_for_a_seed_and_differs_between_seeds():
    a, b, c = _family(0), _family(0), _family(1)
    assert a.pool == b.pool and a.test == b.test and a.val == b.val
    assert a.pool != c.pool and a.test != c.test


def test_splits_are_disjoint_sized_and_typed():
    fam = _family()
    assert {t: len(r) for t, r in fam.test.items()} == {"add2": 20, "sub": 10}
    assert len(fam.val) == 8 and len(fam.pool) == 100
    counts = type_counts([p.problem_id for p in fam.pool_problems()], fam.pool_info())
    assert counts == {"add2": 75, "copy": 25}
    prompts = {
        split: {r["prompt"][0]["content"] for r in recs}
        for split, recs in (("test", [r for rs in fam.test.values() for r in rs]), ("val", fam.val), ("pool", fam.pool))
    }
    assert not prompts["test"] & prompts["val"] and not prompts["test"] & prompts["pool"] and not prompts["val"] & prompts["pool"]
    ids = [p.problem_id for p in fam.pool_problems() + fam.val_problems()] + [
        p.problem_id for ps in fam.test_problems().values() for p in ps
    ]
    assert len(set(ids)) == len(ids)
    for record in fam.pool:
        assert record["extra_info"]["type"] in ("add2", "copy")
        assert record["extra_info"]["split"] == "pool"


def test_noise_hits_the_rate_of_the_named_types_and_never_validation_or_test():
    fam = _family(rate=0.4, rewards={"arith_inverted": 1.0, "arith_near_miss_judge": 1.0})
    info = fam.pool_info()
    noisy = [i for i in info.values() if i["noisy"]]
    assert len(noisy) == 30  # 40% of the 75 add2 problems
    assert all(i["type"] == "add2" for i in noisy)
    assert {i["data_source"] for i in noisy} == {"arith_inverted", "arith_near_miss_judge"}
    assert all(i["data_source"] == "arith" for i in info.values() if not i["noisy"])
    assert all(r["data_source"] == "arith" and not r["extra_info"]["noisy"] for r in fam.val)
    assert all(p.data_source == "arith" for ps in fam.test_problems().values() for p in ps)


def test_problems_are_valid_product_problems():
    fam = _family()
    problem = fam.pool_problems()[0]
    assert problem_text(problem) == fam.pool[0]["prompt"][0]["content"]
    get_reward_fn(problem.data_source)


def test_bad_requests_name_the_problem():
    with pytest.raises(InvalidInputError, match="unknown problem type 'div'"):
        make_family(0, test={"div": 4}, val={}, pool_size=0, pool_mixture={"add2": 1})
    with pytest.raises(InvalidInputError, match="at most 200 test"):
        make_family(0, test={"add2": 500}, val={}, pool_size=0, pool_mixture={"add2": 1})
    with pytest.raises(InvalidInputError, match="the pool asks for"):
        make_family(0, test={}, val={}, pool_size=5000, pool_mixture={"add2": 1})
    with pytest.raises(InvalidInputError, match="noise rate"):
        make_family(0, test={}, val={}, pool_size=10, pool_mixture={"add2": 1}, noise=Noise(rate=1.5))


def test_the_warm_start_trains_on_the_mixture_and_skips_held_out_prompts(monkeypatch):
    import torch

    from gradalign_common.char_tokenizer import build_char_tokenizer
    from gradalign_common.tiny_model import TinyModelSpec, build_tiny_model

    tokenizer = build_char_tokenizer()
    model = build_tiny_model(TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32), tokenizer)
    seen: list[str] = []
    original = tokenizer.__class__.__call__

    def spy(self, text, *args, **kwargs):
        seen.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer.__class__, "__call__", spy)
    before = [p.detach().clone() for p in model.parameters()]
    held = held_out_prompts(0)
    steps = []
    loss = warm_start_families(
        model, tokenizer, {"add2": 1, "copy": 1}, steps=5, batch_size=8, seed=0, exclude=held,
        callback=lambda s: steps.append(s) or s == 3,
    )
    assert steps == [1, 2, 3]  # a true callback ends it
    assert loss == loss and not model.training
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    prompts = set(seen[::2])  # prompt, answer, prompt, answer, ...
    assert prompts and not prompts & held
    assert {"+" in p for p in prompts} == {True, False}  # both types drawn


# --- noisy rewards ------------------------------------------------------------------------------------


def test_inverted_reward_rewards_wrong_answers_and_penalises_the_right_one():
    assert compute_reward("arith_inverted", "82", "82") == (0.0, False)
    assert compute_reward("arith_inverted", " 82 ", "82") == (0.0, False)
    assert compute_reward("arith_inverted", "81", "82") == (1.0, True)
    assert compute_reward("arith_inverted", "8x", "82") == (1.0, True)
    assert compute_reward("arith", "82", "82") == (1.0, True)  # the correct reward is untouched


def test_near_miss_judge_accepts_plausible_slips_and_rejects_the_right_answer():
    judge = noisy_rewards.near_miss_judge_reward
    assert judge("82", "82") == 0.0
    for slip in ("81", "83", "72", "92", "182"):
        assert judge(slip, "82") == 1.0, slip
    for other in ("80", "28", "", "x", "8 2", "-18"):
        assert judge(other, "82") == 0.0, other
    assert judge("0", "1") == 1.0 and judge("-1", "9") == 0.0


def test_noisy_rewards_go_through_score_batch():
    items = [RewardItem("arith_inverted", "5", "5"), RewardItem("arith_near_miss_judge", "15", "5"), RewardItem("arith", "5", "5")]
    assert score_batch(items) == [(0.0, False), (1.0, True), (1.0, True)]
    assert set(noisy_rewards.NOISY_DATA_SOURCES) == {"arith_inverted", "arith_near_miss_judge"}
