"""The `vllm` backend: vllm.LLM with SamplingParams(n=...), for GPUs (the `gpu` extra).

vllm is imported only when this backend is created. The mapping from our request to vLLM's
arguments (`engine_kwargs`, `sampling_params_kwargs`, `token_prompts`) and from vLLM's
outputs back to our samples (`samples_from_outputs`) are pure functions, unit-tested without
vllm (tests/test_rollout_backends.py); scripts/check_vllm.py checks the whole backend on a
GPU machine.

Prompts go in as token ids (we render and tokenize them ourselves, so the length check and
the records' prompt_ids match what the model saw). Each prompt gets its own seed derived
from the request's seed and its position, so its samples do not depend on which other prompts
share the engine's batch. A checkpoint with the same architecture and tokenizer is swapped in
place (update the engine's model path, reload the weights on every worker, drop the prefix
cache); anything else, or a failed in-place swap, rebuilds the engine.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from gradalign_common.generation import Sampling, batch_seed
from gradalign_common.logging_setup import get_logger
from gradalign_common.modeling import check_model_dir, checkpoint_fingerprint, load_tokenizer
from services.rollout.backends.base import Sample

log = get_logger("gradalign.rollout.vllm")

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}
# config.json keys that may differ between checkpoints of one model without changing its shapes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures_version"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")


def engine_kwargs(checkpoint: str | Path, settings) -> dict[str, Any]:
    """Keyword arguments of vllm.LLM for a checkpoint under the rollout settings."""
    return {
        "model": str(checkpoint),
        "tokenizer": str(checkpoint),
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "dtype": settings.dtype,
        "seed": settings.vllm_seed,
        "enforce_eager": settings.vllm_enforce_eager,
        "trust_remote_code": False,
    }


def sampling_params_kwargs(sampling: Sampling, n_prompts: int) -> list[dict[str, Any]]:
    """Keyword arguments of vllm.SamplingParams, one per prompt (each with its own seed)."""
    base = {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "stop": list(sampling.stop) or None,
        # keep the stop string in the text so text and token ids describe the same response
        "include_stop_str_in_output": True,
        "skip_special_tokens": True,
    }
    return [{**base, "seed": batch_seed(sampling.seed, i)} for i in range(n_prompts)]


def token_prompts(prompt_ids: Sequence[Sequence[int]]) -> list[dict[str, list[int]]]:
    """vLLM prompts given as token ids (the shape of vllm.inputs.TokensPrompt)."""
    return [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompt_ids]


def finish_reason(reason: str | None) -> str:
    """vLLM's finish reason in our terms: stop (EOS or a stop string) | length | abort."""
    if reason is None:
        return "length"
    return _FINISH_REASONS.get(str(reason), str(reason))


def samples_from_outputs(outputs: Sequence[Any], prompt_ids: Sequence[Sequence[int]], n: int) -> list[list[Sample]]:
    """Our samples from vLLM's RequestOutputs (one per prompt, in prompt order, each with n
    CompletionOutputs having token_ids, text, finish_reason and index)."""
    if len(outputs) != len(prompt_ids):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    result = []
    for i, (out, ids) in enumerate(zip(outputs, prompt_ids)):
        got = getattr(out, "prompt_token_ids", None)
        if got is not None and list(got) != list(ids):
            raise RuntimeError(f"vLLM output {i} belongs to another prompt")
        completions = sorted(out.outputs, key=lambda c: getattr(c, "index", 0))
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {i}, expected {n}")
        result.append(
            [Sample(tuple(int(t) for t in c.token_ids), c.text or "", finish_reason(c.finish_reason)) for c in completions]
        )
    return result


def architecture_key(checkpoint: str | Path) -> str:
    """What must be equal for an in-place weight swap: config.json (minus names/versions) and tokenizer files."""
    p = check_model_dir(checkpoint)
    config = json.loads((p / "config.json").read_text())
    digest = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}, sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        f = p / name
        if f.is_file():
            digest.update(name.encode())
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()


class VLLMBackend:
    name = "vllm"

    def __init__(self, settings):
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError(
                "the vllm rollout backend needs vLLM on a GPU machine: install the gpu extra "
                "(pip install 'gradalign[gpu]') or set GRADALIGN_ROLLOUT_BACKEND=hf"
            ) from exc
        self._vllm = vllm
        self.settings = settings
        self.llm = None
        self.tokenizer = None
        self._fingerprint: tuple | None = None
        self._arch: str | None = None
        self.loads = 0
        self.swaps = 0

    def load(self, checkpoint: str):
        fingerprint = checkpoint_fingerprint(checkpoint)  # NotFoundError / InvalidInputError naming the path
        if fingerprint == self._fingerprint and self.llm is not None:
            return self.tokenizer
        tokenizer = load_tokenizer(checkpoint)
        arch = architecture_key(checkpoint)
        path = str(check_model_dir(checkpoint))
        if self.llm is not None and arch == self._arch:
            try:
                self._swap_weights(path)
                self.swaps += 1
            except Exception as exc:  # noqa: BLE001 - an engine without in-place reload: rebuild it
                log.warning("vllm_inplace_swap_failed", checkpoint=path, error=f"{type(exc).__name__}: {exc}")
                self._rebuild(path)
        else:
            self._rebuild(path)
        self.tokenizer, self._fingerprint, self._arch = tokenizer, fingerprint, arch
        return tokenizer

    def _swap_weights(self, path: str) -> None:
        self.llm.collective_rpc("update_config", args=({"model_config": {"model": path}},))
        self.llm.collective_rpc("reload_weights")
        self.llm.reset_prefix_cache()

    def _rebuild(self, path: str) -> None:
        self._shutdown()
        self.llm = self._vllm.LLM(**engine_kwargs(path, self.settings))
        self.loads += 1

    def _shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):
            try:
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort before the engine is dropped
                log.warning("vllm_shutdown_failed")
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Sample]]:
        if self.llm is None:
            raise RuntimeError("vllm backend: no checkpoint loaded")
        params = [self._vllm.SamplingParams(**kw) for kw in sampling_params_kwargs(sampling, len(prompt_ids))]
        outputs = self.llm.generate(token_prompts(prompt_ids), sampling_params=params, use_tqdm=False)
        return samples_from_outputs(outputs, prompt_ids, sampling.n)

    def close(self) -> None:
        self._shutdown()
        self.tokenizer = self._fingerprint = self._arch = None
