"""Training backends chosen by settings.backend: `torch` (services.trainer.grpo in this process,
CPU or one GPU) and `verl` (verl 0.9.1's GRPO trainer as a subprocess, GPU clusters). A backend
module is imported only when its backend is created."""

from __future__ import annotations

from typing import Callable

from services.trainer.backends.base import Cancellation, TrainBackend, TrainOutcome

__all__ = ["BACKENDS", "Cancellation", "TrainBackend", "TrainOutcome", "create_backend"]


def _torch(settings) -> TrainBackend:
    from services.trainer.backends.torch import TorchBackend

    return TorchBackend(settings)


def _verl(settings) -> TrainBackend:
    from services.trainer.backends.verl.backend import VerlBackend

    return VerlBackend(settings)


BACKENDS: dict[str, Callable[..., TrainBackend]] = {"torch": _torch, "verl": _verl}


def create_backend(settings) -> TrainBackend:
    """The backend settings.backend names (a TrainerSettings)."""
    try:
        factory = BACKENDS[settings.backend]
    except KeyError:
        raise ValueError(f"unknown trainer backend {settings.backend!r}; choose {' or '.join(BACKENDS)}") from None
    return factory(settings)
