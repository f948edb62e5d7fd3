"""`gradalign bench scoring`: exact and approximate scoring against the cost floor and the reference's method.

In one process, on one random-weight Qwen2 model and one set of random rollouts, it times:
- floor: one plain forward and backward over every candidate token (groups batched as exact
  batches them, parameter gradients by ordinary autograd, groups not separated);
- baseline: a re-implementation of the reference's method (StigLidu/GradAlign,
  select/parallel/grpo_grad_analyze_parallel.py): one group at a time, its gradient accumulated
  into .grad, a float32 clone of every parameter's gradient, then Python loops over the
  parameters for the norm, the normalisation and the dot product (with the per-module dot
  "distribution" the reference reports). It follows the spec's loss and cosine (the reference
  adds 1e-5 to norms and scales its loss, which changes scores by ~1e-5); no FSDP and no
  gradient checkpointing;
- exact (services.scoring.engine, method exact);
- each approximate method, with its speed-up over exact and its fidelity against exact:
  Spearman correlation over the non-zero-advantage candidates and the overlap of the top
  select-fraction of candidates (the selection the mode would make).
Each is run --repeats times, interleaved; the best time is reported (other jobs share the
machine), with the process's CPU time (less sensitive to other jobs than wall time), groups/s,
response tokens/s and peak memory (CPU: the process's peak resident set size above its size at
the start of the run, after returning freed heap to the OS; CUDA: torch's peak allocation
above the start). Validation gradients are computed once per method beforehand and reported apart.

On a GPU, at a larger size, e.g. Qwen2.5-0.5B's architecture with random weights:
    gradalign bench scoring --preset qwen2.5-0.5b --groups 16 --responses 128 --tokens 512 \
        --device cuda --dtype bfloat16 --max-batch-tokens 65536 --methods project,top-layers

--memory-multiplier M runs exact again on the round and then on M times as many groups, back to
back, and reports both peaks (memory must stay flat). --memory-budget sets the engine's memory budget
(gradalign_common.memory_budget; --max-batch-tokens overrides it by a token count). --sizes 2,4,8 runs,
instead of the comparison above, the scaling study of gradalign_tools.bench.scoring_scaling: floor, exact
and today's path (logits at once, 2048-token batches) at each size, within the budget:
    gradalign bench scoring --preset qwen2.5-0.5b --sizes 2,4,8 --memory-budget 4GiB --threads 2
--replicas N scores the round with N scorer processes (services.scoring.server, --replica-threads torch
threads each) against one such process, and reports the time ratio.

Modules: this one (inputs, the run, the report, the command); scoring_reference (the baseline);
scoring_measure (time and memory of one run); scoring_fidelity (Spearman, top overlap);
scoring_replicas (the --replicas comparison); scoring_scaling (--sizes). Exact and approximate methods are scored through
services.scoring.score_request, as the service and `gradalign score` score them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import typer

from gradalign_common.errors import InvalidInputError
from gradalign_common.modeling import parse_dtype
from gradalign_common.records import RolloutRecord, group_rollouts
from gradalign_common.scoring_methods import parse_method
from gradalign_common.selection import get_mode
from gradalign_common.tiny_model import TinyModelSpec, qwen2_config
from gradalign_tools.bench.scoring_fidelity import fidelity
from gradalign_tools.bench.scoring_measure import Row, measure, synchronize
from gradalign_tools.bench.scoring_reference import ReferenceMethod, response_tokens
from gradalign_tools.bench.scoring_replicas import run_replicas
from gradalign_tools.bench.scoring_scaling import format_scaling, parse_attention, parse_group_counts, run_scaling
from services.scoring.engine import ScoringEngine, parse_device
from gradalign_common.memory_budget import DEFAULT_MEMORY_BUDGET
from services.scoring.score_request import score_request

DEFAULT_APPROXIMATIONS = ("project", "top-layers", "fewer-responses")

PRESETS = {
    # name: (layers, hidden, intermediate, heads, kv heads, vocab)
    "tiny": (4, 256, 768, 4, 2, 2048),
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936),
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 151936),
}


@dataclass
class BenchConfig:
    layers: int = 4  # the random-weight Qwen2's decoder layers
    hidden: int = 256  # its residual width
    intermediate: int = 768  # its MLP width
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key/value heads
    vocab: int = 2048
    groups: int = 64  # candidate problems
    responses: int = 8  # responses per problem
    tokens: int = 80  # tokens per response
    prompt_tokens: int = 24  # tokens per prompt at most
    validation_groups: int = 16  # validation problems
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 1
    threads: int = 0
    mode: str = "sim"
    methods: tuple[str, ...] = DEFAULT_APPROXIMATIONS
    select_fraction: float = 0.25
    memory_multiplier: int = 4
    replicas: int = 0
    replica_threads: int = 1
    max_batch_tokens: Optional[int] = None
    target_batch_tokens: Optional[int] = None
    memory_budget: str = DEFAULT_MEMORY_BUDGET
    sizes: tuple[int, ...] = ()
    todays_sizes: tuple[int, ...] = ()
    attention: tuple[str, ...] = ()
    batch_groups: tuple[int, ...] = ()
    compile: bool = False
    peak_tflops: float = 0.0
    seed: int = 0


# ----------------------------------------------------------------------------- inputs


def build_model(cfg: BenchConfig):
    """The random-weight Qwen2 causal LM of the benchmark (tied embeddings), seeded."""
    import transformers

    spec = TinyModelSpec(
        hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads, num_kv_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate, max_positions=max(512, 2 * (cfg.prompt_tokens + cfg.tokens)),
    )
    torch.manual_seed(cfg.seed)
    return transformers.Qwen2ForCausalLM(qwen2_config(spec, cfg.vocab)).eval()


def make_rollouts(cfg: BenchConfig, n_groups: int, prefix: str, seed: int) -> list[RolloutRecord]:
    """n_groups problems x cfg.responses responses of cfg.tokens random tokens; prompts of cfg.prompt_tokens / 2
    to 3 cfg.prompt_tokens / 2 tokens; rewards 0/1 with a per-problem success rate."""
    rng = random.Random(seed)
    records = []
    for i in range(n_groups):
        prompt = tuple(rng.randrange(cfg.vocab) for _ in range(rng.randint(max(1, cfg.prompt_tokens // 2), max(1, 3 * cfg.prompt_tokens // 2))))
        rate = rng.uniform(0.1, 0.9)
        for _ in range(cfg.responses):
            response = tuple(rng.randrange(cfg.vocab) for _ in range(cfg.tokens))
            records.append(RolloutRecord(f"{prefix}{i:05d}", prompt, response, float(rng.random() < rate)))
    return records


# ----------------------------------------------------------------------------- the benchmark


def run_benchmark(cfg: BenchConfig, echo: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns everything it measured (also what `scoring_command` prints)."""
    device = parse_device(cfg.device)
    dtype = parse_dtype(cfg.dtype)
    mode = get_mode(cfg.mode)
    if not mode.needs_gradients:
        raise InvalidInputError(f"mode {mode.name!r} needs no gradients: nothing to benchmark")
    approximations = [parse_method(m) for m in cfg.methods]
    for spec in approximations:
        if spec.exact:
            raise InvalidInputError(f"--methods lists approximate methods; {spec.name} is exact and always run")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    engine = ScoringEngine(model, device=device, dtype=dtype, memory_budget=cfg.memory_budget,
                           max_batch_tokens=cfg.max_batch_tokens, target_batch_tokens=cfg.target_batch_tokens)
    if not engine.batched:
        raise InvalidInputError(f"the batched path does not support the model: {engine.layout.reason}")
    if cfg.sizes:
        echo(f"model: Qwen2 {cfg.layers} layers, hidden {cfg.hidden}, intermediate {cfg.intermediate}, vocab {cfg.vocab}, "
             f"{engine.n_parameters / 1e6:.2f}M parameters, {cfg.dtype} on {device}, {torch.get_num_threads()} torch threads")
        validation = make_rollouts(cfg, cfg.validation_groups, "v", cfg.seed + 2)
        return {"config": asdict(cfg), "scaling": run_scaling(cfg, engine, validation, cfg.sizes, echo, cfg.todays_sizes,
                                                                  cfg.attention),
                "environment": _environment(device)}
    candidates = make_rollouts(cfg, cfg.groups, "c", cfg.seed + 1)
    validation = make_rollouts(cfg, cfg.validation_groups, "v", cfg.seed + 2)
    if mode.needs_validation:
        val_source = validation
    else:  # align: the candidates are the validation set
        val_source = candidates
    n_tokens = response_tokens(candidates)
    echo(
        f"model: Qwen2 {cfg.layers} layers, hidden {cfg.hidden}, intermediate {cfg.intermediate}, vocab {cfg.vocab}, "
        f"{engine.n_parameters / 1e6:.2f}M parameters, {cfg.dtype} on {device}, {torch.get_num_threads()} torch threads"
    )
    echo(
        f"round: {cfg.groups} groups x {cfg.responses} responses x {cfg.tokens} tokens ({n_tokens} response tokens), "
        f"mode {mode.name}, {cfg.validation_groups} validation groups, {cfg.repeats} repeat(s), best time reported"
    )

    # Validation gradients, once per gradient space, timed apart.
    exact = parse_method("exact")
    validation_seconds: dict[str, float] = {}
    g_v: dict[str, torch.Tensor] = {}
    for spec in [exact, *approximations]:
        if spec.gradient_space not in g_v:
            started = time.perf_counter()
            g_v[spec.gradient_space] = engine.validation_gradient(val_source, method=spec)
            synchronize(device)
            validation_seconds[spec.gradient_space] = time.perf_counter() - started
    reference = ReferenceMethod(engine.model, device)
    started = time.perf_counter()
    reference_g_v = reference.validation_gradient(val_source)
    validation_seconds["baseline"] = time.perf_counter() - started

    def scored(rollouts: list[RolloutRecord], spec) -> list:
        """The rollouts' scores with `spec`, through score_request, from the g_V of its space computed above."""
        return list(score_request(rollouts, mode, engine=lambda: engine, method=spec, seed=cfg.seed,
                                  validation_gradient=lambda _engine, method, _p: g_v[method.gradient_space]))

    rows = {name: Row(name) for name in ["floor", "baseline", "exact", *(s.name for s in approximations)]}
    jobs: list[tuple[str, Callable[[], object]]] = [
        ("floor", lambda: engine.plain_backward(candidates)),
        ("baseline", lambda: reference.score(candidates, reference_g_v, mode.name)),
        ("exact", lambda: scored(candidates, exact)),
    ]
    for spec in approximations:
        jobs.append((spec.name, lambda spec=spec: scored(candidates, spec)))
    # Warm-up (first calls pay one-off costs): each job once on the first two groups, untimed.
    few = [r for g in list(group_rollouts(candidates).values())[:2] for r in g]
    engine.plain_backward(few)
    reference.score(few, reference_g_v, mode.name)
    for spec in [exact, *approximations]:
        scored(few, spec)
    for _ in range(cfg.repeats):
        for name, fn in jobs:
            result = measure(rows[name], device, fn)
            if isinstance(result, list):
                rows[name].scores = result
            echo(f"  {name}: {rows[name].seconds[-1]:.2f} s (cpu {rows[name].cpu_seconds[-1]:.2f} s)")

    memory_check = None
    if cfg.memory_multiplier > 1:
        # Both measured here, back to back, so that the allocator's state is alike for the two.
        more = make_rollouts(cfg, cfg.groups * cfg.memory_multiplier, "m", cfg.seed + 3)
        base, multiplied = Row("exact"), Row(f"exact x{cfg.memory_multiplier} groups")
        measure(base, device, lambda: scored(candidates, exact))
        measure(multiplied, device, lambda: scored(more, exact))
        memory_check = {
            "groups": cfg.groups,
            "groups_multiplied": cfg.groups * cfg.memory_multiplier,
            "exact_peak_mb": base.peak_mb[0],
            "exact_multiplied_peak_mb": multiplied.peak_mb[0],
            "ratio": multiplied.peak_mb[0] / base.peak_mb[0] if base.peak_mb[0] > 0 else float("nan"),
            "seconds": base.seconds[0],
            "seconds_multiplied": multiplied.seconds[0],
        }
        echo(f"  memory check: exact {base.peak_mb[0]:.0f} MB at {cfg.groups} groups, "
             f"{multiplied.peak_mb[0]:.0f} MB at {cfg.groups * cfg.memory_multiplier} groups")

    result = _summarise(cfg, rows, approximations, n_tokens, validation_seconds, memory_check)
    if cfg.replicas > 1:
        result["replicas"] = run_replicas(cfg, model, candidates, validation if mode.needs_validation else None, echo)
    result["environment"] = _environment(device)
    return result


