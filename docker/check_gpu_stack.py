"""Build-time check of the CUDA image: the pinned GPU stack is what got installed, and the
modules the rollout and trainer backends use import.

    python check_gpu_stack.py --lock requirements/gpu.lock [--compiler]

1. every `name==version` of the lock is installed at that version (a local label such as
   `+cu130` is ignored), so a silent re-resolve cannot swap torch, vLLM or verl;
2. the modules the backends actually use import, with the attributes we call:
   vllm.LLM (collective_rpc "reload_weights", reset_prefix_cache), vllm.SamplingParams;
   the verl entry points the trainer runs (`python -m verl.trainer.main_ppo`,
   `python -m verl.model_merger`) and verl's GRPO functions;
3. with --compiler: a C compiler and Python's headers are present (Triton compiles a launcher
   with them at the first kernel on a GPU).
Prints one line per failure and exits 1 if any; 0 and a summary otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import sys
import sysconfig
from pathlib import Path

# (module, attributes that must exist on it); imported in this order
BACKEND_MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torch", ("cuda",)),
    ("vllm", ("LLM", "SamplingParams")),
    ("verl.trainer.main_ppo", ("main",)),
    ("verl.trainer.ppo.core_algos", ("compute_grpo_outcome_advantage", "agg_loss")),
    ("verl.model_merger.base_model_merger", ("parse_args", "generate_config_from_args")),
    ("verl.model_merger.fsdp_model_merger", ("FSDPModelMerger",)),
)
# python -m targets: they must exist as modules, without running them
ENTRY_POINTS = ("verl.trainer.main_ppo", "verl.model_merger.__main__")
LLM_METHODS = ("collective_rpc", "reset_prefix_cache", "generate")

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line (comments and blanks ignored)."""
    pins = {}
    for line in text.splitlines():
        m = _PIN.match(line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def version_problems(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One message per pinned package that is missing or at another version."""
    problems = []
    for name, want in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}=={want} is not installed")
        elif have.split("+", 1)[0] != want.split("+", 1)[0]:
            problems.append(f"{name} is {have}, the lock pins {want}")
    return problems


def installed_versions() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def import_problems() -> list[str]:
    problems = []
    for module_name, attributes in BACKEND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the finding
            problems.append(f"import {module_name} failed: {type(exc).__name__}: {exc}")
            continue
        problems += [f"{module_name} has no {a}" for a in attributes if not hasattr(module, a)]
        if module_name == "vllm" and hasattr(module, "LLM"):
            problems += [f"vllm.LLM has no {m}" for m in LLM_METHODS if not callable(getattr(module.LLM, m, None))]
    for entry in ENTRY_POINTS:
        try:
            found = importlib.util.find_spec(entry) is not None  # imports the parent packages
        except Exception as exc:  # noqa: BLE001
            problems.append(f"python -m {entry.removesuffix('.__main__')}: {type(exc).__name__}: {exc}")
            continue
        if not found:
            problems.append(f"python -m {entry.removesuffix('.__main__')}: no module {entry}")
    return problems


def compiler_problems() -> list[str]:
    problems = []
    if not any(shutil.which(cc) for cc in ("cc", "gcc")):
        problems.append("no C compiler (cc/gcc) on PATH: Triton cannot build its launcher")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        problems.append(f"no Python.h under {include}: Triton cannot build its launcher")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lock", type=Path, required=True, help="requirements/gpu.lock")
    ap.add_argument("--compiler", action="store_true", help="also check for a C compiler and Python.h")
    args = ap.parse_args(argv)
    pins = read_lock(args.lock.read_text())
    if not pins:
        print(f"error: {args.lock} pins nothing", file=sys.stderr)
        return 1
    problems = version_problems(pins, installed_versions()) + import_problems()
    if args.compiler:
        problems += compiler_problems()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"gpu stack: {len(pins)} pinned packages installed as locked; backend modules import"
          f" (torch {pins.get('torch')}, vllm {pins.get('vllm')}, verl {pins.get('verl')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
