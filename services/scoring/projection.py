"""The `project` method's per-group statistics: LoGra-style random projections of per-layer gradients.

ProjectionPlan draws the seeded projections and lays out the projected gradient vector;
ProjectionCollector fills each group's projected (preconditioned) gradient from a batch's hooks
(services.scoring.passes.run_batch). An approximation of exact, used only when named.
"""

from __future__ import annotations

from typing import Sequence

import torch

from services.scoring.batching import ROWS, TOKENS, Batch
from services.scoring.layout import ModelLayout, normalized_input


class ProjectionPlan:
    """Seeded Gaussian projections (entries N(0, 1/k)) of every tracked linear layer's inputs and
    output gradients (LoGra-style), and the layout of the projected gradient vector.

    A linear weight's gradient dY^T X becomes (dY P_out)^T (X P_in), k x k; its bias's gradient is
    projected by P_out; RMSNorm weights are kept whole. The embedding shares lm_head's projections
    when tied (its gradient rows at token ids are projected by the rows of P_out at those ids).
    With a preconditioner c, a weight's c is approximated by a rank-one a b^T (row means times
    column means / overall mean), applied to dY and X before projecting.
    """

    def __init__(self, layout: ModelLayout, tracked: Sequence[int], k: int, seed: int, dtype: torch.dtype,
                 device: torch.device, c: dict[int, torch.Tensor] | None = None):
        self.k = k
        generator = torch.Generator().manual_seed(seed)
        shapes = {i: layout.params[i].shape for i in tracked}
        self.offsets: dict[int, tuple[int, int]] = {}
        self.p_in: dict[int, torch.Tensor] = {}  # weight index -> [in, k]
        self.p_out: dict[int, torch.Tensor] = {}  # weight index -> [out, k]
        self.scale_in: dict[int, torch.Tensor] = {}  # weight index -> [in] (rank-one preconditioner factor)
        self.scale_out: dict[int, torch.Tensor] = {}
        self.bias_of: dict[int, int] = {}  # bias index -> weight index
        weights = [(w, b) for _, w, b in layout.linears]
        weights.append((layout.lm_head_weight_index, layout.lm_head_bias_index))
        if layout.embedding_index is not None and not layout.tied:
            weights.append((layout.embedding_index, None))
        size = 0

        def take(index: int, n: int) -> None:
            nonlocal size
            self.offsets[index] = (size, size + n)
            size += n

        for w, b in weights:
            if w is None or w not in shapes:
                continue
            out_features, in_features = shapes[w]
            self.p_out[w] = (torch.randn(out_features, k, generator=generator, dtype=torch.float64) / k**0.5).to(device, dtype)
            self.p_in[w] = (torch.randn(in_features, k, generator=generator, dtype=torch.float64) / k**0.5).to(device, dtype)
            take(w, k * k)
            if c is not None:
                cw = c[w].to(torch.float64)
                mean = cw.mean().clamp_min(torch.finfo(torch.float64).tiny)
                self.scale_out[w] = cw.mean(1).to(dtype)
                self.scale_in[w] = (cw.mean(0) / mean).to(dtype)
            if b is not None and b in shapes:
                self.bias_of[b] = w
                take(b, k)
        for i in tracked:
            if i not in self.offsets:  # RMSNorm weights, kept whole
                take(i, shapes[i].numel())
        self.size = size


