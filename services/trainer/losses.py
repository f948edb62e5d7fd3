"""The GRPO loss terms as pure tensor functions, after verl's `trainer/ppo/core_algos.py`.

Shapes: per-token tensors are (batch, tokens); `mask` is 1.0 on valid response tokens
and 0.0 on prompt and padding positions; `advantages` is per token (a response's
advantage broadcast over its tokens).

Aggregation is the token mean over every valid response token of the batch
("token-mean" in verl). When a batch is split into micro-batches for gradient
accumulation, pass the batch's total token count as `num_tokens`: each micro-batch
then returns its share, and the shares sum to the batch's token mean.

Policy-loss modes live in a small registry, like verl's `register_policy_loss`, under the
names verl's `actor.policy_loss.loss_mode` uses; "vanilla" is the clipped PPO surrogate.
The trainer's `policy_loss` setting (GRADALIGN_TRAINER_POLICY_LOSS, default "vanilla") picks
one: validated against this registry at start-up, it reaches GRPOConfig.policy_loss (the torch
backend calls it; the verl backend passes the name to verl).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from gradalign_common.registry import Registry

LOG_RATIO_CLAMP = 20.0  # verl clamps log-ratios to [-20, 20] before exp
KL_CLAMP = 10.0  # verl clamps the k3 estimate to [-10, 10]

PolicyLossFn = Callable[..., tuple[Tensor, Tensor]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss", "policy losses")


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register fn(log_probs, old_log_probs, advantages, mask, clip_eps, num_tokens) -> (loss, clip_fraction)."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        return POLICY_LOSSES.add(name, fn)

    return decorator


def policy_loss_names() -> list[str]:
    return POLICY_LOSSES.names()


def get_policy_loss(name: str) -> PolicyLossFn:
    return POLICY_LOSSES.get(name)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum()


def masked_mean(values: Tensor, mask: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """Sum of values over the mask divided by num_tokens (default: the mask's count); 0 for an empty mask."""
    denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=values.dtype)
    return masked_sum(values, mask) / torch.clamp(denominator, min=1e-8)


def token_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] per position, in float32: (B, T, V), (B, T) -> (B, T)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position, in float32: (B, T, V) -> (B, T)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_low_var(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || ref): exp(ref - lp) - (ref - lp) - 1, clamped as verl does."""
    log_ratio = torch.clamp(ref_log_probs - log_probs, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    kl = torch.exp(log_ratio) - log_ratio - 1
    return torch.clamp(kl, min=-KL_CLAMP, max=KL_CLAMP)


@register_policy_loss("vanilla")
def vanilla_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped PPO surrogate: token mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(lp - old_lp).

    Returns (loss, clip_fraction); clip_fraction is the share of tokens where the clipped
    term is the larger one (its gradient is zero there), aggregated like the loss.
    """
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    losses = torch.maximum(unclipped, clipped)
    clip_fraction = masked_mean(torch.gt(clipped, unclipped).float(), mask, num_tokens)
    return masked_mean(losses, mask, num_tokens), clip_fraction.detach()
