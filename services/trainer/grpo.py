"""The GRPO update loop: sample a group of responses per problem, score them, take one policy step.

Each step
1. takes the next `batch_size` problems from a seeded shuffle of the selection
   (one shuffle per epoch; an epoch's remainder smaller than a batch is skipped, like a
   data loader with drop_last),
2. samples `n_samples` responses per problem with the current policy (on-policy; the
   sampling seed is derived from the config's seed and the step) and rewards them —
   or, on the first step, reuses responses already generated with the same checkpoint,
3. computes group-relative advantages (gradalign_common.advantages.grpo_advantages),
4. computes the old (and, with a reference model, the reference) log-probs without
   gradients, then
5. takes one AdamW step on the clipped surrogate (+ kl_coef * k3 KL - entropy_coef *
   entropy), token-mean over the batch, with gradients accumulated over micro-batches
   of `micro_batch_size` responses and clipped to `max_grad_norm`.

The model stays in eval mode (no dropout) so the old log-probs equal the new ones at the
start of the update, as in verl, which turns dropout off for RL. The model is updated
in place; runs are deterministic for a seed on the same machine.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from gradalign_common.advantages import grpo_advantages
from gradalign_common.errors import InvalidInputError
from gradalign_common.generation import Sampling, generate_rollouts
from gradalign_common.logging_setup import get_logger
from gradalign_common.records import Problem, RolloutRecord, group_rollouts
from gradalign_common.rewards import get_reward_fn
from services.trainer.losses import entropy_from_logits, get_policy_loss, kl_low_var, masked_mean, token_log_probs

log = get_logger("gradalign.trainer.grpo")


@dataclass(frozen=True)
class GRPOConfig:
    steps: int = 1
    batch_size: int = 8  # problems per step
    n_samples: int = 8  # responses per problem
    learning_rate: float = 1e-6  # AdamW
    weight_decay: float = 0.0  # AdamW, decoupled
    clip_eps: float = 0.2  # PPO ratio clip
    kl_coef: float = 0.0  # low-variance KL to the reference model; > 0 needs one
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 16  # responses per forward/backward
    policy_loss: str = "vanilla"  # a name in services.trainer.losses.POLICY_LOSSES
    # sampling of the on-policy rollouts (see sampling())
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    generation_batch_size: int = 32  # problems per generate call

    def validate(self) -> None:
        """Raise InvalidInputError naming the first out-of-range field."""
        at_least_one = ("steps", "batch_size", "n_samples", "micro_batch_size", "max_tokens", "generation_batch_size")
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_samples < 2:
            raise InvalidInputError("n_samples must be >= 2: GRPO advantages of a group of one are zero")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise InvalidInputError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.clip_eps < 1:
            raise InvalidInputError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        for name in ("kl_coef", "entropy_coef", "weight_decay"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_grad_norm <= 0:
            raise InvalidInputError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.temperature <= 0:
            raise InvalidInputError(f"temperature must be > 0 (GRPO needs sampled responses), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        get_policy_loss(self.policy_loss)

    def sampling(self, step: int) -> Sampling:
        """Sampling parameters of step `step` (0-based), its seed derived from (seed, step)."""
        return Sampling(
            n=self.n_samples,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=step_seed(self.seed, step),
            stop=self.stop,
        )


@dataclass(frozen=True)
class StepMetrics:
    step: int  # 1-based optimizer step
    loss: float
    mean_reward: float
    kl: float  # token-mean k3 KL to the reference model; 0 without one
    grad_norm: float  # before clipping
    entropy: float  # token-mean entropy of the policy on the batch's responses
    response_length: float  # mean response tokens
    tokens_per_second: float  # response tokens of the step / the step's wall seconds (sampling + update)
    clip_fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


StepCallback = Callable[[StepMetrics], None]


def step_seed(seed: int, step: int) -> int:
    """A 31-bit sampling seed for (seed, step), well mixed so nearby steps do not share streams."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, step]).generate_state(1)[0] >> 1)


