"""The `exact-loop` method: the spec's definition the straightforward way, one group per backward.

Each group's full gradient is formed by autograd from one right-padded forward of its responses,
then reduced against g_V parameter by parameter in float64. It is exact's reference, and what
exact falls back to for a model whose layers the batched path does not know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from services.scoring.groups import Group
from services.scoring.layout import requires_grad_only
from services.scoring.loss import policy_gradient_loss
from services.scoring.score_records import ProgressCallback

if TYPE_CHECKING:
    from services.scoring.engine import Preconditioner, ScoringEngine


def validation_gradient(
    engine: "ScoringEngine", groups: Sequence[Group], n_tokens: int, preconditioner: "Preconditioner | None",
    progress: ProgressCallback | None,
) -> torch.Tensor:
    """grad L_V (preconditioned when given), not normalised, as one flat vector over every trainable parameter."""
    flat = torch.zeros(engine.n_parameters, dtype=engine.gradient_dtype, device=engine.device)
    for done, group in enumerate(groups, start=1):
        if not group.zero_advantage:
            for chunk, grad in zip(torch.split(flat, engine.numels), group_gradient(engine, group, n_tokens)):
                chunk.add_(grad.reshape(-1).to(flat.dtype))
        if progress is not None:
            progress(done, len(groups))
    if preconditioner is not None:
        for chunk, inverse in zip(torch.split(flat, engine.numels), preconditioner.inverse):
            chunk.mul_(inverse.reshape(-1).to(flat.dtype))
    return flat


def candidate_signals(
    engine: "ScoringEngine", groups: Sequence[Group], g_v: torch.Tensor, preconditioner: "Preconditioner | None"
) -> Iterator[tuple[float, float]]:
    """(<g~_i, g_V>, ||g~_i||^2) of each group, in order, one backward per group."""
    for group in groups:
        grads = group_gradient(engine, group, group.n_response_tokens)
        if preconditioner is not None:
            grads = [g.to(torch.float64) * inv for g, inv in zip(grads, preconditioner.inverse)]
        yield dot_and_squared_norm(grads, g_v, engine.numels, engine.device)


def group_gradient(engine: "ScoringEngine", group: Group, denominator: int) -> list[torch.Tensor]:
    """Gradients of -sum_j sum_t A_j log p_jt / denominator, one tensor per trainable parameter."""
    params = engine.params
    with requires_grad_only(params, range(len(params))):
        loss = _group_loss(engine.model, group, denominator, engine.device)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _group_loss(model: torch.nn.Module, group: Group, denominator: int, device: torch.device) -> torch.Tensor:
    """The group's responses in one right-padded forward; returns the advantage-weighted token loss."""
    rows = [r.prompt_ids + r.response_ids for r in group.records]
    width = max(len(row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    # Row b's logits at column c predict input_ids[b, c + 1]; response tokens are predicted
    # from columns len(prompt) - 1 .. len(row) - 2.
    token_weights = torch.zeros((len(rows), width - 1), dtype=torch.float64)
    for b, (row, record, advantage) in enumerate(zip(rows, group.records, group.advantages)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        token_weights[b, len(record.prompt_ids) - 1 : len(row) - 1] = advantage
    position_ids = torch.arange(width).expand(len(rows), width)
    is_weighted = token_weights != 0.0  # response tokens; a response with A_j = 0 adds nothing
    input_ids, attention_mask, position_ids = (t.to(device) for t in (input_ids, attention_mask, position_ids))

    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    weights = token_weights[is_weighted]
    is_weighted = is_weighted.to(device)
    return policy_gradient_loss(logits[:, :-1][is_weighted], input_ids[:, 1:][is_weighted], weights) / denominator


def dot_and_squared_norm(
    grads: Sequence[torch.Tensor], g_v: torch.Tensor, numels: Sequence[int], device: torch.device
) -> tuple[float, float]:
    """(<g, g_V>, ||g||^2) accumulated in float64, parameter by parameter."""
    dot = torch.zeros((), dtype=torch.float64, device=device)
    sq_norm = torch.zeros((), dtype=torch.float64, device=device)
    for grad, chunk in zip(grads, torch.split(g_v, list(numels))):
        g = grad.reshape(-1).to(torch.float64)
        dot += torch.dot(g, chunk.to(torch.float64))
        sq_norm += torch.dot(g, g)
    return dot.item(), sq_norm.item()
