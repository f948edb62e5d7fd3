"""The LM head's part of the scored loss in chunks of tokens: the logits never exist for all tokens at once.

For the selected positions' hidden states h [T, H], lm_head's weight W [V, H] (and bias b), the target
tokens and per-token weights w_t (shared/spec/gradalign-score.md, "Losses"),
    loss = - sum_t w_t log softmax(h_t W^T + b)[target_t],
computed chunk by chunk of tokens (`head_chunks`). A chunk's logits [Tc, V] are formed in the model's
dtype and log-softmax is taken in float32 or wider, as services.scoring.loss does; while they are alive,
the chunk's logit gradient
    dz_t = w_t (softmax(z_t) - onehot(target_t))
is formed in place and cast to the model's dtype (what autograd's backward of that cast hands lm_head),
and from it, in the same chunk:
    dh = dz W                     (the gradient reaching the base model, saved for the backward),
    dW += dz^T h, db += sum_t dz  (only when the weight or bias asks for a gradient: the plain path),
and `consumer(t0, t1, h_chunk, dz_chunk)` sees the chunk (a collector's per-group statistics of lm_head).
Nothing is recomputed: the cost is that of autograd's forward and backward of lm_head (three T x V x H
matmuls), the memory one chunk's logits and their gradient instead of all tokens' (several copies in
float32 on the materialised path).

The gradients formed in the forward are those of the loss itself; the backward scales them by the
incoming gradient. A consumer's statistics assume that gradient is 1 (the passes differentiate the loss
directly), and so does `weight_grad_into` (dW added straight into a running sum, e.g. the plain path's,
instead of being handed to autograd: no vocabulary x hidden gradient beside the sum); the backward refuses
any other.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

HeadConsumer = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""consumer(t0, t1, h[t0:t1], dz[t0:t1]): one chunk of selected tokens' lm_head input and output gradient."""


def head_chunks(slot_ranges: Sequence[tuple[int, int]], chunk_tokens: int) -> list[tuple[int, int]]:
    """Token ranges [t0, t1) covering the slots' consecutive token ranges, each at most chunk_tokens long:
    consecutive whole slots packed together; a slot longer than chunk_tokens split into near-equal pieces,
    each a chunk of its own (so a chunk holds whole slots, or a piece of one)."""
    chunk_tokens = max(1, int(chunk_tokens))
    chunks: list[tuple[int, int]] = []
    start = end = None
    for t0, t1 in slot_ranges:
        if t1 <= t0:
            continue
        if t1 - t0 > chunk_tokens:
            if start is not None:
                chunks.append((start, end))
                start = None
            pieces = -(-(t1 - t0) // chunk_tokens)
            bounds = [t0 + (t1 - t0) * i // pieces for i in range(pieces + 1)]
            chunks.extend(zip(bounds[:-1], bounds[1:]))
            continue
        if start is not None and t1 - start > chunk_tokens:
            chunks.append((start, end))
            start = None
        if start is None:
            start = t0
        end = t1
    if start is not None:
        chunks.append((start, end))
    return chunks


def chunked_head_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    chunks: Sequence[tuple[int, int]],
    consumer: HeadConsumer | None = None,
    weight_grad_into: torch.Tensor | None = None,
) -> torch.Tensor:
    """-sum_t token_weights[t] * log softmax(h W^T + b)[t, targets[t]], in chunks of tokens (the module
    docstring), differentiable with respect to h, weight and bias (the weight's gradient added into
    `weight_grad_into` instead, when given). `chunks` must cover 0..T in order."""
    return _ChunkedHeadLoss.apply(h, weight, bias, targets, token_weights, tuple(chunks), consumer, weight_grad_into)


def chunk_logit_gradient(z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Turns one chunk's logits z [Tc, V] (float32 or wider, modified in place) into the gradient of
    -sum_t weights[t] log softmax(z_t)[targets[t]] with respect to z; returns that loss (0-d, z's dtype)."""
    rows = torch.arange(z.shape[0], device=z.device)
    target_logits = z[rows, targets]
    shift = z.amax(-1, keepdim=True)
    z.sub_(shift).exp_()
    sums = z.sum(-1, keepdim=True)
    log_z = (shift + sums.log()).squeeze(-1)  # logsumexp, as log_softmax computes it
    loss = -(weights * (target_logits - log_z)).sum()
    z.mul_(weights[:, None] / sums)  # w_t softmax(z_t)
    z[rows, targets] -= weights
    return loss


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, token_weights, chunks, consumer, weight_grad_into):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or weight_grad_into is not None
        need_b = bias is not None and ctx.needs_input_grad[2]
        work = torch.promote_types(h.dtype, torch.float32)
        w = token_weights.to(device=h.device, dtype=work)
        loss = torch.zeros((), dtype=work, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = weight_grad_into if weight_grad_into is not None else torch.zeros_like(weight, dtype=work) if need_w else None
        db = torch.zeros_like(bias, dtype=work) if need_b else None
        gradients = need_h or need_w or need_b or consumer is not None
        for t0, t1 in chunks:
            hc = h[t0:t1]
            z = torch.nn.functional.linear(hc, weight, bias).to(work)
            if not gradients:
                loss -= (w[t0:t1] * torch.log_softmax(z, -1).gather(-1, targets[t0:t1, None]).squeeze(-1)).sum()
                continue
            loss += chunk_logit_gradient(z, targets[t0:t1], w[t0:t1])
            dz = z.to(h.dtype)
            del z
            if consumer is not None:
                consumer(t0, t1, hc, dz)
            if need_h:
                torch.matmul(dz, weight, out=dh[t0:t1])
            if need_w:
                if dw.dtype == dz.dtype:
                    dw.addmm_(dz.T, hc)
                else:
                    dw.add_(dz.T @ hc)
            if need_b:
                db.add_(dz.sum(0))
            del dz  # before the next chunk's logits
        ctx.direct = consumer is not None or weight_grad_into is not None
        ctx.save_for_backward(dh, None if weight_grad_into is not None else dw, db)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw, db = ctx.saved_tensors
        scale = float(grad_loss)
        if ctx.direct and scale != 1.0:
            raise RuntimeError("a chunked lm_head loss seen by a consumer (or adding its weight's gradient into a "
                               "sum) must be differentiated directly (gradient 1)")
        dh, dw, db = (g if g is None or scale == 1.0 else g * scale for g in (dh, dw, db))
        return dh, dw, db, None, None, None, None, None
