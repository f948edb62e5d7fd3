"""Per-group gradient statistics from batched forward and backward passes, without per-group gradients.

Several candidate groups share one right-padded forward and one backward. Rows of
different groups never interact (attention stays within a row, every other op is per
token), so the gradient that reaches group g's activations is exactly that of g's own
loss L_g. Every parameter's gradient is a sum over tokens of a per-token term built from
the layer's input and its output gradient, so each group's share is separated on the fly
in hooks, and no parameter gradient of the whole batch is ever formed:

- nn.Linear weight W [out, in]: G_g = dY_g^T X_g, formed for every group of the batch by one
  batched matmul (the groups' tokens zero-padded to the longest group's), the same work as
  the weight gradient the backward would otherwise compute; its dot product with g_V and
  its squared norm follow. When groups have very few tokens (n^2 (in + out) < 2 in out),
  token Gram matrices are cheaper: ||G_g||^2 = sum((X_g X_g^T) * (dY_g dY_g^T)) and
  <G_g, V> = sum_t <dY_t, V X_t>.
- nn.Linear bias: the per-group sum of dY.
- RMSNorm weight (y = w * x_hat): the per-group sum of dY * x_hat, x_hat = y / w.
- nn.Embedding weight: the group's output gradients scattered onto its token ids (rows).
- A weight tied between the embedding and lm_head counts once: its per-group gradient is
  A_g + S_g (lm_head's dense part, the embedding's rows), and ||A_g + S_g||^2 =
  ||A_g||^2 + 2 <A_g[rows], S_g> + ||S_g||^2 needs only A_g's rows at the group's tokens.

Per-module dot products and squared norms are reduced in float32 (float64 for a float64
model) from per-group gradients formed in the model's dtype, and summed over modules in
float64. Memory per batch is that of one training step on the batch (plus one layer's
per-group gradients, in slices of bounded size), whatever the number of groups; a group
too large for one batch is split over several, and only then is its gradient accumulated
densely (one gradient's memory) until its last chunk. Hooks never hold the tensor they
are registered on (such a cycle runs through C++ and would never be freed).

The collectors (ExactCollector, ProjectionCollector) turn (input, output gradient) into
per-group results; `run_batch` runs one batch through the model with their hooks.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from gradalign_common.records import RolloutRecord

ROWS = "rows"  # a tensor laid out [rows, width, ...] like the batch's input ids
TOKENS = "tokens"  # a tensor laid out [selected tokens, ...] (lm_head's input and output)

DEFAULT_MAX_BATCH_TOKENS = 2048  # rows x width per forward: small batches stay in cache on CPU; raise on GPU


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- the model


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps), computed in float32 (or float64) and cast back, as HF's RMSNorm does."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    return (work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@dataclass
class ModelLayout:
    """Where a causal LM's trainable parameters live, for the batched per-group path.

    `supported` is False (with `reason`) when some trainable parameter sits in a module this
    path does not know, or the model's logits are not lm_head(base model(...)); the engine
    then computes exact scores the straightforward way.
    """

    model: nn.Module
    params: list[nn.Parameter]
    names: list[list[str]]
    base: nn.Module | None = None
    embedding: nn.Embedding | None = None
    lm_head: nn.Linear | None = None
    layers: Sequence[nn.Module] | None = None
    linears: list[tuple[nn.Linear, int | None, int | None]] = field(default_factory=list)
    norms: list[tuple[nn.Module, int, float]] = field(default_factory=list)
    embedding_index: int | None = None
    lm_head_weight_index: int | None = None
    lm_head_bias_index: int | None = None
    supported: bool = False
    reason: str = ""

    @property
    def tied(self) -> bool:
        return self.embedding_index is not None and self.embedding_index == self.lm_head_weight_index

    def top_layer_indices(self, n_layers: int) -> tuple[int, list[int]]:
        """(index of the first of the last n decoder layers, the trainable parameters above it).

        Above it: those layers, whatever else the base model holds outside its layers and its
        embedding (the final norm), and lm_head unless it is tied to the embedding.
        """
        if self.layers is None or len(self.layers) == 0:
            raise ValueError("the model has no list of decoder layers")
        cut = max(0, len(self.layers) - n_layers)
        index = {id(p): i for i, p in enumerate(self.params)}
        below = {id(p) for layer in self.layers[:cut] for p in layer.parameters()}
        below.add(id(self.embedding.weight))
        chosen = [index[id(p)] for p in self.base.parameters() if id(p) in index and id(p) not in below]
        for p in self.lm_head.parameters():
            if id(p) in index and id(p) not in below:
                chosen.append(index[id(p)])
        return cut, sorted(set(chosen))


def inspect_model(model: nn.Module, params: list[nn.Parameter]) -> ModelLayout:
    """The layout of `model` (its trainable parameters `params`), with whether the batched path supports it."""
    index = {id(p): i for i, p in enumerate(params)}
    names: list[list[str]] = [[] for _ in params]
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in index:
            names[index[id(p)]].append(name)
    layout = ModelLayout(model=model, params=params, names=names)

    def unsupported(reason: str) -> ModelLayout:
        layout.supported, layout.reason = False, reason
        return layout

    base = getattr(model, "base_model", None)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or not isinstance(embedding, nn.Embedding) or not isinstance(lm_head, nn.Linear):
        return unsupported("not a causal LM with an nn.Embedding input and an nn.Linear lm_head")
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return unsupported("embedding with max_norm, scale_grad_by_freq or sparse gradients")
    layout.base, layout.embedding, layout.lm_head = base, embedding, lm_head
    layout.layers = getattr(base, "layers", None)

    covered: dict[int, int] = {}

    def cover(p: nn.Parameter | None) -> int | None:
        if p is None or id(p) not in index:
            return None
        covered[id(p)] = covered.get(id(p), 0) + 1
        return index[id(p)]

    layout.embedding_index = cover(embedding.weight)
    layout.lm_head_weight_index = cover(lm_head.weight)
    layout.lm_head_bias_index = cover(lm_head.bias)
    for module in base.modules():
        if module is embedding:
            continue
        own = dict(module.named_parameters(recurse=False))
        if not any(id(p) in index for p in own.values()):
            continue
        if isinstance(module, nn.Linear):
            layout.linears.append((module, cover(module.weight), cover(module.bias)))
        elif set(own) == {"weight"} and module.weight.dim() == 1 and _rms_epsilon(module) is not None:
            if not _behaves_like_rms_norm(module):
                return unsupported(f"{type(module).__name__} is not weight * rms_normalize(x)")
            layout.norms.append((module, cover(module.weight), _rms_epsilon(module)))
        else:
            return unsupported(f"trainable parameters in a {type(module).__name__}, which the batched path does not know")
    for p, n in zip(params, names):
        uses = covered.get(id(p), 0)
        if uses == 0:
            return unsupported(f"parameter {n[0]} is outside the known modules")
        if uses > 1 and not (p is embedding.weight and p is lm_head.weight):
            return unsupported(f"parameter {n[0]} is shared by several modules")
    if not _logits_are_lm_head_of_base(model, base, embedding, lm_head):
        return unsupported("the model's logits are not lm_head(base model(inputs_embeds))")
    layout.supported = True
    return layout


def _rms_epsilon(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


@torch.no_grad()
def _behaves_like_rms_norm(module: nn.Module) -> bool:
    w = module.weight
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(device=w.device, dtype=w.dtype) * 3
    expected = w * rms_normalize(x, _rms_epsilon(module))
    return torch.allclose(module(x), expected, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def _logits_are_lm_head_of_base(model, base, embedding, lm_head) -> bool:
    device = embedding.weight.device
    ids = torch.arange(6, device=device).reshape(2, 3) % embedding.num_embeddings
    mask = torch.ones_like(ids)
    positions = torch.arange(3, device=device).expand(2, 3)
    full = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    hidden = base(inputs_embeds=embedding(ids), attention_mask=mask, position_ids=positions, use_cache=False)
    ours = lm_head(hidden.last_hidden_state)
    tol = 1e-2 if embedding.weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return full.shape == ours.shape and torch.allclose(full.float(), ours.float(), rtol=tol, atol=tol)


@contextlib.contextmanager
def requires_grad_only(params: Sequence[nn.Parameter], enabled: Iterable[int] = ()) -> Iterator[None]:
    """Within the block, params[i].requires_grad is True exactly for i in `enabled`; restored afterwards."""
    saved = [p.requires_grad for p in params]
    enabled = set(enabled)
    try:
        for i, p in enumerate(params):
            p.requires_grad_(i in enabled)
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Chunk:
    """Some or all responses of one group: the part of the group that goes into one batch.

    `key` identifies the group for the caller; `weights` are the per-response loss weights
    A_j / denominator; `first`/`last` say whether this is the group's first/last chunk.
    """

    key: int
    records: tuple[RolloutRecord, ...]
    weights: tuple[float, ...]
    first: bool = True
    last: bool = True

    @property
    def complete(self) -> bool:
        return self.first and self.last


def plan_batches(
    groups: Iterable[tuple[int, Sequence[RolloutRecord], Sequence[float]]], max_batch_tokens: int
) -> Iterator[list[Chunk]]:
    """Consecutive groups (key, records, per-response weights) packed into batches.

    A batch's size is rows x width (the longest prompt + response in it) <= max_batch_tokens,
    unless one group alone is larger: such a group is split by responses into chunks,
    each its own batch.
    """
    batch: list[Chunk] = []
    rows = width = 0
    for key, records, weights in groups:
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in records]
        if len(records) * max(lengths) > max_batch_tokens:
            if batch:
                yield batch
                batch, rows, width = [], 0, 0
            yield from ([c] for c in _split(key, records, weights, lengths, max_batch_tokens))
            continue
        new_rows, new_width = rows + len(records), max(width, max(lengths))
        if batch and new_rows * new_width > max_batch_tokens:
            yield batch
            batch, new_rows, new_width = [], len(records), max(lengths)
        batch.append(Chunk(key, tuple(records), tuple(weights)))
        rows, width = new_rows, new_width
    if batch:
        yield batch


def _split(key, records, weights, lengths, max_batch_tokens) -> list[Chunk]:
    order = sorted(range(len(records)), key=lambda j: lengths[j])  # similar lengths together: less padding
    parts: list[list[int]] = [[]]
    for j in order:
        part = parts[-1]
        if part and (len(part) + 1) * max(lengths[k] for k in part + [j]) > max_batch_tokens:
            parts.append([j])
        else:
            part.append(j)
    return [
        Chunk(key, tuple(records[j] for j in part), tuple(weights[j] for j in part), i == 0, i == len(parts) - 1)
        for i, part in enumerate(parts)
    ]


class Batch:
    """The model inputs of some chunks, right-padded, and where each chunk's rows and tokens are.

    The loss is -sum over selected tokens of weight * log p(target); a token is selected when
    it is a response token of a response with a non-zero weight. Slot s (chunk s) owns rows
    row_ranges[s] of every [rows, width, ...] tensor and tokens token_ranges[s] of every
    [selected tokens, ...] tensor; `padded` lays either out as [slots, tokens, features].
    `padding_idx` and `vocab_size` are the input embedding's.
    """

    def __init__(self, chunks: Sequence[Chunk], device: torch.device, padding_idx: int | None = None,
                 vocab_size: int | None = None):
        self.chunks = list(chunks)
        rows = [(r, w) for c in self.chunks for r, w in zip(c.records, c.weights)]
        width = max(len(r.prompt_ids) + len(r.response_ids) for r, _ in rows)
        n_rows = len(rows)
        input_ids = torch.zeros((n_rows, width), dtype=torch.long)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
        weights = torch.zeros((n_rows, width - 1), dtype=torch.float64)
        for b, (record, weight) in enumerate(rows):
            ids = list(record.prompt_ids) + list(record.response_ids)
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            # Row b's logits at column c predict input_ids[b, c + 1].
            weights[b, len(record.prompt_ids) - 1 : len(ids) - 1] = weight
        selected = weights != 0.0
        self.n_rows, self.width = n_rows, width
        self.row_ranges, self.token_ranges = [], []
        row = token = 0
        tokens_per_row = selected.sum(1).tolist()
        for c in self.chunks:
            n = len(c.records)
            n_tokens = int(sum(tokens_per_row[row : row + n]))
            self.row_ranges.append((row, row + n))
            self.token_ranges.append((token, token + n_tokens))
            row, token = row + n, token + n_tokens
        self.n_tokens = token
        n_slots = len(self.chunks)
        rows_per_slot = [len(c.records) for c in self.chunks]
        tokens_per_slot = [t1 - t0 for t0, t1 in self.token_ranges]
        self.uniform_rows = len(set(rows_per_slot)) == 1
        self.uniform_tokens = len(set(tokens_per_slot)) == 1
        self.max_rows, self.max_tokens = max(rows_per_slot), max(tokens_per_slot)
        row_slot = torch.repeat_interleave(torch.arange(n_slots), torch.tensor(rows_per_slot))
        token_slot = torch.repeat_interleave(torch.arange(n_slots), torch.tensor(tokens_per_slot))
        row_position = torch.cat([torch.arange(n) for n in rows_per_slot])
        token_position = torch.cat([torch.arange(n) for n in tokens_per_slot])
        # The embedding's rows for each group: its real tokens' flat positions (into rows * width), in
        # slot order; the unique (slot, token id) pairs, sorted, so that each slot's are contiguous;
        # and each position's index into those.
        flat_ids = input_ids.reshape(-1)
        real = attention_mask.reshape(-1).bool()
        if padding_idx is not None:
            real &= flat_ids != padding_idx  # nn.Embedding gives its padding row no gradient
        positions = torch.nonzero(real).squeeze(1)  # row-major: slot order
        radix = vocab_size or int(flat_ids.max()) + 1
        self.radix = radix
        keys = row_slot[positions // width] * radix + flat_ids[positions]
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        unique_slot = unique_keys // radix
        token_counts = torch.bincount(row_slot[positions // width], minlength=n_slots).tolist()
        unique_counts = torch.bincount(unique_slot, minlength=n_slots).tolist()
        self._token_bounds = _bounds(token_counts)
        self._unique_bounds = _bounds(unique_counts)
        to = dict(device=device)
        self.input_ids = input_ids.to(**to)
        self.attention_mask = attention_mask.to(**to)
        self.position_ids = torch.arange(width).expand(n_rows, width).to(**to)
        self.selected = selected.to(**to)
        self.targets = self.input_ids[:, 1:][self.selected]
        self.token_weights = weights[selected].to(**to)
        self.embedding_positions = positions.to(**to)
        self.embedding_inverse = inverse.to(**to)
        self.embedding_ids = (unique_keys % radix).to(**to)
        self.embedding_slot = unique_slot.to(**to)
        self.embedding_keys = unique_keys.to(**to)  # slot * radix + token id, sorted
        self._row_slot, self._token_slot = row_slot, token_slot
        self._row_index = (row_slot.to(**to), row_position.to(**to))
        self._token_index = (token_slot.to(**to), token_position.to(**to))
        self._onehots: dict[tuple, torch.Tensor] = {}
        self.device = device

    @property
    def n_slots(self) -> int:
        return len(self.chunks)

    def embedding_rows(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slot s's (flat positions of its real tokens, their unique token ids, each position's index into those)."""
        t0, t1 = self._token_bounds[s]
        u0, u1 = self._unique_bounds[s]
        return self.embedding_positions[t0:t1], self.embedding_ids[u0:u1], self.embedding_inverse[t0:t1] - u0

    def padded(self, t: torch.Tensor, layout: str) -> torch.Tensor:
        """t as [slots, tokens, features]: slot s's rows (or selected tokens), zero-padded to the longest
        slot's (a view when every slot has as many)."""
        d = t.shape[-1]
        if layout == ROWS:
            rows = t.reshape(self.n_rows, -1, d)
            if self.uniform_rows:
                return rows.reshape(self.n_slots, -1, d)
            out = rows.new_zeros((self.n_slots, self.max_rows, rows.shape[1], d))
            out[self._row_index] = rows
            return out.reshape(self.n_slots, -1, d)
        if self.uniform_tokens:
            return t.reshape(self.n_slots, -1, d)
        out = t.new_zeros((self.n_slots, self.max_tokens, d))
        out[self._token_index] = t
        return out

    def padding_ratio(self, layout: str) -> float:
        """Size of `padded`'s result over the size of its input."""
        if layout == ROWS:
            return self.n_slots * self.max_rows / self.n_rows
        return self.n_slots * self.max_tokens / max(1, self.n_tokens)

    def unique_range(self, first: int, stop: int) -> tuple[int, int]:
        """The unique embedding rows of slots first .. stop - 1 (contiguous)."""
        return self._unique_bounds[first][0], self._unique_bounds[stop - 1][1]

    def onehot(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """[slots, n] indicator of which slot each row (kind rows), selected token (tokens) or unique
        embedding row (embedding) belongs to; sums per slot are one matmul with it."""
        key = (kind, dtype)
        if key not in self._onehots:
            index = {ROWS: self._row_slot, TOKENS: self._token_slot, "embedding": self.embedding_slot.cpu()}[kind]
            onehot = torch.zeros((self.n_slots, index.numel()), dtype=dtype)
            onehot[index, torch.arange(index.numel())] = 1.0
            self._onehots[key] = onehot.to(self.device)
        return self._onehots[key]

    def slot_sums(self, t: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
        """[slots, features]: the sum of t over each slot's tokens, in dtype."""
        d = t.shape[-1]
        if layout == ROWS:
            t = t.to(dtype).reshape(self.n_rows, -1, d).sum(1)
        return self.onehot(layout, dtype) @ t.to(dtype)


def _bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in counts:
        out.append((start, start + n))
        start += n
    return out


def forward_loss(layout: ModelLayout, batch: Batch, inputs_embeds: torch.Tensor, head_hook=None) -> torch.Tensor:
    """-sum over selected tokens of weight * log p(target), from one forward of the base model and lm_head
    over the selected positions only. `head_hook(h_sel, logits)` sees lm_head's input and output."""
    hidden = layout.base(
        inputs_embeds=inputs_embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    h_sel = hidden[:, :-1][batch.selected]
    logits = layout.lm_head(h_sel)
    if head_hook is not None:
        head_hook(h_sel, logits)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_p = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets[:, None]).squeeze(-1)
    return -(batch.token_weights.to(log_p.dtype) * log_p).sum()


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
    layout: ModelLayout, batches: Iterable[Batch], indices: Sequence[int], cut: int | None = None
) -> list[torch.Tensor]:
    """The summed gradient of the batches' losses with respect to params[indices], by ordinary autograd
    (the cost floor of any gradient: one forward and one backward). With `cut`, the backward stops at
    decoder layer `cut` (only parameters above it may be asked for). Gradients in the accumulation dtype."""
    params = [layout.params[i] for i in indices]
    total = [torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in params]
    with requires_grad_only(layout.params, indices):
        for batch in batches:
            with _cut_at(layout, cut, []):
                loss = forward_loss(layout, batch, layout.embedding(batch.input_ids))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc.add_(g)
    return total


def run_batch(layout: ModelLayout, batch: Batch, collector, tracked: Iterable[int], cut: int | None = None) -> None:
    """One forward and one backward of `batch`, the collector's hooks seeing every tracked parameter's
    (input, output gradient). No parameter gradient is computed. With `cut`, the graph starts at decoder
    layer `cut` (tracked parameters must lie above it)."""
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
            loss = forward_loss(layout, batch, embeds, head_hook)
            torch.autograd.grad(loss, holder[:1])
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- collectors


def _normalized_input(layout: ModelLayout, w: int, eps: float, x: torch.Tensor, y: torch.Tensor | None,
                      cache: dict[int, bool], dtype: torch.dtype) -> torch.Tensor:
    """An RMSNorm's x_hat (its output y = w * x_hat), in dtype: y / w when y is still alive and no entry
    of w is zero (one op), else recomputed from its input x."""
    if w not in cache:
        cache[w] = bool((layout.params[w] != 0).all())
    if cache[w] and y is not None:
        return y.to(dtype) / layout.params[w].detach().to(dtype)
    return rms_normalize(x, eps).to(dtype)


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

    def norm(self, w: int, eps: float, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> None:
        xhat = _normalized_input(self.layout, w, eps, x, y, self._divisible, self.acc)
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
        batch = self.batch
        if w is not None:
            xp = batch.padded(self._project(w, x, "in"), layout)  # [slots, tokens, k]
            dp = batch.padded(self._project(w, dy, "out"), layout)
            lo, hi = self.plan.offsets[w]
            self.features[:, lo:hi] += torch.bmm(dp.transpose(1, 2), xp).reshape(batch.n_slots, -1)
        if b is not None:
            sums = batch.slot_sums(dy, layout, self.dtype)
            if self.c is not None:
                sums = sums * self.c[b].to(self.dtype)
            lo, hi = self.plan.offsets[b]
            self.features[:, lo:hi] += sums @ self.plan.p_out[self.plan.bias_of[b]]

    def norm(self, w: int, eps: float, x: torch.Tensor, y: torch.Tensor, dy: torch.Tensor) -> None:
        xhat = _normalized_input(self.layout, w, eps, x, y, self._divisible, self.dtype)
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