def _environment(device: torch.device) -> dict:
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }


def _summarise(cfg, rows, approximations, n_tokens, validation_seconds, memory_check) -> dict:
    floor, baseline, exact = rows["floor"].best, rows["baseline"].best, rows["exact"].best
    exact_scores = rows["exact"].scores
    baseline_by_id = {s.problem_id: s.score for s in rows["baseline"].scores}
    out_rows = []
    for name, row in rows.items():
        entry = {
            "method": name,
            "seconds": row.best,
            "seconds_all": row.seconds,
            "seconds_median": statistics.median(row.seconds),
            "cpu_seconds": row.best_cpu,
            "cpu_seconds_all": row.cpu_seconds,
            "groups_per_s": cfg.groups / row.best,
            "response_tokens_per_s": n_tokens / row.best,
            "peak_mb": max(row.peak_mb),
            "peak_total_mb": max(row.peak_total_mb),
            "vs_floor": row.best / floor,
            "vs_baseline": row.best / baseline,
            "cpu_vs_floor": row.best_cpu / rows["floor"].best_cpu,
            "cpu_vs_baseline": row.best_cpu / rows["baseline"].best_cpu,
        }
        if name == "exact":
            entry["max_abs_diff_vs_baseline"] = max(abs(s.score - baseline_by_id[s.problem_id]) for s in exact_scores)
        if name not in ("floor", "baseline", "exact"):
            entry["speedup_vs_exact"] = exact / row.best
            entry.update(fidelity(exact_scores, row.scores, cfg.mode, cfg.select_fraction))
        out_rows.append(entry)
    return {
        "config": asdict(cfg),
        "rows": out_rows,
        "validation_gradient_seconds": validation_seconds,
        "memory_check": memory_check,
        "targets": {
            "exact_within_1.15x_floor": rows["exact"].best <= 1.15 * floor,
            "exact_not_slower_than_baseline": exact <= baseline,
            "exact_within_1.15x_floor_cpu_time": rows["exact"].best_cpu <= 1.15 * rows["floor"].best_cpu,
            "exact_equals_baseline_1e-5": out_rows[2]["max_abs_diff_vs_baseline"] <= 1e-5,
            "memory_flat": None if memory_check is None else memory_check["ratio"] <= 1.10,
        },
    }




