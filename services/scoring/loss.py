"""The scored loss (shared/spec/gradalign-score.md, "Losses"): the one definition both scoring paths use.

For response tokens t with weights w_t (an advantage A_j, or A_j / denominator) and the model's
logits at the position before each token,
    loss = - sum_t w_t log p(target_t),
with log-softmax taken in float32 or wider (float64 for a float64 model). The one-group-per-backward
path (services.scoring.exact_loop) and the batched path with materialised logits call
`policy_gradient_loss`; the batched path's default, lm_head in chunks of tokens
(services.scoring.head_loss), takes the same log-softmax of the same logits chunk by chunk, and the
scoring-exact tests hold the two to each other and to an independent autograd reference.
"""

from __future__ import annotations

import torch


def policy_gradient_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-sum_t weights[t] * log softmax(logits[t])[targets[t]], for logits [tokens, vocab] and targets,
    weights [tokens]; the weights are cast to the log-probabilities' dtype and device."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return -(weights.to(device=log_p.device, dtype=log_p.dtype) * log_p).sum()