class ProjectionCollector:
    """Per group, the projected (preconditioned) gradient vector of the tracked parameters (see ProjectionPlan)."""

    def __init__(self, layout: ModelLayout, plan: ProjectionPlan, dtype: torch.dtype,
                 c: dict[int, torch.Tensor] | None = None):
        self.layout, self.plan, self.dtype, self.c = layout, plan, dtype, c
        self.tied = layout.tied
        self._partial: dict[int, torch.Tensor] = {}  # split groups: key -> features so far
        self._divisible: dict[int, bool] = {}

    def begin(self, batch: Batch) -> None:
        self.batch = batch
        self.features = torch.zeros((batch.n_slots, self.plan.size), dtype=self.dtype, device=batch.device)

    def empty_result(self) -> torch.Tensor:
        """The result of a group with no weighted response (nothing reaches the model)."""
        return torch.zeros(self.plan.size, dtype=torch.float64)

    def finish(self) -> dict[int, torch.Tensor]:
        """{group key: projected gradient} of the groups whose last chunk was in the batch."""
        out = {}
        for s, chunk in enumerate(self.batch.chunks):
            f = self.features[s]
            if not chunk.first or not chunk.last:
                f = self._partial.pop(chunk.key, 0) + f
                if not chunk.last:
                    self._partial[chunk.key] = f
                    continue
            out[chunk.key] = f
        return out

    def _project(self, w: int, t: torch.Tensor, side: str) -> torch.Tensor:
        p = self.plan.p_out[w] if side == "out" else self.plan.p_in[w]
        scale = (self.plan.scale_out if side == "out" else self.plan.scale_in).get(w)
        t = t.to(self.dtype)
        if scale is not None:
            t = t * scale
        return t @ p

    def linear(self, w: int | None, b: int | None, x: torch.Tensor, dy: torch.Tensor, layout: str) -> None:
        if w is not None:
            self._add_weight(w, self._project(w, x, "in"), self._project(w, dy, "out"), layout)
        if b is not None:
            self._add_bias(b, self.batch.slot_sums(dy, layout, self.dtype))

    def head(self, w: int | None, b: int | None, t0: int, t1: int, h: torch.Tensor, dz: torch.Tensor) -> None:
        """lm_head's input and output gradient at the batch's selected tokens t0 .. t1 - 1 (chunks in order):
        projected ([tokens, k]) and summed per slot, then added to the features after the last chunk."""
        batch = self.batch
        if t0 == 0:
            self._head_in, self._head_out, self._head_bias = [], [], None
        if w is not None:
            self._head_in.append(self._project(w, h, "in"))
            self._head_out.append(self._project(w, dz, "out"))
        if b is not None:
            sums = batch.onehot(TOKENS, self.dtype)[:, t0:t1] @ dz.to(self.dtype)
            self._head_bias = sums if self._head_bias is None else self._head_bias + sums
        if t1 == batch.n_tokens:
            if w is not None:
                self._add_weight(w, torch.cat(self._head_in), torch.cat(self._head_out), TOKENS)
            if b is not None:
                self._add_bias(b, self._head_bias)
            self._head_in, self._head_out, self._head_bias = [], [], None

    def _add_weight(self, w: int, x_projected: torch.Tensor, dy_projected: torch.Tensor, layout: str) -> None:
        xp = self.batch.padded(x_projected, layout)  # [slots, tokens, k]
        dp = self.batch.padded(dy_projected, layout)
        lo, hi = self.plan.offsets[w]
        self.features[:, lo:hi] += torch.bmm(dp.transpose(1, 2), xp).reshape(self.batch.n_slots, -1)

    def _add_bias(self, b: int, sums: torch.Tensor) -> None:
        if self.c is not None:
            sums = sums * self.c[b].to(self.dtype)
        lo, hi = self.plan.offsets[b]
        self.features[:, lo:hi] += sums @ self.plan.p_out[self.plan.bias_of[b]]

    def norm(self, w: int, eps: float, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> None:
        xhat = normalized_input(self.layout, w, eps, x, y, self._divisible, self.dtype)
        sums = self.batch.slot_sums(dy.to(self.dtype) * xhat, ROWS, self.dtype)
        if self.c is not None:
            sums = sums * self.c[w].to(self.dtype)
        lo, hi = self.plan.offsets[w]
        self.features[:, lo:hi] += sums

    def embedding(self, p: int, de: torch.Tensor) -> None:
        # The gradient's rows at token ids: row t of the group's gradient gets de_t at row id_t. Projected:
        # sum_t (P_out[id_t] * a[id_t]) outer ((de_t * b) P_in).
        flat = de.reshape(-1, de.shape[-1])
        ids = self.batch.input_ids.reshape(-1)
        lo, hi = self.plan.offsets[p]
        for s in range(self.batch.n_slots):
            positions = self.batch.embedding_rows(s)[0]
            token_ids = ids[positions]
            left = self.plan.p_out[p][token_ids]
            if p in self.plan.scale_out:
                left = left * self.plan.scale_out[p][token_ids, None]
            right = self._project(p, flat[positions], "in")
            self.features[s, lo:hi] += (left.T @ right).reshape(-1)
