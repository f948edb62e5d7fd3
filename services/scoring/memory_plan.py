"""Batch planning under a memory budget: a cost model of one batched scoring pass of the actual model.

A CostModel says what one pass costs, in bytes, per token and per group:
- row_token: what autograd keeps for the backward per token of a batch (rows x width), every decoder
  layer, counted by `probe_cost_model` on a small forward of the model itself under saved-tensor hooks
  (at three widths), so the model's own layers, attention implementation and dtype are what is counted;
  plus the backward's transients (the output gradients of a few layers at a time);
- row_quadratic: per row and squared width (attention masks and the like), from the same probe;
- head_token: per token of an lm_head chunk: its logits and their gradient, in float32 or wider and in the
  model's dtype (services.scoring.head_loss);
- head_dense: one group's dense lm_head gradient (vocabulary x hidden, accumulation dtype): held while a
  group with more tokens than one head chunk is accumulated, and on the plain path (lm_head's gradient);
- gradient: a full gradient of the trainable parameters in the accumulation dtype: held for a group split
  over batches (the exact collector's buffer), and on the plain path (the running sum);
- batch_gradient: what the plain path holds of one batch's gradients beside the sum: all of them, in the
  model's dtype, when that is not the accumulation dtype; else none (services.scoring.passes.plain_gradient).

`plan_pass` turns a working budget in bytes (gradalign_common.memory_budget) into a BatchPlan: lm_head's
chunk (at most a quarter of the budget), the size of the per-group gradient slices the collectors form
(services.scoring.exact_collector, head_signals), and `fits(rows, width, split)`, which
services.scoring.batching asks of every batch it forms. Per-group workspaces are slices of bounded size,
so a batch's cost is fixed + per-token terms whatever the number of groups in it; what grows per group
(a split group's gradient, a group's dense lm_head gradient) is counted where it is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from gradalign_common.errors import InvalidInputError
from gradalign_common.records import RolloutRecord
from services.scoring.batching import Batch, Chunk, plan_batches
from services.scoring.layout import ModelLayout, accumulation_dtype, requires_grad_only
from services.scoring.passes import forward_loss

COLLECT = "collect"  # per-group statistics from hooks (exact, project, ...): no parameter gradient
PLAIN = "plain"  # ordinary autograd gradient of summed losses (g_V, the cost floor)

PROBE_WIDTHS = (16, 32, 64)
TRANSIENT_LAYERS = 3  # output gradients alive at once during the backward, in layers' worth of activations
HEAD_SHARE = 0.25  # lm_head's chunk takes at most this share of the budget
MIN_HEAD_CHUNK_TOKENS = 16
MAX_SLICE_BYTES = 64 << 20
# What one CPU batch's activations (CostModel.row_token x rows x width) are packed to at most: on CPU a pass gets
# no faster per token once a batch is a few hundred tokens wide, and slower beyond (measured for 0.5B: 1.1-1.4x the
# time per token at 3-8x the tokens; a model of 0.15 MB per token is flat from 384 to 1,536 tokens: README,
# "Scoring at real-model scale"), so packing more only raises the peak. On CUDA no target: batches fill the budget
# (a GPU needs large batches to be busy).
DEFAULT_CPU_BATCH_ACTIVATION_BYTES = 768 << 20


def resolve_batch_target(device: torch.device, requested: int | None, cost: "CostModel") -> int | None:
    """The target rows x width of a batch on `device`: `requested` when given (0: none, batches fill the
    budget), else on CPU the tokens whose activations are DEFAULT_CPU_BATCH_ACTIVATION_BYTES by the cost
    model, none elsewhere."""
    if requested is not None:
        return check_batch_target(requested) or None
    if device.type != "cpu":
        return None
    return max(1, int(DEFAULT_CPU_BATCH_ACTIVATION_BYTES // max(1.0, cost.row_token)))


def check_batch_target(requested: int | None) -> int | None:
    """`requested` when it is None, 0 (no target) or positive; InvalidInputError naming it otherwise."""
    if requested is not None and requested < 0:
        raise InvalidInputError(f"target_batch_tokens must be 0 (fill the budget) or positive, got {requested}")
    return requested


@dataclass(frozen=True)
class CostModel:
    """Bytes of one batched pass of one model (see the module docstring for each field)."""

    row_token: float
    row_quadratic: float
    head_token: float
    head_dense: int
    gradient: int
    batch_gradient: int


@dataclass(frozen=True)
class BatchPlan:
    """How one pass is cut so that its working memory stays within `budget` bytes.

    `fixed` is what the pass holds whatever its batches; `split_extra` what a batch holding part of a group
    too large for one batch adds (that group's gradient buffer). `token_limit`, when set, replaces the
    budget's test by rows x width <= token_limit (the old --max-batch-tokens). `target_tokens`, when set,
    is the rows x width beyond which a batch is no faster on the device (resolve_batch_target):
    groups are packed together up to it and no further, within the budget; a group larger than it is a
    batch of its own, never split for it. It does not apply under a token limit.
    """

    budget: int
    cost: CostModel
    head_chunk_tokens: int
    slice_bytes: int
    fixed: int
    split_extra: int
    token_limit: int | None = None
    target_tokens: int | None = None

    def peak(self, rows: int, width: int, split: bool = False) -> float:
        """The modelled working memory of a batch of `rows` rows `width` tokens wide."""
        tokens = rows * width
        c = self.cost
        return (self.fixed + (self.split_extra if split else 0) + tokens * c.row_token
                + tokens * width * c.row_quadratic + min(tokens, self.head_chunk_tokens) * c.head_token)

    def fits(self, rows: int, width: int, split: bool = False) -> bool:
        """Whether a batch of `rows` rows `width` tokens wide stays within the budget (or the token limit)."""
        if self.token_limit is not None:
            return rows * width <= self.token_limit
        return self.peak(rows, width, split) <= self.budget

    def pack(self, groups: Iterable[tuple[int, Sequence[RolloutRecord], Sequence[float]]]) -> Iterator[list[Chunk]]:
        """The weighted groups (services.scoring.groups.weighted_responses) in this plan's batches."""
        return plan_batches(groups, self.fits, self.target_tokens if self.token_limit is None else None)


def plan_pass(cost: CostModel, budget: int, path: str, largest_group_tokens: int,
              target_tokens: int | None = None) -> BatchPlan:
    """The plan of a pass (COLLECT or PLAIN) within `budget` bytes, whose largest group has
    `largest_group_tokens` response tokens, packing batches up to `target_tokens` rows x width when given."""
    slice_bytes = int(min(MAX_SLICE_BYTES, max(1 << 20, budget // 32)))
    head_chunk_tokens = max(MIN_HEAD_CHUNK_TOKENS, int(budget * HEAD_SHARE // max(1.0, cost.head_token)))
    fixed = 3 * slice_bytes  # a layer's per-group gradient slice, in the model's dtype, accumulated, preconditioned
    split_extra = 0
    if path == PLAIN:  # the running sum, a batch's gradients beside it (or the embedding's, and lm_head's dW
        # and their sum where they are not added straight into the sum: services.scoring.passes.plain_gradient)
        fixed += cost.gradient + (cost.batch_gradient + 3 * cost.head_dense if cost.batch_gradient else cost.head_dense)
    else:
        split_extra = cost.gradient
        if largest_group_tokens > head_chunk_tokens:
            fixed += cost.head_dense
    return BatchPlan(budget, cost, head_chunk_tokens, slice_bytes, fixed, split_extra, target_tokens=target_tokens)


def probe_cost_model(layout: ModelLayout) -> CostModel:
    """The CostModel of the model in `layout` (on its device, in its dtype): activations counted on three
    small forwards (module docstring), the rest from the shapes of lm_head and the trainable parameters."""
    weight = layout.lm_head.weight
    dtype = weight.dtype
    work = torch.promote_types(dtype, torch.float32)
    acc_bytes = torch.finfo(accumulation_dtype(dtype)).bits // 8
    model_bytes, work_bytes = weight.element_size(), torch.finfo(work).bits // 8
    vocab, hidden = weight.shape
    numel = sum(p.numel() for p in layout.params)
    linear, quadratic = _activation_bytes(layout)
    n_layers = max(1, len(layout.layers) if layout.layers is not None else 1)
    return CostModel(
        row_token=linear * (1.0 + TRANSIENT_LAYERS / n_layers),
        row_quadratic=quadratic,
        head_token=vocab * (work_bytes + (model_bytes if dtype != work else 0)),
        head_dense=vocab * hidden * acc_bytes,
        gradient=numel * acc_bytes,
        batch_gradient=0 if model_bytes == acc_bytes else numel * model_bytes,
    )


def _activation_bytes(layout: ModelLayout) -> tuple[float, float]:
    """(bytes per token, bytes per row and squared width) that autograd keeps over a forward of the model,
    fitted to three probes of two rows (one padded) at PROBE_WIDTHS; parameters are not counted."""
    device = layout.embedding.weight.device
    resident = {t.untyped_storage().data_ptr() for t in (*layout.model.parameters(), *layout.model.buffers())}
    enabled = [i for i in range(len(layout.params))
               if i not in (layout.lm_head_weight_index, layout.lm_head_bias_index)]
    token = 1 % layout.embedding.num_embeddings
    totals = []
    for width in PROBE_WIDTHS:
        records = (RolloutRecord("probe", (token,), (token,) * (width - 1), 1.0),
                   RolloutRecord("probe", (token,), (token,) * (width - 2), 0.5))
        batch = Batch([Chunk(0, records, (1.0, -1.0))], device, layout.embedding.padding_idx,
                      layout.embedding.num_embeddings)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in resident:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.enable_grad(), requires_grad_only(layout.params, enabled), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward_loss(layout, batch, layout.embedding(batch.input_ids), head_chunk_tokens=width)
        del loss
        totals.append(sum(saved.values()) / 2.0)  # per row
    w = torch.tensor(PROBE_WIDTHS, dtype=torch.float64)
    design = torch.stack([torch.ones_like(w), w, w * w], dim=1)
    _, per_token, per_width_squared = torch.linalg.solve(design, torch.tensor(totals, dtype=torch.float64)).tolist()
    if per_token <= 0.0:  # a degenerate fit: take the largest probe's bytes per token, no quadratic term
        return totals[-1] / PROBE_WIDTHS[-1], 0.0
    return per_token, max(0.0, per_width_squared)
