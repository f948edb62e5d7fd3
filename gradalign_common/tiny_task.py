"""The built-in arithmetic task: "37+45=" -> "82", in VERL-style records.

A record is {"prompt": [{"role": "user", "content": "37+45="}], "data_source": "arith",
"reward_model": {"style": "rule", "ground_truth": "82"}, "extra_info": {"index": 7, "split": "train"}}.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from gradalign_common.artifacts import atomic_write_bytes

DATA_SOURCE = "arith"
MAX_OPERAND = 49


def arith_problem(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}=", str(a + b)


def make_record(a: int, b: int, index: int, split: str) -> dict:
    prompt, answer = arith_problem(a, b)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "data_source": DATA_SOURCE,
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"index": index, "split": split},
    }


def make_splits(seed: int = 0, n_train: int = 512, n_val: int = 32, n_test: int = 64) -> dict[str, list[dict]]:
    """Disjoint train/val/test problems drawn from all pairs a+b with 0 <= a, b <= MAX_OPERAND."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    need = n_train + n_val + n_test
    if need > len(pairs):
        raise ValueError(f"the arithmetic task has {len(pairs)} distinct problems; asked for {need}")
    random.Random(seed).shuffle(pairs)
    splits, start = {}, 0
    for name, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        splits[name] = [make_record(a, b, start + i, name) for i, (a, b) in enumerate(pairs[start : start + count])]
        start += count
    return splits


def write_splits(out_dir: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """Write train.jsonl, val.jsonl and test.jsonl under out_dir; return their paths."""
    out = Path(out_dir)
    paths = {}
    for name, records in make_splits(seed, **sizes).items():
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        paths[name] = atomic_write_bytes(out / f"{name}.jsonl", data)
    return paths