# ----------------------------------------------------------------------------- printing


def format_table(result: dict) -> str:
    """The rows as a fixed-width table."""
    header = (f"{'method':<22}{'seconds':>9}{'cpu s':>8}{'groups/s':>10}{'resp tok/s':>12}{'peak MB':>10}{'x floor':>9}"
              f"{'x baseline':>11}{'speed-up':>10}{'spearman':>10}{'top overlap':>12}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        speedup = f"{r['speedup_vs_exact']:.2f}x" if "speedup_vs_exact" in r else ""
        rho = f"{r['spearman']:.3f}" if "spearman" in r else ""
        overlap = f"{r['top_overlap']:.3f}" if "top_overlap" in r else ""
        lines.append(
            f"{r['method']:<22}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}{r['groups_per_s']:>10.2f}{r['response_tokens_per_s']:>12.0f}"
            f"{r['peak_mb']:>10.0f}{r['vs_floor']:>9.2f}{r['vs_baseline']:>11.2f}{speedup:>10}{rho:>10}{overlap:>12}"
        )
    exact = next(r for r in result["rows"] if r["method"] == "exact")
    lines.append(f"max |exact - baseline| score difference: {exact['max_abs_diff_vs_baseline']:.2e}")
    lines.append(
        f"cpu-time ratios (robust to other jobs on the machine): exact/floor {exact['cpu_vs_floor']:.2f}, "
        f"exact/baseline {exact['cpu_vs_baseline']:.2f}"
    )
    vs = result["validation_gradient_seconds"]
    lines.append("validation gradient seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in vs.items()))
    m = result.get("memory_check")
    if m:
        lines.append(
            f"memory: exact peak {m['exact_peak_mb']:.0f} MB at {m['groups']} groups, "
            f"{m['exact_multiplied_peak_mb']:.0f} MB at {m['groups_multiplied']} groups (ratio {m['ratio']:.2f}; "
            f"{m['seconds']:.1f} s and {m['seconds_multiplied']:.1f} s)"
        )
    fraction = result["config"]["select_fraction"]
    lines.append(f"fidelity: Spearman over non-zero-advantage candidates; overlap of the top {fraction:g} selected")
    lines.append("targets: " + ", ".join(f"{k}={v}" for k, v in result["targets"].items()))
    return "\n".join(lines)


def scoring_command(
    preset: Optional[str] = typer.Option(None, "--preset", help=f"Model size preset: {', '.join(PRESETS)} (overrides the model flags)."),
    layers: int = typer.Option(4, "--layers", min=1, help="Decoder layers."),
    hidden: int = typer.Option(256, "--hidden", min=8, help="Hidden size."),
    intermediate: int = typer.Option(768, "--intermediate", min=8, help="MLP intermediate size."),
    heads: int = typer.Option(4, "--heads", min=1, help="Attention heads."),
    kv_heads: int = typer.Option(2, "--kv-heads", min=1, help="Key/value heads."),
    vocab: int = typer.Option(2048, "--vocab", min=8, help="Vocabulary size."),
    groups: int = typer.Option(64, "--groups", min=1, help="Candidate groups (problems)."),
    responses: int = typer.Option(8, "--responses", min=1, help="Responses per group."),
    tokens: int = typer.Option(80, "--tokens", min=1, help="Tokens per response."),
    prompt_tokens: int = typer.Option(24, "--prompt-tokens", min=1, help="Mean prompt tokens."),
    validation_groups: int = typer.Option(16, "--validation-groups", min=1, help="Validation groups."),
    mode: str = typer.Option("sim", "--mode", help="Selection mode whose scores are compared."),
    methods: str = typer.Option(",".join(DEFAULT_APPROXIMATIONS), "--methods", help="Approximate methods, comma-separated ('' for none)."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Runs per method (interleaved); the best is reported."),
    threads: int = typer.Option(0, "--threads", min=0, help="Torch threads (0: torch's default)."),
    select_fraction: float = typer.Option(0.25, "--select-fraction", min=0.0, max=1.0, help="Top fraction for overlap (M/k)."),
    memory_multiplier: int = typer.Option(4, "--memory-multiplier", min=0, help="Also run exact on this many times the groups (0/1: skip)."),
    replicas: int = typer.Option(0, "--replicas", min=0, help="Also time the round sharded over N scorer processes vs 1 (0: skip)."),
    replica_threads: int = typer.Option(1, "--replica-threads", min=1, help="Torch threads per scorer process."),
    max_batch_tokens: Optional[int] = typer.Option(
        None, "--max-batch-tokens", min=1,
        help="Override: rows x width of one batched forward (floor and exact alike), instead of the memory budget.",
    ),
    target_batch_tokens: Optional[int] = typer.Option(
        None, "--target-batch-tokens", min=0, help="Rows x width batches are packed to at most (default: 768 MiB of activations on CPU; 0: the budget).",
    ),
    memory_budget: str = typer.Option(
        DEFAULT_MEMORY_BUDGET, "--memory-budget",
        help="Working memory of a scoring pass on top of the model: bytes (4GiB) or a fraction of the device's (0.8).",
    ),
    sizes: str = typer.Option(
        "", "--sizes", help="Group counts (e.g. 2,4,8): run the scaling study (floor, exact, today's path) instead.",
    ),
    todays_sizes: str = typer.Option(
        "", "--todays-sizes", help="Sizes at which the study also runs today's path (default: the smallest).",
    ),
    attention: str = typer.Option(
        "", "--attention", help="With --sizes: also time floor and exact with each attention implementation (e.g. sdpa,eager).",
    ),
    batch_groups: str = typer.Option(
        "", "--batch-groups", help="With --sizes: also time exact at the largest size in batches of each many groups (e.g. 1,2,3).",
    ),
    compile_layers: bool = typer.Option(False, "--compile", help="With --sizes: also time floor and exact with torch.compile'd layers."),
    peak_tflops: float = typer.Option(
        0.0, "--peak-tflops", min=0.0,
        help="With --sizes: the device's dense peak (TFLOP/s, e.g. 989 for an H200 in bf16) for the fraction-of-peak figure.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the model weights and rollouts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write all results as JSON here."),
) -> None:
    """Benchmark exact and approximate scoring against the floor and the reference's method."""
    if preset is not None:
        if preset not in PRESETS:
            typer.echo(f"error: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", err=True)
            raise typer.Exit(2)
        layers, hidden, intermediate, heads, kv_heads, vocab = PRESETS[preset]
    cfg = BenchConfig(
        layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, vocab=vocab,
        groups=groups, responses=responses, tokens=tokens, prompt_tokens=prompt_tokens,
        validation_groups=validation_groups, dtype=dtype, device=device, repeats=repeats, threads=threads,
        mode=mode, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        select_fraction=select_fraction, memory_multiplier=memory_multiplier, replicas=replicas,
        replica_threads=replica_threads, max_batch_tokens=max_batch_tokens, target_batch_tokens=target_batch_tokens,
        memory_budget=memory_budget,
        sizes=parse_group_counts(sizes), todays_sizes=parse_group_counts(todays_sizes, "--todays-sizes"),
        attention=parse_attention(attention), batch_groups=parse_group_counts(batch_groups, "--batch-groups"),
        compile=compile_layers, peak_tflops=peak_tflops, seed=seed,
    )  # fmt: skip
    try:
        result = run_benchmark(cfg, echo=typer.echo)
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_scaling(result["scaling"]) if "scaling" in result else format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=_json_default))
        typer.echo(f"wrote {out}")


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
