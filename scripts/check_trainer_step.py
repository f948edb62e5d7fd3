#!/usr/bin/env python
"""Check the torch trainer's GRPO step on a device (scripts/gpu_check.sh runs it on a lent GPU).

    python scripts/check_trainer_step.py [--device cuda] [--preset qwen2.5-0.5b] [--groups 8]
        [--responses 8] [--tokens 128] [--out FILE.json]

1. **Same step on both devices.** The tiny arithmetic model and one GRPO step on the same
   rollouts (reused, so no sampling differs): on the CPU and on --device, both float32. The
   parameter updates must agree (max |update_cpu - update_device| <= 1e-3 x max |update_cpu|),
   the loss within 1e-4.
2. **A step at a larger size.** A random-weight Qwen2 of the preset's architecture (the
   scoring benchmark's presets) takes one GRPO step on --device with --groups x --responses
   random responses of --tokens tokens (reused rollouts: the step's cost is the update alone):
   seconds, response tokens/s, peak memory. Reported, not judged.
Prints one PASS/FAIL line per check and a JSON summary (to --out too); exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from checklist import FAILED, check  # noqa: E402 (scripts/ is the script's own folder)


def one_step(model, tokenizer, problems, config, rollouts) -> tuple[dict, float]:
    """One GRPO step on reused rollouts; returns ({name: update}, loss)."""
    import torch

    from services.trainer.grpo import GRPOTrainer

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    by_problem: dict[str, list] = {}
    for r in rollouts:
        by_problem.setdefault(r.problem_id, []).append(r)
    metrics = GRPOTrainer(model, tokenizer, problems, config, first_batch_rollouts=by_problem).step()
    with torch.no_grad():
        updates = {n: (p.detach() - before[n]).float().cpu() for n, p in model.named_parameters()}
    return updates, metrics.loss


def same_step_on_both_devices(device: str, work: Path) -> dict:
    from gradalign_common.datasets import load_problems
    from gradalign_common.generation import Sampling, generate_rollouts
    from gradalign_common.modeling import load_model, load_tokenizer
    from gradalign_common.tiny_model import TinyModelSpec, build_and_save
    from gradalign_common.tiny_task import write_splits
    from services.trainer.grpo import GRPOConfig

    ckpt = build_and_save(work / "tiny", TinyModelSpec(warmup_steps=100))
    tokenizer = load_tokenizer(ckpt)
    problems = load_problems(write_splits(work / "data")["train"])[:8]
    config = GRPOConfig(steps=1, batch_size=8, n_samples=8, learning_rate=1e-3, max_tokens=8, seed=0)
    rollouts = generate_rollouts(load_model(ckpt), tokenizer, problems, Sampling(n=8, max_tokens=8, temperature=1.0, seed=0))
    cpu_updates, cpu_loss = one_step(load_model(ckpt), tokenizer, problems, config, rollouts)
    dev_updates, dev_loss = one_step(load_model(ckpt).to(device), tokenizer, problems, config, rollouts)
    scale = max(u.abs().max().item() for u in cpu_updates.values())
    diff = max((cpu_updates[n] - dev_updates[n]).abs().max().item() for n in cpu_updates)
    check("the step changes the weights", scale > 0, f"max |update| {scale:.3g}")
    check(f"cpu and {device} updates agree", diff <= 1e-3 * scale, f"max diff {diff:.3g} ({diff / scale:.2g} of the largest update)")
    check(f"cpu and {device} losses agree", abs(cpu_loss - dev_loss) <= 1e-4, f"{cpu_loss:.6f} vs {dev_loss:.6f}")
    return {"max_update": scale, "max_update_diff": diff, "cpu_loss": cpu_loss, "device_loss": dev_loss}


def step_at_size(device: str, preset: str, groups: int, responses: int, tokens: int, dtype: str) -> dict:
    import torch

    from gradalign_common.char_tokenizer import build_char_tokenizer
    from gradalign_common.records import Problem
    from gradalign_tools.bench.scoring import PRESETS, BenchConfig, build_model, make_rollouts, response_tokens
    from services.trainer.grpo import GRPOConfig

    layers, hidden, intermediate, heads, kv_heads, vocab = PRESETS[preset]
    cfg = BenchConfig(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                      vocab=vocab, responses=responses, tokens=tokens)
    model = build_model(cfg).to(device=device, dtype=getattr(torch, dtype))
    rollouts = make_rollouts(cfg, groups, "p", seed=0)
    problems = [Problem(f"p{i:05d}", json.dumps([{"role": "user", "content": "1+1="}]), "arith", "2") for i in range(groups)]
    config = GRPOConfig(steps=1, batch_size=groups, n_samples=responses, learning_rate=1e-6, max_tokens=tokens,
                        micro_batch_size=responses, seed=0)
    tokenizer = build_char_tokenizer()
    if torch.cuda.is_available() and device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    _, loss = one_step(model, tokenizer, problems, config, rollouts)
    if torch.cuda.is_available() and device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") and torch.cuda.is_available() else None
    n_tokens = response_tokens(rollouts)
    parameters = sum(p.numel() for p in model.parameters())
    check(f"a {preset} step on {device} ({dtype})", loss == loss, f"{seconds:.2f} s, {n_tokens / seconds:,.0f} response tokens/s")
    return {"preset": preset, "parameters": parameters, "dtype": dtype, "groups": groups, "responses": responses,
            "tokens": tokens, "seconds": seconds, "response_tokens_per_s": n_tokens / seconds, "peak_gib": peak, "loss": loss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="qwen2.5-0.5b", help="the scoring benchmark's presets: tiny, qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the step at size")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gradalign-check-trainer-") as tmp:
        summary = {"device": args.device, "torch": torch.__version__}
        summary["same_step"] = same_step_on_both_devices(args.device, Path(tmp))
        summary["at_size"] = step_at_size(args.device, args.preset, args.groups, args.responses, args.tokens, args.dtype)
    summary["failed"] = FAILED
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
