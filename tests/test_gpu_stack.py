"""The pinned GPU stack: the `gpu` extra, requirements/gpu.lock and the CUDA image's check agree.

The resolution tests ask the package registry for metadata (no CUDA wheel is downloaded: uv
reads each wheel's METADATA alone) for the CUDA image's Python 3.12 on manylinux x86_64. They
need the registry, which CI reaches; without it they fail, never skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "gpu.lock"
UV = Path(sys.executable).with_name("uv")
# what `make gpu-lock` passes: the image's interpreter and platform
TARGET = ["--python-version", "3.12", "--python-platform", "x86_64-manylinux_2_28"]
# the packages the backends run on: their versions are the stack
STACK = {"verl": "0.9.1", "vllm": "0.24.0", "torch": "2.11.0", "transformers": "5.9.0"}


def _check_module():
    spec = importlib.util.spec_from_file_location("check_gpu_stack", ROOT / "docker" / "check_gpu_stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _check_module()


def _gpu_extra() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]


def _resolve(*extra_args: str) -> dict[str, str]:
    assert UV.is_file(), f"{UV} missing: uv is in the dev extra (pip install -e '.[dev]')"
    out = subprocess.run(
        [str(UV), "pip", "compile", "pyproject.toml", "--extra", "gpu", *TARGET, "--no-header", "--no-annotate", "--quiet", *extra_args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "UV_NO_PROGRESS": "1"},
    )
    assert out.returncode == 0, f"the gpu extra does not resolve:\n{out.stderr[-4000:]}"
    return check.read_lock(out.stdout)


def test_the_gpu_extra_pins_the_stack_that_the_lock_holds():
    extra = _gpu_extra()
    assert all("==" in requirement for requirement in extra), extra
    pins = check.read_lock("\n".join(extra))
    assert pins == STACK
    assert "verl[vllm]==0.9.1" in extra, "verl's own vllm extra: the vLLM and torch its release supports"
    lock = check.read_lock(LOCK.read_text())
    assert {name: lock.get(name) for name in STACK} == STACK
    # the project's own pins hold in the image too
    project = check.read_lock("\n".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]))
    assert project and all(lock.get(name) == version for name, version in project.items()), project
    assert "gradalign" not in lock


@pytest.mark.slow
def test_the_lock_is_exactly_the_resolution_of_the_gpu_extra():
    """Resolved with the lock as constraints, the result is the lock itself: nothing unpinned,
    nothing pinned that the extra does not need, every pin reachable together."""
    lock = check.read_lock(LOCK.read_text())
    resolved = _resolve("--constraint", str(LOCK))
    assert set(resolved) - set(lock) == set(), "resolved but not locked (re-run make gpu-lock)"
    assert set(lock) - set(resolved) == set(), "locked but not needed (re-run make gpu-lock)"
    differ = {name: (lock[name], resolved[name]) for name in lock if lock[name] != resolved[name]}
    assert not differ, differ


@pytest.mark.slow
def test_a_fresh_resolution_keeps_the_stack():
    """Without the lock (what `pip install '.[gpu]'` does on a user's machine), the extra still
    lands on the pinned verl, vLLM, torch and transformers; other packages may move."""
    resolved = _resolve()
    assert {name: resolved.get(name) for name in STACK} == STACK
    lock = check.read_lock(LOCK.read_text())
    moved = sorted(f"{n} {lock[n]} -> {v}" for n, v in resolved.items() if n in lock and lock[n] != v)
    print(f"packages a fresh resolve moves (not the stack): {len(moved)}", *moved[:20], sep="\n  ")


def test_the_image_check_finds_a_swapped_package_and_a_missing_one():
    pins = check.read_lock("# header\ntorch==2.11.0\nvllm==0.24.0  # comment\nverl[vllm]==0.9.1\n")
    assert pins == {"torch": "2.11.0", "vllm": "0.24.0", "verl": "0.9.1"}
    assert check.version_problems(pins, {"torch": "2.11.0+cu130", "vllm": "0.24.0", "verl": "0.9.1"}) == []
    problems = check.version_problems(pins, {"torch": "2.13.0", "vllm": "0.24.0"})
    assert problems == ["torch is 2.13.0, the lock pins 2.11.0", "verl==0.9.1 is not installed"]


def test_the_image_check_imports_what_the_backends_run():
    """The modules named are the ones our backends import or run with `python -m` (a rename in the
    backends without this list fails here)."""
    names = {module for module, _ in check.BACKEND_MODULES} | set(check.ENTRY_POINTS)
    backend = (ROOT / "services" / "trainer" / "backends" / "verl" / "command.py").read_text()
    for module in ("verl.trainer.main_ppo", "verl.model_merger"):
        assert f'"{module}"' in backend and (module in names or f"{module}.__main__" in names)
    assert {"collective_rpc", "reset_prefix_cache"} <= set(check.LLM_METHODS)
    vllm_backend = (ROOT / "services" / "rollout" / "backends" / "vllm.py").read_text()
    for method in ("collective_rpc", "reset_prefix_cache"):
        assert f".{method}(" in vllm_backend
    # run here, the check reports the CPU environment's differences from the lock and exits 1
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "check_gpu_stack.py"), "--lock", str(LOCK)], capture_output=True, text=True)
    assert out.returncode == 1 and "the lock pins 2.11.0" in out.stderr, out.stderr[-2000:]
