"""verl 0.9.1's GRPO math as the oracle of our torch trainer (services/trainer/grpo.py).

Our functions are called the way GRPOTrainer calls them: advantages per group with
gradalign_common.advantages.grpo_advantages, spread over the response tokens by
services.trainer.grpo.pack_micro_batch (prompt and padding positions masked out), then the
registered policy loss, the k3 KL and the entropy of services/trainer/losses.py, token-mean
over the batch's response tokens (num_tokens) even when the batch is split into
micro-batches. verl's counterparts come from `verl.trainer.ppo.core_algos` (and
`verl.utils.torch_functional`): compute_grpo_outcome_advantage, the "vanilla" policy loss,
kl_penalty("low_var_kl"), agg_loss("token-mean"). float32, absolute tolerance 1e-6, several
seeds and shapes.

Known differences, each pinned by a test below:
- a group of one response: ours 0 (shared/spec/gradalign-score.md), verl r / (1 + 1e-6)
  (our trainer never has one: GRPOConfig requires n >= 2);
- a zero-variance group of rewards that float32 cannot average exactly (e.g. eight 0.3s):
  verl's float32 mean misses by an ulp and (r - mean) / (0 + 1e-6) gives every response the
  same spurious advantage (2.9e-2 for eight 0.3s); ours (float64) is 0, as the spec says;
- verl's vanilla loss is dual-clip PPO (clip_ratio_c = 3.0 by default): for A < 0 and ratio
  > 3 the per-token loss is capped at -3A; ours is the plain clipped surrogate. Equal for
  ratios below clip_ratio_c (with one mini-batch and one epoch per step, the ratio is 1 up to
  numerics in both backends);
- an empty mask: our token mean is 0, verl's is 0/0 = nan.
"""

from __future__ import annotations

import importlib.util
import math
import random

import numpy as np
import pytest
import torch

from gradalign_common.advantages import grpo_advantages
from gradalign_common.records import RolloutRecord
from services.trainer.grpo import pack_micro_batch
from services.trainer.losses import entropy_from_logits, get_policy_loss, kl_low_var, masked_mean, token_log_probs

REQUIREMENTS = "requirements/verl-config.txt"
ATOL = 1e-6
SEEDS = [0, 1, 2, 3, 4, 5]
PAD_ID = 0


@pytest.fixture(scope="module")
def verl_math():
    """verl's core_algos module (fails, never skips, without verl)."""
    if importlib.util.find_spec("verl") is None:
        pytest.fail(f"verl is not installed: `.venv/bin/python -m pip install --no-deps -r {REQUIREMENTS}`", pytrace=False)
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as error:
        pytest.fail(f"verl.trainer.ppo.core_algos does not import ({error}); install {REQUIREMENTS}", pytrace=False)
    return core_algos


def close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(ours.to(torch.float32), theirs.to(torch.float32), atol=atol, rtol=0.0)


def verl_vanilla_loss(verl_math, log_probs, old_log_probs, mb, config):
    """verl's vanilla policy loss (token-mean) of a micro-batch of ours: (loss, metrics)."""
    return verl_math.get_policy_loss_fn("vanilla")(
        old_log_prob=old_log_probs,
        log_prob=log_probs,
        advantages=mb.advantages,
        response_mask=mb.response_mask.bool(),
        loss_agg_mode="token-mean",
        config=config,
    )


def verl_actor_config(clip_eps: float, num_tokens: float | None, clip_ratio_c: float = 3.0):
    """The actor config verl's ppo_loss hands its policy loss (verl/workers/utils/losses.py): clip range on
    both sides as our verl backend sets it, and the global batch info it fills before each micro-batch."""
    from verl.workers.config import FSDPActorConfig

    config = FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=clip_eps,
        clip_ratio_low=clip_eps,
        clip_ratio_high=clip_eps,
        clip_ratio_c=clip_ratio_c,
        loss_agg_mode="token-mean",
    )
    config.global_batch_info.update(dp_size=1, batch_num_tokens=num_tokens, global_batch_size=None, loss_scale_factor=None)
    return config


