"""The `hf` backend: transformers' generate, batched (gradalign_common.generation), on CPU or CUDA.

The model stays loaded between requests. A request for another checkpoint with the same
architecture copies the new weights into the loaded module (no new module, no restart); a
different architecture is loaded afresh. dtype "auto" is bfloat16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import time
from typing import Sequence

from gradalign_common.generation import Sampling, sample_responses
from gradalign_common.model_cache import ModelCache
from gradalign_common.modeling import resolve_dtype
from services.rollout.backends.base import Sample


class HFBackend:
    name = "hf"
    seeds_per_prompt = False  # one torch seed per generate batch: the service seeds each slice
    swap_failures = 0  # a swap copies weights into the module; there is no fallback to count

    def __init__(self, settings):
        self.batch_size = settings.batch_size
        self.cache = ModelCache(device=settings.device, dtype=resolve_dtype(settings.dtype, settings.device))
        self.load_seconds = 0.0
        self.swap_seconds = 0.0

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
        loads, swaps, start = self.loads, self.swaps, time.perf_counter()
        tokenizer = self.cache.get(checkpoint)[1]
        seconds = time.perf_counter() - start
        if self.loads != loads:
            self.load_seconds += seconds
        elif self.swaps != swaps:
            self.swap_seconds += seconds
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
        self.cache.clear()
