"""One forward and backward pass over a batch: the plain gradient, or per-group statistics through hooks.

Several candidate groups share one right-padded forward and one backward. Rows of different
groups never interact (attention stays within a row, every other op is per token), so the
gradient that reaches group g's activations is exactly that of g's own loss L_g. `run_batch`
hands every tracked layer's (input, output gradient) to a collector (exact_collector,
projection), which separates each group's share; no parameter gradient of the whole batch is
formed. `plain_gradient` is the ordinary autograd gradient of the batches' summed loss (the
validation gradient, and the cost floor). lm_head's logits are formed in chunks of tokens
(services.scoring.head_loss) unless a pass is asked to materialise them all (the earlier path, kept
as a reference). Hooks never hold the tensor they are registered on (such a cycle runs through C++
and would never be freed).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Iterator, Sequence

import torch

from services.scoring.batching import ROWS, TOKENS, Batch
from services.scoring.head_loss import HeadConsumer, chunked_head_loss, head_chunks
from services.scoring.layout import ModelLayout, accumulation_dtype, requires_grad_only
from services.scoring.loss import policy_gradient_loss


def forward_loss(layout: ModelLayout, batch: Batch, inputs_embeds: torch.Tensor, head_chunk_tokens: int | None = None,
                 head_hook=None, head_consumer: HeadConsumer | None = None,
                 head_weight_grad_into: torch.Tensor | None = None) -> torch.Tensor:
    """-sum over selected tokens of weight * log p(target), from one forward of the base model and lm_head
    over the selected positions only. With `head_chunk_tokens`, lm_head's logits and their gradient are formed
    that many tokens at a time (services.scoring.head_loss; chunks of whole groups where they fit) and
    `head_consumer(t0, t1, h, dz)` sees each chunk (and lm_head's weight gradient is added into
    `head_weight_grad_into` when given); without, the logits of every selected token are materialised and
    `head_hook(h_sel, logits)` sees lm_head's input and output."""
    hidden = layout.base(
        inputs_embeds=inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    h_sel = hidden[:, :-1][batch.selected]
    if head_chunk_tokens is not None:
        chunks = head_chunks(batch.token_ranges, head_chunk_tokens)
        head = layout.lm_head
        return chunked_head_loss(h_sel, head.weight, head.bias, batch.targets, batch.token_weights, chunks, head_consumer,
                                 head_weight_grad_into)
    logits = layout.lm_head(h_sel)
    if head_hook is not None:
        head_hook(h_sel, logits)
    return policy_gradient_loss(logits, batch.targets, batch.token_weights)


@contextlib.contextmanager
def _cut_at(layout: ModelLayout, cut: int | None, holder: list) -> Iterator[None]:
    """With cut set, decoder layer `cut` gets its hidden-state input detached and requiring grad (kept in holder)."""
    if cut is None:
        yield
        return

    def pre_hook(module, args, kwargs):
        if args:
            h = args[0].detach().requires_grad_(True)
            holder.append(h)
            return (h, *args[1:]), kwargs
        h = kwargs["hidden_states"].detach().requires_grad_(True)
        holder.append(h)
        return args, {**kwargs, "hidden_states": h}

    handle = layout.layers[cut].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def plain_gradient(
    layout: ModelLayout, batches: Iterable[Batch], indices: Sequence[int], cut: int | None = None,
    head_chunk_tokens: int | None = None, total: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The summed gradient of the batches' losses with respect to params[indices], by ordinary autograd
    (the cost floor of any gradient: one forward and one backward). With `cut`, the backward stops at
    decoder layer `cut` (only parameters above it may be asked for). Gradients in the accumulation dtype,
    added into `total` when given (one tensor per index). `head_chunk_tokens`: lm_head's logits in chunks
    of that many tokens (None: materialised at once).

    When the model's dtype is the accumulation dtype, autograd adds each parameter's gradient into its
    running sum as it is formed (the sum stands in as .grad), and chunked lm_head adds its weight's
    gradient straight into its sum, so one batch's gradients never exist all at once beside the sum;
    otherwise they are formed in the model's dtype and added afterwards."""
    params = [layout.params[i] for i in indices]
    if total is None:
        total = [torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in params]
    in_place = all(t.dtype == p.dtype for t, p in zip(total, params))
    head_sum = None
    if in_place and head_chunk_tokens is not None and layout.lm_head_weight_index in indices:
        head_sum = total[list(indices).index(layout.lm_head_weight_index)]
    with requires_grad_only(layout.params, indices):
        for batch in batches:
            with _cut_at(layout, cut, []):
                loss = forward_loss(layout, batch, layout.embedding(batch.input_ids), head_chunk_tokens,
                                    head_weight_grad_into=head_sum)
            if in_place:
                _backward_into(loss, params, total)
                continue
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g)
    return total


def _backward_into(loss: torch.Tensor, params: Sequence[torch.Tensor], total: Sequence[torch.Tensor]) -> None:
    """loss's gradient with respect to params added into total (as .grad, restored afterwards)."""
    saved = [p.grad for p in params]
    try:
        for p, t in zip(params, total):
            p.grad = t
        loss.backward(inputs=list(params))
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def run_batch(layout: ModelLayout, batch: Batch, collector, tracked: Iterable[int], cut: int | None = None,
              head_chunk_tokens: int | None = None) -> None:
    """One forward and one backward of `batch`, the collector's hooks seeing every tracked parameter's
    (input, output gradient). No parameter gradient is computed. With `cut`, the graph starts at decoder
    layer `cut` (tracked parameters must lie above it). With `head_chunk_tokens`, lm_head's part comes to
    collector.head in chunks of tokens (during the forward); without, to collector.linear at once."""
    tracked = set(tracked)
    handles = []

    def hook_linear(w: int | None, b: int | None):
        def forward_hook(module, args, output):
            if output.requires_grad:
                x = args[0]
                output.register_hook(lambda dy: collector.linear(w, b, x, dy, ROWS))

        return forward_hook

    def hook_norm(w: int, eps: float):
        def forward_hook(module, args, output):
            if output.requires_grad:
                x = args[0]
                # A weak reference: the output's own hook must not keep the output (and its graph) alive.
                y = weakref.ref(output)
                output.register_hook(lambda dy: collector.norm(w, eps, x, y(), dy))

        return forward_hook

    for module, w, b in layout.linears:
        w, b = (w if w in tracked else None), (b if b in tracked else None)
        if w is not None or b is not None:
            handles.append(module.register_forward_hook(hook_linear(w, b)))
    for module, w, eps in layout.norms:
        if w in tracked:
            handles.append(module.register_forward_hook(hook_norm(w, eps)))
    head_w = layout.lm_head_weight_index if layout.lm_head_weight_index in tracked else None
    head_b = layout.lm_head_bias_index if layout.lm_head_bias_index in tracked else None

    def head_hook(h_sel, logits):
        if (head_w is not None or head_b is not None) and logits.requires_grad:
            logits.register_hook(lambda dz: collector.linear(head_w, head_b, h_sel, dz, TOKENS))

    def head_consumer(t0: int, t1: int, h: torch.Tensor, dz: torch.Tensor) -> None:
        collector.head(head_w, head_b, t0, t1, h, dz)

    tracks_head = head_w is not None or head_b is not None

    holder: list[torch.Tensor] = []
    try:
        collector.begin(batch)
        with requires_grad_only(layout.params), _cut_at(layout, cut, holder):
            embeds = layout.embedding(batch.input_ids)
            if cut is None:
                embeds = embeds.detach().requires_grad_(True)
                holder.append(embeds)
                if layout.embedding_index in tracked:
                    embeds.register_hook(lambda de: collector.embedding(layout.embedding_index, de))
            loss = forward_loss(layout, batch, embeds, head_chunk_tokens, head_hook,
                                head_consumer if tracks_head else None)
            torch.autograd.grad(loss, holder[:1])
    finally:
        for handle in handles:
            handle.remove()
