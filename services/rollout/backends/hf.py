"""The `hf` backend: transformers' generate, batched (gradalign_common.generation), on CPU or CUDA.

The model stays loaded between requests. A request for another checkpoint with the same
architecture copies the new weights into the loaded module (no new module, no restart); a
different architecture is loaded afresh.
"""

from __future__ import annotations

from typing import Sequence

import torch

from gradalign_common.generation import Sampling, sample_responses
from gradalign_common.modeling import checkpoint_fingerprint, load_model, load_tokenizer
from services.rollout.backends.base import Sample

# config keys that differ between checkpoints of one architecture (where it was saved, by which version)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}


def same_architecture(a, b) -> bool:
    if type(a) is not type(b):
        return False
    strip = lambda m: {k: v for k, v in m.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}  # noqa: E731
    return strip(a) == strip(b)


class HFBackend:
    name = "hf"

    def __init__(self, settings):
        self.device = settings.device
        self.dtype = settings.dtype
        self.batch_size = settings.batch_size
        self.model = None
        self.tokenizer = None
        self._fingerprint: tuple | None = None
        self.loads = 0  # full loads
        self.swaps = 0  # in-place weight swaps

    def load(self, checkpoint: str):
        fingerprint = checkpoint_fingerprint(checkpoint)  # NotFoundError / InvalidInputError naming the path
        if fingerprint == self._fingerprint:
            return self.tokenizer
        new_model = load_model(checkpoint, device=self.device, dtype=self.dtype)
        tokenizer = load_tokenizer(checkpoint)
        if self.model is not None and same_architecture(self.model, new_model):
            with torch.no_grad():
                self.model.load_state_dict(new_model.state_dict())
            self.model.generation_config = new_model.generation_config
            del new_model
            self.swaps += 1
        else:
            self.model = new_model
            self.loads += 1
        self.tokenizer = tokenizer
        self._fingerprint = fingerprint
        return tokenizer

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Sample]]:
        if self.model is None:
            raise RuntimeError("hf backend: no checkpoint loaded")
        responses = sample_responses(self.model, self.tokenizer, prompt_ids, sampling, batch_size=self.batch_size)
        decode = self.tokenizer.decode
        return [
            [Sample(tuple(ids), decode(ids, skip_special_tokens=True), finish) for ids, finish in samples]
            for samples in responses
        ]

    def close(self) -> None:
        self.model = self.tokenizer = self._fingerprint = None
