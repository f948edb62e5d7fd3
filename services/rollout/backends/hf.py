"""The `hf` backend: transformers' generate, batched (gradalign_common.generation), on CPU or CUDA.

The model stays loaded between requests. A request for another checkpoint with the same
architecture copies the new weights into the loaded module (no new module, no restart); a
different architecture is loaded afresh.
"""

from __future__ import annotations

from typing import Sequence

from gradalign_common.generation import Sampling, sample_responses
from gradalign_common.model_cache import ModelCache
from services.rollout.backends.base import Sample

class HFBackend:
    name = "hf"

    def __init__(self, settings):
        self.batch_size = settings.batch_size
        self.cache = ModelCache(device=settings.device, dtype=settings.dtype)

    @property
    def model(self):
        return self.cache.model

    @property
    def tokenizer(self):
        return self.cache.tokenizer

    @property
    def loads(self) -> int:
        return self.cache.loads

    @property
    def swaps(self) -> int:
        return self.cache.swaps

    def load(self, checkpoint: str):
        """Load (or swap in place) the checkpoint; NotFoundError / InvalidInputError name a bad path."""
        return self.cache.get(checkpoint)[1]

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
        self.cache.clear()
