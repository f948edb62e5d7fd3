"""Where a causal LM's trainable parameters live, for the batched exact-scoring path.

`inspect_model` finds the input embedding, lm_head, the decoder layers, every nn.Linear and
RMSNorm holding trainable parameters, and decides whether the batched path supports the model
(every trainable parameter in a module it knows, logits = lm_head(base model(...))); when it
does not, exact scoring falls back to exact-loop. Also here: the RMSNorm arithmetic the hooks
need (rms_normalize, normalized_input) and `requires_grad_only`, which scopes which parameters
autograd tracks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32



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



def normalized_input(layout: ModelLayout, w: int, eps: float, x: torch.Tensor, y: torch.Tensor | None,
                     cache: dict[int, bool], dtype: torch.dtype) -> torch.Tensor:
    """An RMSNorm's x_hat (its output y = w * x_hat), in dtype: y / w when y is still alive and no entry
    of w is zero (one op), else recomputed from its input x."""
    if w not in cache:
        cache[w] = bool((layout.params[w] != 0).all())
    if cache[w] and y is not None:
        return y.to(dtype) / layout.params[w].detach().to(dtype)
    return rms_normalize(x, eps).to(dtype)
