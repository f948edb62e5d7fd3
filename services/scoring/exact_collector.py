"""ExactCollector: each group's exact <g~, g_V> and ||g~||^2 from a batch's hooks, without per-group gradients.

Every parameter's gradient is a sum over tokens of a per-token term built from the layer's
input and its output gradient, so each group's share is separated on the fly in the hooks
(services.scoring.passes.run_batch):

- nn.Linear weight W [out, in]: G_g = dY_g^T X_g, formed for every group of the batch by one
  batched matmul (the groups' tokens zero-padded to the longest group's), the same work as
  the weight gradient the backward would otherwise compute; its dot product with g_V and
  its squared norm follow. When groups have very few tokens (n^2 (in + out) < 2 in out),
  token Gram matrices are cheaper: ||G_g||^2 = sum((X_g X_g^T) * (dY_g dY_g^T)) and
  <G_g, V> = sum_t <dY_t, V X_t>.
- nn.Linear bias: the per-group sum of dY.
- RMSNorm weight (y = w * x_hat): the per-group sum of dY * x_hat, x_hat = y / w.
- lm_head weight, from chunks of tokens (services.scoring.head_loss): per group, the dense
  gradient in slices of the vocabulary or the token-Gram form (services.scoring.head_signals);
  a group whose tokens span several chunks accumulates its dense gradient until its last piece.
- nn.Embedding weight: the group's output gradients scattered onto its token ids (rows).
- A weight tied between the embedding and lm_head counts once: its per-group gradient is
  A_g + S_g (lm_head's dense part, the embedding's rows), and ||A_g + S_g||^2 =
  ||A_g||^2 + 2 <A_g[rows], S_g> + ||S_g||^2 needs only A_g's rows at the group's tokens.

Per-module dot products and squared norms are reduced in float32 (float64 for a float64
model) from per-group gradients formed in the model's dtype, and summed over modules in
float64. Memory per batch is that of one training step on the batch (plus one layer's
per-group gradients, in slices of bounded size), whatever the number of groups; a group
too large for one batch is split over several, and only then is its gradient accumulated
densely (one gradient's memory) until its last chunk.
"""

from __future__ import annotations

import bisect

import torch

from services.scoring.batching import ROWS, TOKENS, Batch
from services.scoring.head_signals import (accumulate_gradient, dense_signals, gram_is_cheaper, gram_signals, rows_at,
                                           tensor_signals, vocabulary_step)
from services.scoring.layout import ModelLayout, normalized_input


