"""`gradalign bench rollout`: generated tokens/s of the rollout backends against a baseline run on
the same model and prompts, in one process.

Default: the tiny model (built into a temporary directory), 32 arithmetic prompts x 8 samples
of up to 8 tokens, every mode sampling the same prompts with the same settings.

- `--backend hf` (default): the batched hf backend (the rollout service's: length-sorted,
  left-padded batches, n samples per prompt in one generate call, KV cache) against the
  baseline of one generate call per response.
- `--backend vllm` (or `hf,vllm`): the vllm backend (vllm.LLM; the CPU build where there is no
  CUDA) against the batched hf backend as the baseline. vLLM lives in its own environment
  here, where the project is installed too: `.venv-vllm/bin/gradalign bench rollout --backend
  vllm` (`make vllm-env`).

For each backend it also reports the model's load time (vllm: building the engine) and the
time of an in-place swap to another checkpoint of the same architecture (a copy of the model
at another path, swapped in and back; the mean of the two), with ratios against the baseline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

BACKENDS = ("hf", "vllm")
UNBATCHED = "one generate per response"
LABELS = {"hf": "batched hf backend", "vllm": "vllm backend"}


@dataclass
class Row:
    mode: str
    responses: int
    tokens: int
    seconds: float
    load_seconds: float | None = None  # the backend's model load (vllm: engine build)
    swap_seconds: float | None = None  # mean of two in-place swaps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def parse_backends(value: str) -> list[str]:
    """The backends to measure, in order: hf is always measured (alone, against one generate
    call per response; with vllm, as vllm's baseline)."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise typer.BadParameter(f"unknown backend(s) {', '.join(unknown) or repr(value)}; choose from {', '.join(BACKENDS)}")
    return [b for b in BACKENDS if b in names or b == "hf"]


def rollout_command(
    model: Optional[Path] = typer.Option(None, help="Hugging Face model directory; default: build the tiny model"),
    backend: str = typer.Option(
        "hf", help="hf: batched hf vs one generate per response; vllm (or hf,vllm): vllm vs the batched hf backend"
    ),
    prompts: int = typer.Option(32, min=1, help="prompts (arithmetic problems)"),
    samples: int = typer.Option(8, min=1, help="samples per prompt"),
    max_tokens: int = typer.Option(8, min=1, help="max new tokens per response"),
    batch_size: int = typer.Option(64, min=1, help="prompts per generate call of the batched hf backend"),
    temperature: float = typer.Option(1.0, min=0.0),
    seed: int = typer.Option(0),
    device: Optional[str] = typer.Option(None, help="device of the hf backend; default cuda when there is one, else cpu"),
    dtype: str = typer.Option("auto", help="model dtype of every backend: auto = bfloat16 on CUDA, float32 on CPU"),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="vllm: no graph capture/compilation (faster start)"),
    warmup_steps: int = typer.Option(60, min=0, help="warm-up steps of the tiny model when it is built"),
    threads: int = typer.Option(0, min=0, help="torch threads; 0 keeps torch's default"),
) -> None:
    """Print tokens/s, load and swap seconds of each backend and their ratios to the baseline."""
    from gradalign_common.modeling import configure_torch_threads

    backends = parse_backends(backend)
    if "vllm" in backends:
        try:
            import vllm  # noqa: F401
        except ImportError:
            typer.echo(
                "bench rollout --backend vllm: vllm is not installed in this environment; run it from "
                ".venv-vllm (make vllm-env): .venv-vllm/bin/gradalign bench rollout --backend vllm",
                err=True,
            )
            raise typer.Exit(2)
    configure_torch_threads(threads)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="gradalign-bench-") as tmp:
        if model is None:
            from gradalign_common.tiny_model import TinyModelSpec, build_and_save

            t0 = time.perf_counter()
            model = build_and_save(Path(tmp) / "tiny", TinyModelSpec(warmup_steps=warmup_steps))
            what = f"tiny model (built in {time.perf_counter() - t0:.1f} s)"
        else:
            what = str(model)
        copy = shutil.copytree(model, Path(tmp) / "swap-copy")  # same architecture, another checkpoint
        rows = run_bench(
            model, prompts, samples, max_tokens, batch_size, temperature, seed, backends=backends, device=device,
            dtype=dtype, enforce_eager=enforce_eager, swap_to=copy,
        )
    typer.echo(
        f"gradalign bench rollout: {what}, {prompts} prompts x {samples} samples, up to {max_tokens} tokens, "
        f"temperature {temperature:g}, batch {batch_size} prompts, hf on {device}, dtype {dtype}, "
        f"{torch.get_num_threads()} torch threads"
        + (f", vllm enforce_eager={enforce_eager}" if "vllm" in backends else "")
    )
    typer.echo(report(rows))


