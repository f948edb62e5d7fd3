"""`gradalign bench rollout`: generated tokens/s of the batched hf backend against one generate
call per response, on the same model and prompts, in one process.

Default: the tiny model (built into a temporary directory), 32 arithmetic prompts x 8 samples
of up to 8 tokens. Both modes sample the same prompts with the same settings; the batched mode
is the rollout service's hf backend (length-sorted, left-padded batches, n samples per prompt
in one generate call, KV cache), the baseline calls generate once per response.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import typer


def rollout_command(
    model: Optional[Path] = typer.Option(None, help="Hugging Face model directory; default: build the tiny model"),
    prompts: int = typer.Option(32, min=1, help="prompts (arithmetic problems)"),
    samples: int = typer.Option(8, min=1, help="samples per prompt"),
    max_tokens: int = typer.Option(8, min=1, help="max new tokens per response"),
    batch_size: int = typer.Option(64, min=1, help="prompts per generate call of the batched backend"),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int = typer.Option(0),
    warmup_steps: int = typer.Option(60, min=0, help="warm-up steps of the tiny model when it is built"),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 keeps torch's default"),
) -> None:
    """Print tokens/s of batched generation vs one generate call per response, and the speedup."""
    from gradalign_common.modeling import configure_torch_threads

    configure_torch_threads(threads)
    with tempfile.TemporaryDirectory(prefix="gradalign-bench-") as tmp:
        if model is None:
            from gradalign_common.tiny_model import TinyModelSpec, build_and_save

            t0 = time.perf_counter()
            model = build_and_save(Path(tmp) / "tiny", TinyModelSpec(warmup_steps=warmup_steps))
            what = f"tiny model (built in {time.perf_counter() - t0:.1f} s)"
        else:
            what = str(model)
        rows = run_bench(model, prompts, samples, max_tokens, batch_size, temperature, seed)
    import torch

    typer.echo(
        f"gradalign bench rollout: {what}, {prompts} prompts x {samples} samples, up to {max_tokens} tokens, "
        f"temperature {temperature:g}, batch {batch_size} prompts, {torch.get_num_threads()} torch threads"
    )
    typer.echo(f"{'mode':<28}{'responses':>10}{'tokens':>9}{'seconds':>10}{'tokens/s':>12}")
    for name, responses, tokens, seconds in rows:
        typer.echo(f"{name:<28}{responses:>10}{tokens:>9}{seconds:>10.3f}{tokens / seconds:>12.1f}")
    (_, _, base_tok, base_s), (_, _, fast_tok, fast_s) = rows
    speedup = (fast_tok / fast_s) / (base_tok / base_s)
    typer.echo(f"speedup: {speedup:.1f}x generated tokens/s (target >= 5x)")


def run_bench(model_dir, n_prompts, n_samples, max_tokens, batch_size, temperature, seed):
    """[(mode, responses, generated tokens, seconds)] for the baseline, then the batched backend."""
    from gradalign_common.datasets import problem_from_record
    from gradalign_common.generation import Sampling, prompt_token_ids, sample_responses_unbatched
    from gradalign_common.prompts import render_prompt
    from gradalign_common.tiny_task import make_splits
    from services.rollout.backends.hf import HFBackend
    from services.rollout.settings import RolloutSettings

    backend = HFBackend(RolloutSettings(batch_size=batch_size))
    tokenizer = backend.load(str(model_dir))
    records = _arith_records(n_prompts, make_splits)
    problems = [problem_from_record(r, i, "bench") for i, r in enumerate(records)]
    ids = prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer) for p in problems])
    sampling = Sampling(n=n_samples, max_tokens=max_tokens, temperature=temperature, seed=seed)

    warm = Sampling(n=2, max_tokens=2, temperature=temperature, seed=seed)
    backend.generate(ids[:2], warm)  # first calls pay one-off costs; keep them out of both timings
    sample_responses_unbatched(backend.model, tokenizer, ids[:1], warm)

    t0 = time.perf_counter()
    baseline = sample_responses_unbatched(backend.model, tokenizer, ids, sampling)
    texts = [[tokenizer.decode(r, skip_special_tokens=True) for r, _ in s] for s in baseline]
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = backend.generate(ids, sampling)
    fast_s = time.perf_counter() - t0
    assert len(texts) == len(batched) == n_prompts
    return [
        ("one generate per response", n_prompts * n_samples, sum(len(r) for s in baseline for r, _ in s), base_s),
        ("batched hf backend", n_prompts * n_samples, sum(len(x.token_ids) for s in batched for x in s), fast_s),
    ]


def _arith_records(n: int, make_splits) -> list[dict]:
    splits = make_splits(n_train=min(n, 2400), n_val=0, n_test=0)["train"]
    return [splits[i % len(splits)] for i in range(n)]