class ExactCollector:
    """Per group <g~, v> and ||g~||^2 for g~ = g * c, over the tracked parameters.

    `v` (param index -> tensor shaped like the parameter) is the normalised validation gradient
    in the same space; `c` (param index -> tensor), when given, is the preconditioner's
    1 / (sqrt(v_hat) + eps). `strategy` is auto (by cost), form or gram (tests force them).
    Every group's gradient of a layer comes from one batched matmul over the batch's groups
    (in slices of at most `chunk_bytes` of per-group gradients), formed in the model's dtype as
    autograd would; products are reduced in float32 (float64 for a float64 model) and summed
    over modules in float64.
    """

    def __init__(self, layout: ModelLayout, v: dict[int, torch.Tensor], c: dict[int, torch.Tensor] | None = None,
                 strategy: str = "auto", accumulate_dtype: torch.dtype = torch.float32, chunk_bytes: int = 64 << 20):
        self.layout = layout
        self.acc = accumulate_dtype
        self.v = {p: t.to(accumulate_dtype) for p, t in v.items()}
        self.c = None if c is None else {p: t.to(accumulate_dtype) for p, t in c.items()}
        self.strategy = strategy
        self.chunk_bytes = chunk_bytes
        self.tied = layout.embedding_index if layout.tied else None
        self._buffers: dict[int, dict[int, torch.Tensor]] = {}  # split groups: key -> param -> dense gradient
        self._divisible: dict[int, bool] = {}
        self.batch: Batch | None = None

    def begin(self, batch: Batch) -> None:
        self.batch = batch
        device = batch.device
        self._dot = torch.zeros(batch.n_slots, dtype=torch.float64, device=device)
        self._sq = torch.zeros(batch.n_slots, dtype=torch.float64, device=device)
        self._pending: dict[int, torch.Tensor] = {}  # tied weight, per slot: the first use's rows
        self._pending_all: list[torch.Tensor] = []  # tied weight, all slots in order: the first use's rows
        self._all_complete = all(c.complete for c in batch.chunks)
        self._head_partial: dict[int, dict[str, tuple[int, torch.Tensor]]] = {}  # slots spanning head chunks
        self._token_ends = [t1 for _, t1 in batch.token_ranges]

    @staticmethod
    def empty_result() -> tuple[float, float]:
        """The result of a group with no weighted response (nothing reaches the model)."""
        return 0.0, 0.0

    def finish(self) -> dict[int, tuple[float, float]]:
        """{group key: (dot, squared norm)} of the groups whose last chunk was in the batch."""
        out = {}
        dots, sqs = self._dot.tolist(), self._sq.tolist()
        for s, chunk in enumerate(self.batch.chunks):
            if not chunk.last:
                continue
            if chunk.complete:
                out[chunk.key] = (dots[s], sqs[s])
            else:
                out[chunk.key] = self._from_buffers(self._buffers.pop(chunk.key, {}))
        self.batch = None
        return out

    def _from_buffers(self, buffers: dict[int, torch.Tensor]) -> tuple[float, float]:
        dot = sq = 0.0
        for p, g in buffers.items():
            if self.c is not None:
                g = g * self.c[p]
            flat = g.reshape(-1)
            dot += torch.dot(flat, self.v[p].reshape(-1)).item()
            sq += torch.dot(flat, flat).item()
        return dot, sq

    def _buffer(self, key: int, p: int) -> torch.Tensor:
        per_param = self._buffers.setdefault(key, {})
        if p not in per_param:
            per_param[p] = torch.zeros_like(self.v[p])
        return per_param[p]

    # Contributions to one parameter.

    def _dense_many(self, first: int, p: int, g: torch.Tensor) -> None:
        """Slots first .. first + len(g) - 1 contribute the dense gradients g[0], g[1], ... to parameter p."""
        stop = first + g.shape[0]
        vectorized = self._all_complete and (p != self.tied or not self._pending)
        if not vectorized:
            for i in range(g.shape[0]):
                self._dense(first + i, p, g[i])
            return
        g = g.to(self.acc)
        if self.c is not None:
            g = g * self.c[p]
        flat = g.reshape(g.shape[0], -1)
        self._dot[first:stop] += torch.mv(flat, self.v[p].reshape(-1))
        self._sq[first:stop] += torch.linalg.vector_norm(flat, dim=1).square()
        if p == self.tied:  # keep the rows at each group's token ids for the cross term with the embedding's
            u0, u1 = self.batch.unique_range(first, stop)
            keys = self.batch.embedding_keys[u0:u1] - first * self.batch.radix
            self._pending_all.append(g.reshape(-1, g.shape[-1])[keys])

    def _dense(self, s: int, p: int, g: torch.Tensor) -> None:
        chunk = self.batch.chunks[s]
        if not chunk.complete:
            self._buffer(chunk.key, p).add_(g)
            return
        g = g.to(self.acc)
        if self.c is not None:
            g = g * self.c[p]
        flat = g.reshape(-1)
        self._dot[s] += torch.dot(flat, self.v[p].reshape(-1))
        self._sq[s] += torch.dot(flat, flat)
        if p == self.tied:
            self._cross(s, g[self.batch.embedding_rows(s)[1]])

    def _rows(self, s: int, p: int, rows: torch.Tensor, g: torch.Tensor) -> None:
        chunk = self.batch.chunks[s]
        if not chunk.complete:
            self._buffer(chunk.key, p).index_add_(0, rows, g.to(self.acc))
            return
        g = g.to(self.acc)
        if self.c is not None:
            g = g * self.c[p][rows]
        flat = g.reshape(-1)
        self._dot[s] += torch.dot(flat, self.v[p][rows].reshape(-1))
        self._sq[s] += torch.dot(flat, flat)
        if p == self.tied:
            self._cross(s, g)

    def _cross(self, s: int, rows: torch.Tensor) -> None:
        """The tied weight's cross term 2 <A[rows], S>, from whichever of its two uses comes second."""
        other = self._pending.pop(s, None)
        if other is None:
            self._pending[s] = rows
        else:
            self._sq[s] += 2.0 * torch.dot(other.reshape(-1), rows.reshape(-1)).to(torch.float64)

    def _use_gram(self, p: int, n_tokens: int) -> bool:
        if self.c is not None or p == self.tied or not self._all_complete:
            return False
        if self.strategy != "auto":
            return self.strategy == "gram"
        out_features, in_features = self.v[p].shape
        return n_tokens * n_tokens * (in_features + out_features) < 2 * in_features * out_features

    # Hooks.

    def linear(self, w: int | None, b: int | None, x: torch.Tensor, dy: torch.Tensor, layout: str) -> None:
        batch = self.batch
        if w is not None and layout == TOKENS and batch.padding_ratio(TOKENS) > 1.5:
            # Uneven groups: one matmul per group rather than padding lm_head's large output gradient.
            for s, (t0, t1) in enumerate(batch.token_ranges):
                self._dense(s, w, dy[t0:t1].T @ x[t0:t1])
            w = None
        if w is not None:
            v = self.v[w]
            xs, ds = batch.padded(x, layout), batch.padded(dy, layout)  # [slots, tokens, features]
            if self._use_gram(w, xs.shape[1]):
                xs, ds = xs.to(self.acc), ds.to(self.acc)
                self._dot += (torch.matmul(xs, v.T) * ds).sum((1, 2))
                self._sq += (torch.bmm(xs, xs.transpose(1, 2)) * torch.bmm(ds, ds.transpose(1, 2))).sum((1, 2))
            else:
                step = max(1, self.chunk_bytes // max(1, v.numel() * x.element_size()))
                for lo in range(0, batch.n_slots, step):
                    self._dense_many(lo, w, torch.bmm(ds[lo : lo + step].transpose(1, 2), xs[lo : lo + step]))
        if b is not None:
            self._dense_many(0, b, batch.slot_sums(dy, layout, self.acc))

    def head(self, w: int | None, b: int | None, t0: int, t1: int, h: torch.Tensor, dz: torch.Tensor) -> None:
        """lm_head's input and output gradient at the batch's selected tokens t0 .. t1 - 1 (whole slots, or a
        piece of one: services.scoring.head_loss.head_chunks)."""
        batch = self.batch
        step = vocabulary_step(h.shape[1], torch.finfo(self.acc).bits // 8, self.chunk_bytes)
        for s in range(bisect.bisect_right(self._token_ends, t0), batch.n_slots):
            a0, a1 = batch.token_ranges[s]
            if a0 >= t1:
                break
            lo, hi = max(a0, t0), min(a1, t1)
            hs, ds = h[lo - t0 : hi - t0], dz[lo - t0 : hi - t0]
            chunk = batch.chunks[s]
            if not chunk.complete:  # the group spans batches: its dense gradient accumulates
                if w is not None:
                    accumulate_gradient(self._buffer(chunk.key, w), ds, hs, step)
                if b is not None:
                    self._buffer(chunk.key, b).add_(ds.sum(0).to(self.acc))
            elif (lo, hi) == (a0, a1):
                self._head_slot(s, w, b, hs, ds, step)
            else:  # the slot spans head chunks: its dense gradient accumulates until its last piece
                partial = self._head_partial.setdefault(s, {})
                if w is not None:
                    if "w" not in partial:
                        partial["w"] = (w, torch.zeros_like(self.v[w]))
                    accumulate_gradient(partial["w"][1], ds, hs, step)
                if b is not None:
                    if "b" not in partial:
                        partial["b"] = (b, torch.zeros_like(self.v[b]))
                    partial["b"][1].add_(ds.sum(0).to(self.acc))
                if hi == a1:
                    self._head_finish(s, self._head_partial.pop(s), step)

    def _head_slot(self, s: int, w: int | None, b: int | None, h: torch.Tensor, dz: torch.Tensor, step: int) -> None:
        if w is not None:
            v, c = self.v[w], None if self.c is None else self.c[w]
            if self._head_uses_gram(w, h.shape[0]):
                dot, sq = gram_signals(dz, h, v, self.acc, step)
            else:
                dot, sq = dense_signals(dz, h, v, c, self.acc, step)
            self._dot[s] += dot
            self._sq[s] += sq
            if w == self.tied:
                ids = self.batch.embedding_rows(s)[1]
                rows = rows_at(dz, h, ids, self.acc)
                self._tied_rows(s, rows if c is None else rows * c[ids])
        if b is not None:
            self._dense(s, b, dz.sum(0))

    def _head_finish(self, s: int, partial: dict[str, tuple[int, torch.Tensor]], step: int) -> None:
        """Slot s's lm_head statistics from its densely accumulated gradient."""
        if "w" in partial:
            w, g = partial["w"]
            c = None if self.c is None else self.c[w]
            dot, sq = tensor_signals(g, self.v[w], c, step)
            self._dot[s] += dot
            self._sq[s] += sq
            if w == self.tied:
                ids = self.batch.embedding_rows(s)[1]
                self._tied_rows(s, g[ids] if c is None else g[ids] * c[ids])
        if "b" in partial:
            self._dense(s, *partial["b"])

    def _head_uses_gram(self, w: int, n_tokens: int) -> bool:
        if self.c is not None:
            return False
        if self.strategy != "auto":
            return self.strategy == "gram"
        return gram_is_cheaper(n_tokens, *self.v[w].shape)

    def _tied_rows(self, s: int, rows: torch.Tensor) -> None:
        """lm_head's rows (preconditioned) at slot s's token ids, for the tied weight's cross term."""
        if self._all_complete:
            self._pending_all.append(rows)
        else:
            self._cross(s, rows)

    def norm(self, w: int, eps: float, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> None:
        xhat = normalized_input(self.layout, w, eps, x, y, self._divisible, self.acc)
        self._dense_many(0, w, self.batch.slot_sums(dy.to(self.acc) * xhat, ROWS, self.acc))

    def embedding(self, p: int, de: torch.Tensor) -> None:
        batch = self.batch
        flat = de.reshape(-1, de.shape[-1])
        ids = batch.embedding_ids
        rows = torch.zeros((ids.numel(), flat.shape[1]), dtype=flat.dtype, device=flat.device)
        rows.index_add_(0, batch.embedding_inverse, flat[batch.embedding_positions])  # every group's rows at once
        if not self._all_complete or (p == self.tied and not self._pending_all):
            for s in range(batch.n_slots):
                u0, u1 = batch.unique_range(s, s + 1)
                self._rows(s, p, ids[u0:u1], rows[u0:u1])
            return
        g = rows.to(self.acc)
        if self.c is not None:
            g = g * self.c[p][ids]
        onehot = batch.onehot("embedding", self.acc)
        self._dot += onehot @ (g * self.v[p][ids]).sum(1)
        self._sq += onehot @ (g * g).sum(1)
        if p == self.tied:  # lm_head's rows of every group, in the same order
            other = torch.cat(self._pending_all)
            self._pending_all = []
            self._sq += 2.0 * (onehot @ (other * g).sum(1))
