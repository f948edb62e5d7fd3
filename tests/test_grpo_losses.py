"""The GRPO loss terms against hand computations (services/trainer/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from gradalign_common.advantages import grpo_advantages
from gradalign_common.errors import InvalidInputError
from services.trainer.losses import (
    entropy_from_logits,
    get_policy_loss,
    kl_low_var,
    masked_mean,
    policy_loss_names,
    token_log_probs,
    vanilla_policy_loss,
)


def test_token_log_probs_pick_the_target_log_softmax():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]]])
    targets = torch.tensor([[2, 1]])
    z0 = math.log(math.exp(0) + math.exp(1) + math.exp(2))
    z1 = math.log(math.exp(3) + math.exp(0) + math.exp(-1))
    expected = torch.tensor([[2.0 - z0, 0.0 - z1]])
    assert torch.allclose(token_log_probs(logits, targets), expected, atol=1e-6)


def test_loss_and_advantages_match_a_hand_computation_on_a_small_batch():
    # one group of 4 responses with rewards 1, 0, 0, 1 and lengths 2, 3, 1, 2 (8 tokens)
    rewards = [1.0, 0.0, 0.0, 1.0]
    std = math.sqrt(sum((r - 0.5) ** 2 for r in rewards) / 3)  # Bessel: sqrt(1/3)
    hand_advantages = [(r - 0.5) / (std + 1e-6) for r in rewards]
    advantages = grpo_advantages(rewards)
    assert advantages == pytest.approx(hand_advantages)
    assert advantages[0] == pytest.approx(0.8660239, rel=1e-6)  # 0.5 / (sqrt(1/3) + 1e-6)

    lengths = [2, 3, 1, 2]
    mask = torch.zeros(4, 3)
    adv = torch.zeros(4, 3)
    for j, (n, a) in enumerate(zip(lengths, advantages)):
        mask[j, :n] = 1
        adv[j, :] = a
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.4, 0.3], [0.6, 0.1, 0.1], [0.3, 0.3, 0.3]]))
    new_probs = torch.tensor([[0.55, 0.2, 0.1], [0.1, 0.3, 0.3], [0.9, 0.5, 0.5], [0.3, 0.33, 0.3]])
    log_probs = torch.log(new_probs).requires_grad_(True)

    # by hand: per token max(-A r, -A clip(r, 0.8, 1.2)), summed over valid tokens, / 8
    total, clipped_tokens = 0.0, 0
    for j in range(4):
        for t in range(lengths[j]):
            r = new_probs[j, t].item() / math.exp(old[j, t].item())
            a = advantages[j]
            unclipped, clipped = -a * r, -a * min(max(r, 0.8), 1.2)
            total += max(unclipped, clipped)
            clipped_tokens += clipped > unclipped
    loss, clip_fraction = vanilla_policy_loss(log_probs, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(total / 8, rel=1e-5)
    assert clip_fraction.item() == pytest.approx(clipped_tokens / 8)
    # only response 1's second token (A < 0, r = 0.75 < 0.8) is clipped; response 2's first
    # token (A < 0, r = 1.5 > 1.2) keeps the unclipped term, which is the larger
    assert clipped_tokens == 1

    # at ratio 1 the loss is -sum_j A_j |y_j| / sum_j |y_j| and d loss / d log p = -A / 8 per token
    at_one = log_probs.detach().clone().requires_grad_(True)
    loss1, _ = vanilla_policy_loss(at_one, at_one.detach(), adv, mask, clip_eps=0.2)
    assert loss1.item() == pytest.approx(-sum(a * n for a, n in zip(advantages, lengths)) / 8, abs=1e-6)
    loss1.backward()
    assert torch.allclose(at_one.grad, -adv * mask / 8, atol=1e-7)


def test_clipping_engages_when_the_ratio_leaves_the_trust_region():
    eps = 0.2
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.5, 0.9]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones_like(ratios)
    old = torch.zeros_like(ratios)
    log_probs = torch.log(ratios).requires_grad_(True)
    loss, clip_fraction = vanilla_policy_loss(log_probs, old, advantages, mask, clip_eps=eps)
    # token 0: r=1.5, A>0 -> clipped at 1.2; token 1: r=0.5, A<0 -> clipped at 0.8; others unclipped
    expected = [-1.2, 0.8, -1.1, 1.5, 0.9]
    assert loss.item() == pytest.approx(sum(expected) / 5, rel=1e-6)
    assert clip_fraction.item() == pytest.approx(2 / 5)
    loss.backward()
    grad = log_probs.grad[0]
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0  # clipped tokens pass no gradient
    # unclipped tokens: d/d lp of -A exp(lp) / 5 = -A r / 5
    assert grad[2].item() == pytest.approx(-1.1 / 5, rel=1e-5)
    assert grad[3].item() == pytest.approx(1.5 / 5, rel=1e-5)
    assert grad[4].item() == pytest.approx(0.9 / 5, rel=1e-5)


def test_masked_tokens_do_not_count():
    log_probs = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    loss, _ = vanilla_policy_loss(log_probs, log_probs, advantages, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.0)


def test_micro_batch_shares_sum_to_the_batch_token_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    whole = masked_mean(values, mask)
    assert whole.item() == pytest.approx(18 / 5)
    parts = masked_mean(values[:1], mask[:1], num_tokens=5) + masked_mean(values[1:], mask[1:], num_tokens=5)
    assert parts.item() == pytest.approx(whole.item())
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_k3_kl_matches_a_hand_computation():
    log_probs = torch.log(torch.tensor([0.5, 0.2, 0.4]))
    ref = torch.log(torch.tensor([0.25, 0.2, 0.8]))
    # k3 = exp(d) - d - 1 with d = log q - log p, worked by hand: d = log 0.5, 0, log 2
    expected = torch.tensor([0.5 + math.log(2) - 1, 0.0, 2.0 - math.log(2) - 1])
    assert torch.allclose(kl_low_var(log_probs, ref), expected, atol=1e-6)


def test_k3_kl_is_clamped_like_verl():
    kl = kl_low_var(torch.tensor([-40.0, 0.0]), torch.tensor([0.0, -40.0]))
    # ref - lp = 40 -> log-ratio clamped to 20 -> estimate clamped to 10; ref - lp = -40 -> e^-20 + 20 - 1
    assert kl[0].item() == 10.0
    assert kl[1].item() == pytest.approx(10.0)


def test_entropy_from_logits():
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8), rel=1e-6)
    logits = torch.tensor([[[math.log(0.7), math.log(0.2), math.log(0.1)]]])
    hand = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert entropy_from_logits(logits).item() == pytest.approx(hand, rel=1e-6)


def test_policy_loss_registry():
    assert "vanilla" in policy_loss_names()
    with pytest.raises(InvalidInputError, match="unknown policy loss 'nope'"):
        get_policy_loss("nope")
