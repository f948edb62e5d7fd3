"""The GRPO update loop (services/trainer/grpo.py) on the random tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradalign_common.errors import InvalidInputError
from gradalign_common.modeling import load_model, load_tokenizer
from gradalign_common.records import RolloutRecord
from services.trainer.grpo import (
    GRPOConfig,
    GRPOTrainer,
    batch_for_step,
    pack_micro_batch,
    target_log_probs,
)
from trainer_fixtures import constant_answer_problems, made_up_rollouts

SMALL = GRPOConfig(steps=2, batch_size=4, n_samples=4, learning_rate=1e-3, max_tokens=3, micro_batch_size=6, seed=3)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_each_epoch_is_a_seeded_shuffle_of_the_selection():
    problems = constant_answer_problems(7)
    batches = [batch_for_step(problems, 2, seed=5, step=s) for s in range(6)]
    assert all(len(b) == 2 for b in batches)
    first_epoch = [p.problem_id for b in batches[:3] for p in b]
    second_epoch = [p.problem_id for b in batches[3:] for p in b]
    assert len(set(first_epoch)) == 6 and len(set(second_epoch)) == 6  # 3 batches per epoch, 1 left out
    assert first_epoch != second_epoch
    assert batches == [batch_for_step(problems, 2, seed=5, step=s) for s in range(6)]
    assert batches != [batch_for_step(problems, 2, seed=6, step=s) for s in range(6)]


def test_selection_errors(random_tiny_checkpoint):
    model, tokenizer = load_model(random_tiny_checkpoint), load_tokenizer(random_tiny_checkpoint)
    with pytest.raises(InvalidInputError, match="selection is empty"):
        GRPOTrainer(model, tokenizer, [], SMALL)
    with pytest.raises(InvalidInputError, match="batch_size 4 is larger than the selection"):
        GRPOTrainer(model, tokenizer, constant_answer_problems(3), SMALL)
    with pytest.raises(InvalidInputError, match="duplicate problem ids"):
        GRPOTrainer(model, tokenizer, constant_answer_problems(4) * 2, SMALL)
    with pytest.raises(InvalidInputError, match="reference model"):
        GRPOTrainer(model, tokenizer, constant_answer_problems(4), dataclasses.replace(SMALL, kl_coef=0.1))
    with pytest.raises(InvalidInputError, match="n_samples must be >= 2"):
        dataclasses.replace(SMALL, n_samples=1).validate()
    with pytest.raises(InvalidInputError, match="clip_eps"):
        dataclasses.replace(SMALL, clip_eps=0.0).validate()


def test_padded_micro_batch_log_probs_equal_each_sequence_alone(random_tiny_checkpoint):
    model = load_model(random_tiny_checkpoint)
    short = RolloutRecord("a", (10, 11), (12,), 1.0)
    long = RolloutRecord("b", (20, 21, 22, 23), (24, 25, 26), 0.0)
    mb = pack_micro_batch([short, long], [0.5, -0.5], pad_id=0)
    assert mb.response_mask.tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
    assert mb.advantages[0, 1].item() == 0.5 and mb.advantages[1, 3].item() == -0.5
    with torch.no_grad():
        batched = target_log_probs(model, mb)
        for i, r in enumerate((short, long)):
            alone = target_log_probs(model, pack_micro_batch([r], [0.0], pad_id=0))[0]
            n = len(r.prompt_ids) + len(r.response_ids) - 1
            assert torch.allclose(batched[i, :n], alone[:n], atol=1e-5)


def test_a_step_is_deterministic_for_a_seed(random_tiny_checkpoint):
    problems = constant_answer_problems(8)
    config = dataclasses.replace(SMALL, entropy_coef=0.05)  # the entropy bonus makes every step move the weights
    runs = []
    for _ in range(2):
        model, tokenizer = load_model(random_tiny_checkpoint), load_tokenizer(random_tiny_checkpoint)
        initial = _state(model)
        metrics = GRPOTrainer(model, tokenizer, problems, config).run()
        runs.append(([dataclasses.replace(m, tokens_per_second=0.0) for m in metrics], _state(model)))
    (metrics_a, weights_a), (metrics_b, weights_b) = runs
    assert [m.step for m in metrics_a] == [1, 2]
    assert metrics_a == metrics_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert any(not torch.equal(weights_a[k], initial[k]) for k in initial)


def test_mean_reward_rises_on_a_learnable_task(random_tiny_checkpoint):
    # every prompt's answer is "7"; one response token, so a random model is right ~1% of the time
    model, tokenizer = load_model(random_tiny_checkpoint), load_tokenizer(random_tiny_checkpoint)
    config = GRPOConfig(steps=20, batch_size=8, n_samples=16, learning_rate=1e-2, max_tokens=1, micro_batch_size=64)
    calls = []
    metrics = GRPOTrainer(model, tokenizer, constant_answer_problems(16), config).run(on_step=calls.append)
    assert calls == metrics and len(metrics) == 20
    rewards = [m.mean_reward for m in metrics]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.2
    assert last > 0.7 and last > first + 0.5, rewards
    assert all(m.response_length == 1.0 and m.tokens_per_second > 0 for m in metrics)
    assert metrics[-1].entropy < metrics[0].entropy


def test_micro_batching_does_not_change_the_update(random_tiny_checkpoint):
    problems = constant_answer_problems(4)
    config = dataclasses.replace(SMALL, steps=1, n_samples=6)
    grads, metrics = [], []
    for micro in (1, 5, 24):
        model, tokenizer = load_model(random_tiny_checkpoint), load_tokenizer(random_tiny_checkpoint)
        reused = made_up_rollouts(tokenizer, problems, config.n_samples)
        trainer = GRPOTrainer(
            model, tokenizer, problems, dataclasses.replace(config, micro_batch_size=micro), first_batch_rollouts=reused
        )
        # record the accumulated (clipped) gradient the optimizer would apply
        trainer.optimizer.step = lambda: grads.append([p.grad.clone() for p in trainer.params])
        metrics.append(trainer.step())
    for other in grads[1:]:
        assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-4) for a, b in zip(grads[0], other))
    for m in metrics[1:]:
        assert m.loss == pytest.approx(metrics[0].loss, abs=1e-6)
        assert m.grad_norm == pytest.approx(metrics[0].grad_norm, rel=1e-4)
        assert m.entropy == pytest.approx(metrics[0].entropy, rel=1e-5)
    assert metrics[0].grad_norm > 0


def test_first_step_reuses_given_rollouts(random_tiny_checkpoint):
    model, tokenizer = load_model(random_tiny_checkpoint), load_tokenizer(random_tiny_checkpoint)
    problems = constant_answer_problems(4)
    # 8 responses each; the trainer takes the first n_samples = 4 (two right, two wrong)
    reused = made_up_rollouts(tokenizer, problems, 8)
    reused = {pid: rs[2:6] + rs[:2] + rs[6:] for pid, rs in reused.items()}
    initial = _state(model)
    first, second = GRPOTrainer(model, tokenizer, problems, SMALL, first_batch_rollouts=reused).run()
    assert first.mean_reward == 0.5  # the made-up rewards, not fresh samples (the random model scores ~0)
    assert first.response_length == pytest.approx(1.5)  # "7" and "xy"
    assert first.clip_fraction == 0.0 and first.grad_norm > 0
    assert any(not torch.equal(initial[k], v) for k, v in _state(model).items())
    assert second.mean_reward < 0.5  # sampled with the policy, up to max_tokens=3


def test_kl_to_the_reference_model(random_tiny_checkpoint):
    model, tokenizer = load_model(random_tiny_checkpoint), load_tokenizer(random_tiny_checkpoint)
    ref = load_model(random_tiny_checkpoint)
    config = dataclasses.replace(SMALL, steps=3, kl_coef=0.1, entropy_coef=0.05, learning_rate=1e-2)
    metrics = GRPOTrainer(model, tokenizer, constant_answer_problems(4), config, ref_model=ref).run()
    assert metrics[0].kl == pytest.approx(0.0, abs=1e-7)  # the policy equals the reference before its first step
    assert metrics[-1].kl > 0
    assert all(not p.requires_grad for p in ref.parameters())