# --- a batch as our trainer builds it ------------------------------------------------------------


def random_rewards(rng: random.Random, n: int) -> list[float]:
    kind = rng.choice(["binary", "ternary", "uniform", "constant"])
    if kind == "binary":
        return [float(rng.random() < 0.5) for _ in range(n)]
    if kind == "ternary":
        return [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
    if kind == "uniform":
        return [rng.random() for _ in range(n)]
    return [rng.choice([0.0, 1.0, 0.5, 0.25])] * n  # zero variance, exactly representable means


def random_groups(seed: int) -> list[list[RolloutRecord]]:
    """Groups of 2..8 responses to 1..6 problems with prompts and responses of different lengths (the first
    group has a non-zero variance)."""
    rng = random.Random(seed)
    groups = []
    for g in range(rng.randint(1, 6)):
        n = rng.randint(2, 8)
        prompt = tuple(rng.randint(1, 99) for _ in range(rng.randint(1, 7)))
        rewards = [0.0, 1.0] + random_rewards(rng, n - 2) if g == 0 else random_rewards(rng, n)  # one group that learns
        groups.append(
            [
                RolloutRecord(f"p{g}", prompt, tuple(rng.randint(1, 99) for _ in range(rng.randint(1, 9))), reward=r)
                for r in rewards
            ]
        )
    return groups


def our_batch(groups: list[list[RolloutRecord]]):
    """(micro-batch, rollouts) exactly as GRPOTrainer.step builds them."""
    rollouts = [r for group in groups for r in group]
    advantages = [a for group in groups for a in grpo_advantages([r.reward for r in group])]
    return pack_micro_batch(rollouts, advantages, PAD_ID), rollouts


def verl_advantages(core_algos, rollouts, response_mask: torch.Tensor) -> torch.Tensor:
    """verl's GRPO advantages for the same responses: each reward on the response's last token (as verl's
    reward manager puts it), groups by prompt index, std normalisation (algorithm.norm_adv_by_std_in_grpo)."""
    token_level_rewards = torch.zeros_like(response_mask)
    for i, r in enumerate(rollouts):
        last = int(response_mask[i].nonzero().max())
        token_level_rewards[i, last] = r.reward
    index = np.array([r.problem_id for r in rollouts], dtype=object)
    advantages, returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards, response_mask=response_mask, index=index, norm_adv_by_std_in_grpo=True
    )
    assert torch.equal(advantages, returns)
    return advantages


def random_log_probs(gen: torch.Generator, mask: torch.Tensor, spread: float):
    """(log_probs, old_log_probs): plausible values on response tokens, garbage on masked positions."""
    log_probs = -3.0 * torch.rand(mask.shape, generator=gen)
    old = log_probs + spread * (2 * torch.rand(mask.shape, generator=gen) - 1)
    garbage = 50 * torch.randn(mask.shape, generator=gen)
    keep = mask.bool()
    return torch.where(keep, log_probs, garbage), torch.where(keep, old, -garbage)


# --- advantages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_advantages_match_verls(verl_math, seed):
    mb, rollouts = our_batch(random_groups(seed))
    theirs = verl_advantages(verl_math, rollouts, mb.response_mask)
    close(mb.advantages, theirs)
    assert torch.equal(mb.advantages * (1 - mb.response_mask), torch.zeros_like(mb.advantages))  # nothing off the mask


