"""The reference's scoring method, re-implemented for `gradalign bench scoring` (its baseline).

StigLidu/GradAlign, select/parallel/grpo_grad_analyze_parallel.py: one group at a time, its
gradient accumulated into .grad, a float32 clone of every parameter's gradient, then Python
loops over the parameters for the norm, the normalisation and the dot product (with the
per-module dot "distribution" the reference reports). It follows the spec's loss and cosine
(the reference adds 1e-5 to norms and scales its loss, which changes scores by ~1e-5); no FSDP
and no gradient checkpointing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gradalign_common.advantages import accuracy, grpo_advantages, is_zero_advantage
from gradalign_common.records import RolloutRecord, ScoreRecord, group_rollouts
from gradalign_common.selection import GroupSignals, get_mode


def response_tokens(rollouts: Sequence[RolloutRecord]) -> int:
    """The number of response tokens of the rollouts."""
    return sum(len(r.response_ids) for r in rollouts)


class ReferenceMethod:
    """The reference's per-group scoring, re-implemented (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, mini_batch_size: int = 32):
        self.model = model
        self.device = device
        self.mini_batch_size = mini_batch_size

    def _accumulate_gradients(self, groups: list[list[RolloutRecord]], advantages: list[list[float]], denominator_of) -> None:
        """model.zero_grad, then forward and backward in mini-batches of responses, gradients into .grad."""
        self.model.zero_grad(set_to_none=True)
        items = [(r, a, denominator_of(gi)) for gi, (g, adv) in enumerate(zip(groups, advantages)) for r, a in zip(g, adv)]
        for start in range(0, len(items), self.mini_batch_size):
            batch = items[start : start + self.mini_batch_size]
            width = max(len(r.prompt_ids) + len(r.response_ids) for r, _, _ in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            response_mask = torch.zeros((len(batch), width), dtype=torch.float64)
            scale = torch.zeros((len(batch), 1), dtype=torch.float64)
            for b, (r, a, d) in enumerate(batch):
                ids = list(r.prompt_ids) + list(r.response_ids)
                input_ids[b, : len(ids)] = torch.tensor(ids)
                attention_mask[b, : len(ids)] = 1
                response_mask[b, len(r.prompt_ids) : len(ids)] = 1.0
                scale[b] = a / d
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            positions = torch.arange(width, device=self.device).expand(len(batch), width)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                use_cache=False).logits
            # compute_log_probs: log-softmax over every position, the next token's log-probability.
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            mask = (response_mask[:, 1:] * scale).to(self.device, log_probs.dtype)
            loss = -(log_probs * mask).sum()
            loss.backward()

    def _gradients(self, normalise: bool) -> tuple[dict[str, torch.Tensor], float]:
        gradients: dict[str, torch.Tensor] = {}
        norm_sq = torch.tensor(0.0, dtype=torch.float32, device=self.device)
        for name, param in self.model.named_parameters():
            if param.grad is not None:
                grad = param.grad.clone().detach().to(torch.float32)
                gradients[name] = grad
                norm_sq += torch.sum(grad**2)
        norm = float(norm_sq.item()) ** 0.5
        if normalise:
            for name in gradients:
                gradients[name] = gradients[name] / norm
        return gradients, norm

    def validation_gradient(self, validation: Sequence[RolloutRecord]) -> dict[str, torch.Tensor]:
        groups = list(group_rollouts(validation).values())
        total = response_tokens(validation)
        self._accumulate_gradients(groups, [grpo_advantages([r.reward for r in g]) for g in groups], lambda _: total)
        return self._gradients(normalise=True)[0]

    def score(self, candidates: Sequence[RolloutRecord], g_v: dict[str, torch.Tensor], mode: str) -> list[ScoreRecord]:
        mode = get_mode(mode)
        out = []
        for pid, group in group_rollouts(candidates).items():
            rewards = [r.reward for r in group]
            advantages = grpo_advantages(rewards)
            zero = is_zero_advantage(advantages)
            cosine = dot = 0.0
            if not zero:
                self._accumulate_gradients([group], [advantages], lambda _: response_tokens(group))
                gradients, norm = self._gradients(normalise=mode.name != "dot")
                total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
                per_module: dict[str, torch.Tensor] = {}
                for name in g_v:
                    dp = torch.sum(g_v[name].flatten() * gradients[name].flatten())
                    total += dp
                    module = name.rsplit(".", 1)[0]
                    per_module[module] = per_module.get(module, 0.0) + dp
                _distribution = {m: float(v.item()) for m, v in per_module.items()}  # noqa: F841 - reported by the reference
                cosine = dot = float(total.item())
                if mode.name == "dot":
                    cosine = dot / norm if norm > 0 else 0.0
                else:
                    dot = cosine * norm
            signals = GroupSignals(accuracy(rewards), zero, cosine=cosine, dot=dot)
            out.append(ScoreRecord(pid, mode.score(signals), accuracy(rewards), len(group), zero))
        self.model.zero_grad(set_to_none=True)
        return out
