"""One group's lm_head statistics from its tokens' lm_head inputs h [n, H] and logit gradients dz [n, V].

The group's lm_head weight gradient is G = dz^T h [V, H]. What exact scoring needs of it, <G~, v> and
||G~||^2 with G~ = G * c (c the preconditioner's factors, when given), is computed in one of two forms:
- dense (`dense_signals`): G formed in slices of the vocabulary, [rows, H] at a time, so no
  vocabulary x hidden tensor exists at once; the same work as the weight gradient autograd forms;
- token Gram (`gram_signals`): ||G||^2 = sum_ts (dz_t . dz_s)(h_t . h_s) and <G, v> = sum_t dz_t . (v h_t),
  never forming G: cheaper when the group has few tokens (n^2 (V + H) < 2 V H, `gram_is_cheaper`);
  not available with a preconditioner (G * c has no Gram form).
`rows_at` gives G's rows at some token ids (a tied weight's cross term with the embedding's rows);
`accumulate_gradient` adds G into a dense buffer (a group spread over several chunks). Products are taken
in the accumulation dtype (float32, float64 for a float64 model); every function returns 0-d tensors.
"""

from __future__ import annotations

import torch


def vocabulary_step(hidden: int, element_bytes: int, slice_bytes: int) -> int:
    """How many vocabulary rows of a [rows, hidden] gradient slice fit in slice_bytes (at least 1)."""
    return max(1, slice_bytes // max(1, hidden * element_bytes))


def gram_is_cheaper(n_tokens: int, vocab: int, hidden: int) -> bool:
    """Whether the token-Gram form costs fewer operations than forming the dense vocab x hidden gradient."""
    return n_tokens * n_tokens * (vocab + hidden) < 2 * vocab * hidden


def dense_signals(dz: torch.Tensor, h: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None, acc: torch.dtype,
                  step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(<G * c, v>, ||G * c||^2) for G = dz^T h, formed `step` vocabulary rows at a time in h's dtype (as
    autograd forms it) and reduced in acc."""
    dot = torch.zeros((), dtype=acc, device=h.device)
    sq = torch.zeros((), dtype=acc, device=h.device)
    for r0 in range(0, dz.shape[1], step):
        r1 = min(r0 + step, dz.shape[1])
        g = (dz[:, r0:r1].T @ h).to(acc)
        if c is not None:
            g = g * c[r0:r1]
        dot += torch.tensordot(g, v[r0:r1], dims=2)
        sq += torch.tensordot(g, g, dims=2)
        del g  # before the next slice is formed
    return dot, sq


def gram_signals(dz: torch.Tensor, h: torch.Tensor, v: torch.Tensor, acc: torch.dtype,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(<G, v>, ||G||^2) for G = dz^T h without forming G: sum_t dz_t . (v h_t) over vocabulary slices of v
    (`step` rows at a time), and the elementwise product of the tokens' Gram matrices."""
    d, x = dz.to(acc), h.to(acc)
    dot = torch.zeros((), dtype=acc, device=h.device)
    for r0 in range(0, d.shape[1], step):
        r1 = min(r0 + step, d.shape[1])
        dot += (d[:, r0:r1] * (x @ v[r0:r1].T)).sum()
    sq = ((d @ d.T) * (x @ x.T)).sum()
    return dot, sq


def rows_at(dz: torch.Tensor, h: torch.Tensor, ids: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """G's rows at token ids `ids`, [len(ids), H] in acc: dz[:, ids]^T h."""
    return (dz[:, ids].T @ h).to(acc)


def accumulate_gradient(buffer: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, step: int) -> None:
    """buffer [V, H] += dz^T h, `step` vocabulary rows at a time (each slice formed in h's dtype)."""
    for r0 in range(0, dz.shape[1], step):
        r1 = min(r0 + step, dz.shape[1])
        buffer[r0:r1] += (dz[:, r0:r1].T @ h).to(buffer.dtype)


def tensor_signals(g: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None,
                   step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(<g * c, v>, ||g * c||^2) of a dense gradient g (in the accumulation dtype), `step` rows at a time."""
    dot = torch.zeros((), dtype=g.dtype, device=g.device)
    sq = torch.zeros((), dtype=g.dtype, device=g.device)
    for r0 in range(0, g.shape[0], step):
        part = g[r0 : r0 + step]
        if c is not None:
            part = part * c[r0 : r0 + step]
        dot += torch.tensordot(part, v[r0 : r0 + step], dims=part.dim())
        sq += torch.tensordot(part, part, dims=part.dim())
        del part
    return dot, sq