def test_zero_variance_groups(verl_math):
    """Exactly representable constants give 0 in both; a constant whose float32 mean is off by an ulp (0.3)
    gives verl a spurious uniform advantage (r - mean_f32) / (std_f32 + 1e-6), std_f32 ~ 1e-8; ours stays 0
    (the spec's value)."""
    for value, n in [(0.0, 8), (1.0, 8), (0.5, 5), (0.25, 3)]:
        mb, rollouts = our_batch([[RolloutRecord("p", (1, 2), (3, 4, 5), reward=value) for _ in range(n)]])
        close(mb.advantages, verl_advantages(verl_math, rollouts, mb.response_mask))
        assert torch.count_nonzero(mb.advantages) == 0
    mb, rollouts = our_batch([[RolloutRecord("p", (1, 2), (3, 4, 5), reward=0.3) for _ in range(8)]])
    theirs = verl_advantages(verl_math, rollouts, mb.response_mask)
    assert torch.count_nonzero(mb.advantages) == 0
    spurious = theirs[mb.response_mask.bool()]
    assert torch.all(spurious == spurious[0]) and 1e-3 < abs(float(spurious[0])) < 0.05  # 0.0289 with torch 2.13


def test_a_group_of_one(verl_math):
    """ours 0 (spec: a group of one has no relative advantage); verl r / (1 + 1e-6). Our trainer never
    forms one (GRPOConfig.validate requires n_samples >= 2)."""
    mb, rollouts = our_batch([[RolloutRecord("a", (1,), (2, 3), reward=1.0)], [RolloutRecord("b", (1,), (2,), reward=0.5)]])
    theirs = verl_advantages(verl_math, rollouts, mb.response_mask)
    assert torch.count_nonzero(mb.advantages) == 0
    assert theirs[0, 0:2].tolist() == pytest.approx([1.0 / (1 + 1e-6)] * 2) and theirs[1, 0] == pytest.approx(0.5)


