"""Rollout backends chosen by settings.backend: `hf` (transformers' generate, CPU or CUDA) and
`vllm` (vllm.LLM on GPUs; vllm is imported only when this backend is created)."""

from __future__ import annotations

from services.rollout.backends.base import RolloutBackend, Sample

__all__ = ["RolloutBackend", "Sample", "create_backend"]


def create_backend(settings) -> RolloutBackend:
    if settings.backend == "hf":
        from services.rollout.backends.hf import HFBackend

        return HFBackend(settings)
    if settings.backend == "vllm":
        from services.rollout.backends.vllm import VLLMBackend

        return VLLMBackend(settings)
    raise ValueError(f"unknown rollout backend {settings.backend!r}; choose hf or vllm")
