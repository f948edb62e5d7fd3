"""The interface every rollout backend implements, and the sample type they return."""

from __future__ import annotations

from typing import Protocol, Sequence

from gradalign_common.generation import Sample, Sampling

__all__ = ["RolloutBackend", "Sample"]  # Sample lives with the generation code every backend shares


class RolloutBackend(Protocol):
    name: str
    loads: int  # full model loads (vllm: engines built)
    swaps: int  # in-place weight swaps
    swap_failures: int  # in-place swaps that failed and fell back to a full load (logged at warning)
    load_seconds: float  # time spent in full loads, in total
    swap_seconds: float  # time spent in in-place swaps, in total
    # True: a prompt's samples depend only on the request's seed and the prompt, so the service
    # passes the request's seed to every slice; False: the service seeds each slice
    seeds_per_prompt: bool

    def load(self, checkpoint: str):
        """Make `checkpoint` the loaded model (swapping weights in place when only they differ);
        return its tokenizer. Raises NotFoundError / InvalidInputError naming the checkpoint."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Sample]]:
        """sampling.n samples per prompt, in prompt order; deterministic for sampling.seed."""

    def close(self) -> None: ...