# --- the policy loss ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip_eps", [0.2, 0.28])
def test_vanilla_policy_loss_matches_verls(verl_math, seed, clip_eps):
    """Ratios within exp(+-1) (below verl's dual-clip bound 3): loss and clip fraction equal verl's."""
    mb, _ = our_batch(random_groups(seed))
    gen = torch.Generator().manual_seed(seed)
    log_probs, old_log_probs = random_log_probs(gen, mb.response_mask, spread=1.0)
    num_tokens = float(mb.num_tokens)
    ours, clip_fraction = get_policy_loss("vanilla")(
        log_probs, old_log_probs, mb.advantages, mb.response_mask, clip_eps, num_tokens
    )
    theirs, metrics = verl_vanilla_loss(verl_math, log_probs, old_log_probs, mb, verl_actor_config(clip_eps, num_tokens))
    close(ours, theirs)
    assert clip_fraction.item() == pytest.approx(metrics["actor/pg_clipfrac"], abs=ATOL)
    assert 0 < clip_fraction.item() < 1  # the clipped branch is exercised
    assert metrics["actor/pg_clipfrac_lower"] == 0.0  # the dual clip never fires here


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_micro_batches_sum_to_verls_batch_loss(verl_math, seed):
    """The trainer's micro-batch shares (num_tokens = the batch's tokens) add up to verl's token mean, and each
    share equals verl's micro-batch loss with the batch's token count (global_batch_info.batch_num_tokens)."""
    groups = random_groups(seed + 100)
    rollouts = [r for group in groups for r in group]
    advantages = [a for group in groups for a in grpo_advantages([r.reward for r in group])]
    size = max(1, len(rollouts) // 3)
    micro = [pack_micro_batch(rollouts[i : i + size], advantages[i : i + size], PAD_ID) for i in range(0, len(rollouts), size)]
    num_tokens = float(sum(mb.num_tokens for mb in micro))
    gen = torch.Generator().manual_seed(seed)
    ours_total, theirs_total = torch.tensor(0.0), torch.tensor(0.0)
    for mb in micro:
        log_probs, old_log_probs = random_log_probs(gen, mb.response_mask, spread=0.5)
        ours, _ = get_policy_loss("vanilla")(log_probs, old_log_probs, mb.advantages, mb.response_mask, 0.2, num_tokens)
        theirs, _ = verl_vanilla_loss(verl_math, log_probs, old_log_probs, mb, verl_actor_config(0.2, num_tokens))
        close(ours, theirs)
        ours_total, theirs_total = ours_total + ours, theirs_total + theirs
    close(ours_total, theirs_total)


def test_verls_dual_clip_is_the_one_difference_for_large_ratios(verl_math):
    """Ratios up to e^3: with verl's default clip_ratio_c = 3 the losses differ exactly on the tokens with
    A < 0 and ratio > 3 (verl caps those at -3A); with the dual clip out of reach they agree."""
    mb, _ = our_batch(random_groups(11))
    gen = torch.Generator().manual_seed(11)
    log_probs, old_log_probs = random_log_probs(gen, mb.response_mask, spread=3.0)
    n = float(mb.num_tokens)
    ours, _ = get_policy_loss("vanilla")(log_probs, old_log_probs, mb.advantages, mb.response_mask, 0.2, n)
    no_dual, _ = verl_vanilla_loss(verl_math, log_probs, old_log_probs, mb, verl_actor_config(0.2, n, clip_ratio_c=1e9))
    close(ours, no_dual)
    dual, metrics = verl_vanilla_loss(verl_math, log_probs, old_log_probs, mb, verl_actor_config(0.2, n))
    ratio = torch.exp(log_probs - old_log_probs)
    capped = mb.response_mask.bool() & (mb.advantages < 0) & (ratio > 3.0)
    assert capped.any() and metrics["actor/pg_clipfrac_lower"] > 0
    expected_gap = ((-mb.advantages * ratio) - (-mb.advantages * 3.0))[capped].sum() / n
    close(ours - dual, expected_gap, atol=1e-5)
    assert float(ours - dual) > 0


# --- KL, entropy, log-probs and the token mean ----------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_low_variance_kl_and_its_token_mean_match_verls(verl_math, seed):
    mb, _ = our_batch(random_groups(seed))
    gen = torch.Generator().manual_seed(1000 + seed)
    log_probs = -5.0 * torch.rand(mb.response_mask.shape, generator=gen)
    # log-ratios up to +-30 reach both of verl's clamps (log-ratio to +-20, the estimate to +-10)
    ref_log_probs = log_probs + 30.0 * (2 * torch.rand(mb.response_mask.shape, generator=gen) - 1) ** 3
    ours = kl_low_var(log_probs, ref_log_probs)
    theirs = verl_math.kl_penalty(logprob=log_probs, ref_logprob=ref_log_probs, kl_penalty="low_var_kl")
    close(ours, theirs)
    assert bool((theirs == 10.0).any())  # the clamp was exercised
    n = float(mb.num_tokens)
    close(
        masked_mean(ours, mb.response_mask, n),
        verl_math.agg_loss(loss_mat=theirs, loss_mask=mb.response_mask, loss_agg_mode="token-mean", dp_size=1, batch_num_tokens=n),
    )


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_log_probs_entropy_and_token_mean_match_verls(verl_math, seed):
    from verl.utils import torch_functional as verl_F

    mb, _ = our_batch(random_groups(seed))
    gen = torch.Generator().manual_seed(2000 + seed)
    logits = 4.0 * torch.randn((*mb.targets.shape, 37), generator=gen)
    targets = torch.randint(0, 37, mb.targets.shape, generator=gen)
    close(token_log_probs(logits, targets), verl_F.logprobs_from_logits(logits, targets))
    ours_entropy, theirs_entropy = entropy_from_logits(logits), verl_F.entropy_from_logits(logits)
    close(ours_entropy, theirs_entropy)
    close(
        masked_mean(ours_entropy, mb.response_mask),
        verl_math.agg_loss(loss_mat=theirs_entropy, loss_mask=mb.response_mask, loss_agg_mode="token-mean"),
    )


def test_token_mean_edge_cases(verl_math):
    values = torch.tensor([[1.0, 2.0, 30.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(masked_mean(values, mask), verl_math.agg_loss(values, mask, "token-mean"))
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    empty = torch.zeros_like(mask)
    assert masked_mean(values, empty).item() == 0.0
    assert math.isnan(verl_math.agg_loss(values, empty, "token-mean").item())