def batch_for_step(problems: Sequence[Problem], batch_size: int, seed: int, step: int) -> list[Problem]:
    """Problems of step `step` (0-based): a slice of epoch step // batches_per_epoch's seeded shuffle."""
    if batch_size > len(problems):
        raise InvalidInputError(f"batch_size {batch_size} is larger than the selection ({len(problems)} problems)")
    per_epoch = len(problems) // batch_size
    epoch, index = divmod(step, per_epoch)
    order = list(problems)
    random.Random(f"grpo-epoch:{seed}:{epoch}").shuffle(order)
    return order[index * batch_size : (index + 1) * batch_size]


@dataclass(frozen=True)
class MicroBatch:
    """Right-padded prompt + response sequences; token tensors are aligned with the targets (length T - 1)."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    targets: Tensor  # (B, T-1): input_ids shifted left
    response_mask: Tensor  # (B, T-1) float: 1 where the target is a response token
    advantages: Tensor  # (B, T-1) float: the response's advantage on its tokens

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def pack_micro_batch(rollouts: Sequence[RolloutRecord], advantages: Sequence[float], pad_id: int) -> MicroBatch:
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    n = len(rollouts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width - 1), dtype=torch.float32)
    token_advantages = torch.zeros((n, width - 1), dtype=torch.float32)
    for i, (r, adv) in enumerate(zip(rollouts, advantages)):
        p, q = len(r.prompt_ids), len(r.response_ids)
        if p == 0:
            raise InvalidInputError(f"problem {r.problem_id}: a rollout has no prompt tokens")
        input_ids[i, : p + q] = torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.long)
        attention_mask[i, : p + q] = 1
        # the logits at position t predict token t + 1: response tokens p..p+q-1 are targets p-1..p+q-2
        response_mask[i, p - 1 : p + q - 1] = 1.0
        token_advantages[i, p - 1 : p + q - 1] = adv
    position_ids = torch.clamp(attention_mask.cumsum(-1) - 1, min=0)
    return MicroBatch(input_ids, attention_mask, position_ids, input_ids[:, 1:], response_mask, token_advantages)


def target_logits(model, mb: MicroBatch) -> Tensor:
    """The model's logits predicting each target of the micro-batch: (B, T-1, V)."""
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids, use_cache=False)
    return out.logits[:, :-1]


def target_log_probs(model, mb: MicroBatch) -> Tensor:
    """log p(target) at every position of the micro-batch (use response_mask to keep the response's): (B, T-1)."""
    return token_log_probs(target_logits(model, mb), mb.targets)