def report(rows: list[Row]) -> str:
    """The generation table (ratios to the first row, the baseline), the load/swap table, the speedup line."""
    base = rows[0]
    lines = [f"{'mode':<28}{'responses':>10}{'tokens':>9}{'seconds':>10}{'tokens/s':>12}{'x baseline':>12}"]
    for r in rows:
        lines.append(
            f"{r.mode:<28}{r.responses:>10}{r.tokens:>9}{r.seconds:>10.3f}{r.tokens_per_s:>12.1f}"
            f"{r.tokens_per_s / base.tokens_per_s:>11.2f}x"
        )
    timed = [r for r in rows if r.load_seconds is not None]
    if timed:
        ref = timed[0]
        lines.append(f"model load and in-place swap (ratios against the {ref.mode}):")
        lines.append(f"{'mode':<28}{'load s':>10}{'x':>11}{'swap s':>10}{'x':>11}")
        for r in timed:
            lines.append(
                f"{r.mode:<28}{r.load_seconds:>10.3f}{r.load_seconds / ref.load_seconds:>10.2f}x"
                f"{r.swap_seconds:>10.3f}{r.swap_seconds / ref.swap_seconds:>10.2f}x"
            )
    speedup = rows[-1].tokens_per_s / base.tokens_per_s
    if base.mode == UNBATCHED:
        lines.append(f"speedup: {speedup:.1f}x generated tokens/s (target >= 5x)")
    else:
        lines.append(f"speedup: {speedup:.2f}x generated tokens/s ({rows[-1].mode} vs the {base.mode})")
    return "\n".join(lines)


def run_bench(
    model_dir, n_prompts, n_samples, max_tokens, batch_size, temperature, seed, backends=("hf",), device="cpu",
    dtype="auto", enforce_eager=False, swap_to=None,
) -> list[Row]:
    """One Row per mode, the baseline first: one generate per response then the batched hf
    backend (backends hf), or the batched hf backend then the vllm backend (backends hf, vllm)."""
    from gradalign_common.datasets import problem_from_record
    from gradalign_common.generation import Sampling, prompt_token_ids, sample_responses_unbatched
    from gradalign_common.prompts import render_prompt
    from gradalign_common.tiny_task import make_splits
    from services.rollout.backends import create_backend
    from services.rollout.settings import RolloutSettings

    config = json.loads((Path(model_dir) / "config.json").read_text())
    settings = RolloutSettings(
        batch_size=batch_size, device=device, dtype=dtype, max_model_len=min(4096, int(config.get("max_position_embeddings", 4096))),
        vllm_enforce_eager=enforce_eager, reward_workers=0,
    )
    records = _arith_records(n_prompts, make_splits)
    problems = [problem_from_record(r, i, "bench") for i, r in enumerate(records)]
    sampling = Sampling(n=n_samples, max_tokens=max_tokens, temperature=temperature, seed=seed)
    warm = Sampling(n=2, max_tokens=2, temperature=temperature, seed=seed)
    rows: list[Row] = []
    for name in backends:
        b = create_backend(settings.model_copy(update={"backend": name}))
        try:
            tokenizer = b.load(str(model_dir))
            ids = prompt_token_ids(tokenizer, [render_prompt(p.prompt, tokenizer) for p in problems])
            b.generate(ids[:2], warm)  # first calls pay one-off costs; keep them out of the timings
            if name == "hf" and list(backends) == ["hf"]:
                sample_responses_unbatched(b.model, tokenizer, ids[:1], warm)
                t0 = time.perf_counter()
                baseline = sample_responses_unbatched(b.model, tokenizer, ids, sampling)
                texts = [[tokenizer.decode(r, skip_special_tokens=True) for r, _ in s] for s in baseline]
                assert len(texts) == n_prompts
                tokens = sum(len(r) for s in baseline for r, _ in s)
                rows.append(Row(UNBATCHED, n_prompts * n_samples, tokens, time.perf_counter() - t0))
            t0 = time.perf_counter()
            out = b.generate(ids, sampling)
            seconds = time.perf_counter() - t0
            assert len(out) == n_prompts and all(len(s) == n_samples for s in out)
            row = Row(LABELS[name], n_prompts * n_samples, sum(len(x.token_ids) for s in out for x in s), seconds)
            row.load_seconds = b.load_seconds
            if swap_to is not None:
                swaps = b.swaps
                b.load(str(swap_to))
                b.load(str(model_dir))
                if b.swaps != swaps + 2 or getattr(b, "swap_failures", 0):
                    raise RuntimeError(f"{name}: the in-place swaps failed (loads {b.loads}, swaps {b.swaps})")
                row.swap_seconds = b.swap_seconds / b.swaps
            rows.append(row)
        finally:
            b.close()
    return rows


def _arith_records(n: int, make_splits) -> list[dict]:
    splits = make_splits(n_train=min(n, 2400), n_val=0, n_test=0)["train"]
    return [splits[i % len(splits)] for i in range(n)]
