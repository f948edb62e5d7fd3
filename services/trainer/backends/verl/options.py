"""VerlOptions: the cluster-side knobs of a verl run (TrainerSettings.verl_options()), and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from gradalign_common.errors import InvalidInputError

# transformers' attention implementations verl's FSDP engine can load the actor/ref with;
# only flash_attention_2 needs the flash-attn package (and alone keeps verl's padding-free batches)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class VerlOptions:
    """The cluster-side knobs of a verl run (TrainerSettings.verl_options())."""

    python: str = "python3"
    n_gpus_per_node: int = 1
    nnodes: int = 1
    tensor_parallel_size: int = 1  # vLLM rollout tensor parallelism
    gpu_memory_utilization: float = 0.6  # vLLM's share of each GPU
    micro_batch_size_per_gpu: int = 4  # responses per forward/backward per GPU (at most; see micro_batch_per_gpu)
    max_prompt_length: int = 1024  # at least; raised to the longest prompt when a tokenizer is given
    attn_implementation: str = "sdpa"  # the FSDP actor/ref's attention (services.trainer.backends.verl.command)
    extra_overrides: tuple[str, ...] = ()  # appended last, so they win

    @property
    def n_gpus(self) -> int:
        return self.n_gpus_per_node * self.nnodes

    def validate(self) -> None:
        for name in ("n_gpus_per_node", "nnodes", "tensor_parallel_size", "micro_batch_size_per_gpu"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"verl {name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidInputError(f"verl gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_prompt_length < 1:
            raise InvalidInputError(f"verl max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise InvalidInputError(
                f"verl attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}"
            )
        if self.n_gpus % self.tensor_parallel_size:
            raise InvalidInputError(
                f"verl tensor_parallel_size {self.tensor_parallel_size} must divide the GPU count {self.n_gpus}"
            )