class GRPOTrainer:
    """Runs GRPO steps on `problems` with `model` (updated in place); call `step()` or `run()`.

    `ref_model`, needed when kl_coef > 0, is frozen (eval mode, no gradients).
    `first_batch_rollouts` maps problem ids to responses sampled from the same weights as
    `model`; the first step uses them instead of sampling (see `_rollouts`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        problems: Sequence[Problem],
        config: GRPOConfig,
        ref_model=None,
        first_batch_rollouts: Mapping[str, Sequence[RolloutRecord]] | None = None,
    ):
        config.validate()
        if not problems:
            raise InvalidInputError("the selection is empty: no problems to train on")
        if config.batch_size > len(problems):
            raise InvalidInputError(
                f"batch_size {config.batch_size} is larger than the selection ({len(problems)} problems)"
            )
        ids = [p.problem_id for p in problems]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("the selection has duplicate problem ids")
        for data_source in {p.data_source for p in problems}:
            get_reward_fn(data_source)
        if config.kl_coef > 0 and ref_model is None:
            raise InvalidInputError("kl_coef > 0 needs a reference model")
        self.model = model
        self.tokenizer = tokenizer
        self.problems = list(problems)
        self.config = config
        self.ref_model = ref_model
        self.first_batch_rollouts = dict(first_batch_rollouts or {})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(config.seed)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.policy_loss = get_policy_loss(config.policy_loss)
        self.steps_done = 0
        model.eval()
        if ref_model is not None:
            ref_model.eval()
            ref_model.requires_grad_(False)

    def run(self, on_step: StepCallback | None = None) -> list[StepMetrics]:
        """Run the remaining steps up to config.steps; on_step is called after each."""
        history = []
        while self.steps_done < self.config.steps:
            metrics = self.step()
            history.append(metrics)
            if on_step:
                on_step(metrics)
        return history

    def step(self) -> StepMetrics:
        """Sample, score and take one optimizer step; returns the step's metrics."""
        start = time.perf_counter()
        step = self.steps_done
        problems = batch_for_step(self.problems, self.config.batch_size, self.config.seed, step)
        groups = self._rollouts(problems, step)
        rollouts = [r for group in groups for r in group]
        advantages = [a for group in groups for a in grpo_advantages([r.reward for r in group])]
        totals, grad_norm = self._update(self._micro_batches(rollouts, advantages))
        self.steps_done += 1

        response_tokens = sum(len(r.response_ids) for r in rollouts)
        seconds = time.perf_counter() - start
        return StepMetrics(
            step=self.steps_done,
            loss=totals["loss"],
            mean_reward=sum(r.reward for r in rollouts) / len(rollouts),
            kl=totals["kl"],
            grad_norm=grad_norm,
            entropy=totals["entropy"],
            response_length=response_tokens / len(rollouts),
            tokens_per_second=response_tokens / seconds if seconds > 0 else 0.0,
            clip_fraction=totals["clip_fraction"],
        )

    def _update(self, micro_batches: Sequence[MicroBatch]) -> tuple[dict[str, float], float]:
        """One optimizer step on the batch; returns the batch's token-mean loss terms and the gradient norm."""
        num_tokens = float(sum(mb.num_tokens for mb in micro_batches))
        with torch.no_grad():
            old_log_probs = [target_log_probs(self.model, mb) for mb in micro_batches]
            ref_log_probs = None
            if self.ref_model is not None:
                ref_log_probs = [target_log_probs(self.ref_model, mb) for mb in micro_batches]

        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        for i, mb in enumerate(micro_batches):
            # each micro-batch's terms are its tokens' sums / the batch's tokens: they add up to token means
            logits = target_logits(self.model, mb)
            log_probs = token_log_probs(logits, mb.targets)
            loss, clip_fraction = self.policy_loss(
                log_probs, old_log_probs[i], mb.advantages, mb.response_mask, self.config.clip_eps, num_tokens
            )
            if ref_log_probs is not None:
                kl = masked_mean(kl_low_var(log_probs, ref_log_probs[i]), mb.response_mask, num_tokens)
                loss = loss + self.config.kl_coef * kl
                totals["kl"] += kl.item()
            if self.config.entropy_coef > 0:
                entropy = masked_mean(entropy_from_logits(logits), mb.response_mask, num_tokens)
                loss = loss - self.config.entropy_coef * entropy
            else:
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits), mb.response_mask, num_tokens)
            loss.backward()
            totals["loss"] += loss.item()
            totals["entropy"] += entropy.item()
            totals["clip_fraction"] += clip_fraction.item()

        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:  # as verl: a non-finite gradient skips the update rather than poisoning the weights
            log.warning("non_finite_grad_norm", step=self.steps_done + 1, grad_norm=float(grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        return totals, float(grad_norm)

    def _rollouts(self, problems: Sequence[Problem], step: int) -> list[list[RolloutRecord]]:
        """n_samples rewarded responses per problem, in problem order.

        On the first step a problem with at least n_samples reused responses takes its
        first n_samples of them; every other problem is sampled now with the current policy.
        """
        n = self.config.n_samples
        reusable = self.first_batch_rollouts if step == 0 else {}
        groups: dict[str, list[RolloutRecord]] = {}
        to_sample = []
        for p in problems:
            records = reusable.get(p.problem_id, ())
            if len(records) >= n:
                groups[p.problem_id] = list(records[:n])
            else:
                to_sample.append(p)
        if to_sample:
            sampled = generate_rollouts(
                self.model,
                self.tokenizer,
                to_sample,
                self.config.sampling(step),
                batch_size=self.config.generation_batch_size,
            )
            groups.update(group_rollouts(sampled))
        return [groups[p.problem_id] for p in problems]

    def _micro_batches(self, rollouts: Sequence[RolloutRecord], advantages: Sequence[float]) -> list[MicroBatch]:
        size = self.config.micro_batch_size
        return [
            pack_micro_batch(rollouts[i : i + size], advantages[i : i + size], self.pad_id).to(self.device)
            for i in range(0, len(rollouts), size)
        ]


