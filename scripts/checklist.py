"""PASS/FAIL lines of the device check scripts (check_vllm.py, check_trainer_step.py): `check` prints
one line per check and remembers the failures in FAILED, which decide the script's exit status."""

from __future__ import annotations

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)
