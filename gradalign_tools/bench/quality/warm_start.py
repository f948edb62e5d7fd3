"""The warm-started model every mode of a regime starts from, built once per (model, warm start, seed) and cached."""

from __future__ import annotations

import json
import time
from pathlib import Path

from filelock import FileLock

from gradalign_common.artifacts import atomic_write_bytes
from gradalign_tools.bench.quality.config import digest, model_spec
from gradalign_tools.bench.quality.stats import mean


def warm_model_dir(config: dict, seed: int, cache: Path) -> Path:
    """The cached warm-started model for (model spec, warm start, seed); built (under a lock) if missing."""
    from gradalign_tools.bench.task_families import TEST_RESERVE, VAL_RESERVE

    key = digest({"model": config["model"], "warm_start": config["warm_start"], "reserves": [TEST_RESERVE, VAL_RESERVE]})
    out = cache / f"tiny-{key}-seed{seed}"
    if (out / "warm_start.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(cache / f".tiny-{key}-seed{seed}.lock"):  # another regime may build the same model meanwhile
        if not (out / "warm_start.json").is_file():
            build_warm_model(config, seed, out)
    return out


def greedy_accuracy(model, tokenizer, problems, max_tokens: int, batch_size: int) -> list[bool]:
    from gradalign_common.generation import Sampling, generate_rollouts

    records = generate_rollouts(model, tokenizer, problems, Sampling(n=1, max_tokens=max_tokens, temperature=0.0), batch_size)
    return [r.correct for r in records]


def build_warm_model(config: dict, seed: int, out: Path) -> dict:
    """Warm-start the tiny model on the mixture (stopping early once every `until` type's accuracy on
    its validation reserve is reached), save it with warm_start.json (steps, validation accuracies)."""
    from gradalign_common.char_tokenizer import build_char_tokenizer
    from gradalign_common.modeling import save_checkpoint
    from gradalign_tools.bench.task_families import VAL_RESERVE, held_out_prompts, make_family, warm_start_families
    from gradalign_common.tiny_model import build_tiny_model

    ws = config["warm_start"]
    spec = model_spec(config, seed)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(spec, tokenizer)
    watch = sorted(set(ws["until"]) | set(ws["mixture"]))
    reserve = make_family(seed, test={}, val={t: VAL_RESERVE for t in watch}, pool_size=0, pool_mixture={watch[0]: 1})
    by_type: dict[str, list] = {}
    for p, r in zip(reserve.val_problems(), reserve.val):
        by_type.setdefault(r["extra_info"]["type"], []).append(p)
    max_tokens = config["eval"]["max_tokens"]
    trace: list[dict] = []
    state = {"step": 0}

    def accuracies() -> dict[str, float]:
        model.eval()
        acc = {t: mean(greedy_accuracy(model, tokenizer, ps, max_tokens, 256)) for t, ps in by_type.items()}
        model.train()
        return acc

    def check(step: int) -> bool:
        state["step"] = step
        if not ws["until"] or step % ws["check_every"]:
            return False
        acc = accuracies()
        trace.append({"step": step, "val_accuracy": acc})
        return all(acc[t] >= float(v) for t, v in ws["until"].items())

    started = time.perf_counter()
    loss = warm_start_families(
        model, tokenizer, ws["mixture"], steps=ws["steps"], batch_size=ws["batch_size"],
        learning_rate=float(ws["learning_rate"]), seed=seed, exclude=held_out_prompts(seed), callback=check,
    )
    model.eval()
    steps = state["step"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    info = {
        "seed": seed,
        "steps": steps,
        "last_loss": loss,
        "seconds": round(time.perf_counter() - started, 2),
        "val_reserve_accuracy": accuracies(),
        "trace": trace,
        "model": config["model"],
        "warm_start": ws,
    }
    model.eval()
    save_checkpoint(model, tokenizer, out)
    atomic_write_bytes(out / "warm_start.json", json.dumps(info, indent=1).encode())
    return info
