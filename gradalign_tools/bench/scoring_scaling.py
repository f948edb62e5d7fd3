"""`gradalign bench scoring --sizes 2,4,8`: exact's memory and time across round sizes within a memory budget,
against the floor and against today's path, all in one process.

For each size N (N groups of --responses x --tokens, every group with a non-zero advantage):
- floor: one plain forward and backward (ScoringEngine.plain_backward: batched as exact batches them,
  lm_head's logits in chunks; a full gradient besides, so its memory is not within the budget);
- today's floor: the floor as it was before the memory budget: every selected token's logits at once, batches
  of DEFAULT_MAX_BATCH_TOKENS rows x width, autograd's gradients of every parameter formed at once;
- exact: scored through services.scoring.score_request within the budget;
- today's exact: the same engine with the earlier settings (logits at once, 2048-token batches).
Today's two run at the sizes given as todays_sizes (default: the smallest), the others at every size.
Per size it reports seconds, CPU seconds, peak memory above the start (scoring_measure.PeakMemory: the
process's peak resident set on CPU, torch's peak allocation on CUDA), the response tokens in flight (those
of the largest batch) and the memory per response token in flight; and the ratios: exact / floor, today's
floor / floor, exact's peak at the largest size over the smallest, exact's time per response token across
sizes (largest / smallest). On CPU, exact runs once more, untimed, for the peak of what torch holds in
tensors (scoring_measure.peak_tensor_bytes: what the plan governs; the resident set adds the allocator's
slack and libraries' workspaces, and varies by several hundred MB between like runs). The budget and
growth targets are checked on both. Timing uses the best of --repeats runs, interleaved (other jobs share
the machine). With --attention sdpa,eager, floor and exact run again at the smallest size with each
attention implementation (attention_effect), for the effect of PyTorch's SDPA against eager attention.
With --batch-groups 1,2,3, exact runs the largest size again in batches of that many whole groups
(batch_size_effect: time per response token against the batch size, the measurement behind the CPU
target, services.scoring.memory_plan.DEFAULT_CPU_BATCH_ACTIVATION_BYTES). With --compile, floor and exact
run at the smallest size with the decoder layers compiled by torch.compile (compile_effect).
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import replace
from typing import Callable, Iterator, Sequence

import torch

from gradalign_common.records import RolloutRecord
from gradalign_tools.bench.scoring_measure import Row, measure, peak_tensor_bytes, synchronize
from services.scoring.batching import DEFAULT_MAX_BATCH_TOKENS
from services.scoring.engine import ScoringEngine
from services.scoring.groups import groups_of, weighted_responses
from services.scoring.layout import accumulation_dtype, requires_grad_only
from services.scoring.memory_plan import COLLECT, PLAIN
from services.scoring.passes import forward_loss
from services.scoring.score_request import score_request

JOBS = ("floor", "today's floor", "exact", "today's exact")


def mixed_rollouts(cfg, n_groups: int, prefix: str, seed: int) -> list[RolloutRecord]:
    """n_groups problems x cfg.responses responses of cfg.tokens random tokens after a prompt of cfg.prompt_tokens
    random tokens (every group the same shape, so that time and memory per token compare like with like across
    sizes); response 0 right, response 1 wrong, the others at random (no group has zero advantage, so every
    group costs a pass)."""
    rng = random.Random(seed)
    records = []
    for i in range(n_groups):
        prompt = tuple(rng.randrange(cfg.vocab) for _ in range(cfg.prompt_tokens))
        for j in range(cfg.responses):
            response = tuple(rng.randrange(cfg.vocab) for _ in range(cfg.tokens))
            reward = 1.0 if j == 0 else 0.0 if j == 1 else float(rng.random() < 0.5)
            records.append(RolloutRecord(f"{prefix}{i:05d}", prompt, response, reward))
    return records


@contextlib.contextmanager
def todays_settings(engine: ScoringEngine) -> Iterator[None]:
    """The engine as it scored before the memory budget: a batch's logits at once, 2048-token batches."""
    saved = engine.chunked_logits, engine.max_batch_tokens
    engine.chunked_logits, engine.max_batch_tokens = False, DEFAULT_MAX_BATCH_TOKENS
    try:
        yield
    finally:
        engine.chunked_logits, engine.max_batch_tokens = saved


def todays_floor(engine: ScoringEngine, rollouts: Sequence[RolloutRecord]) -> None:
    """The floor as it was: per batch of 2048 tokens, every selected token's logits, autograd's gradient of
    every parameter at once, added into a fresh running sum."""
    layout, params = engine.layout, engine.params
    groups = [g for g in groups_of(rollouts, "candidate") if not g.zero_advantage]
    plan = replace(engine.plan(groups, PLAIN), token_limit=DEFAULT_MAX_BATCH_TOKENS)
    indices = list(range(len(params)))
    for batch in engine.batches(groups, None, plan):
        total = [torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for p in params]
        with requires_grad_only(layout.params, indices):
            loss = forward_loss(layout, batch, layout.embedding(batch.input_ids))
            for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    acc.add_(g)


def tokens_in_flight(engine: ScoringEngine, rollouts: Sequence[RolloutRecord], path: str) -> int:
    """The response tokens of the largest batch the engine's current settings make of the rollouts."""
    return max(sum(len(r.response_ids) for c in chunks for r in c.records) for chunks in _batches(engine, rollouts, path))


def _batches(engine: ScoringEngine, rollouts: Sequence[RolloutRecord], path: str) -> list:
    groups = [g for g in groups_of(rollouts, "candidate") if not g.zero_advantage]
    return list(engine.plan(groups, path).pack(weighted_responses(groups, None)))


def run_scaling(cfg, engine: ScoringEngine, validation: Sequence[RolloutRecord], sizes: Sequence[int],
                echo: Callable[[str], None] = print, todays_sizes: Sequence[int] | None = None,
                attention: Sequence[str] = ()) -> dict:
    """The study of the module docstring (with `attention`, attention_effect at the smallest size; with
    cfg.batch_groups, batch_size_effect at the largest; with cfg.compile, compile_effect last, since it
    compiles the model's layers for good); returns what it measured."""
    todays_sizes = set(todays_sizes or [min(sizes)])
    device = engine.device
    started = time.perf_counter()
    g_v = engine.validation_gradient(validation)
    synchronize(device)
    validation_seconds = time.perf_counter() - started
    echo(f"scaling: memory budget {engine.memory_budget}, sizes {', '.join(map(str, sizes))} groups of "
         f"{cfg.responses} x {cfg.tokens} tokens; validation gradient {validation_seconds:.1f} s")

    def exact(rollouts):
        return list(score_request(rollouts, cfg.mode, engine=lambda: engine, seed=cfg.seed,
                                  validation_gradient=lambda _engine, _method, _p: g_v))

    def todays_exact(rollouts):
        with todays_settings(engine):
            return exact(rollouts)

    warm = mixed_rollouts(cfg, 1, "w", cfg.seed + 99)
    for fn in (engine.plain_backward, lambda r: todays_floor(engine, r), exact, todays_exact):
        fn(warm)  # first calls pay one-off costs
    largest = mixed_rollouts(cfg, max(sizes), "s-", cfg.seed + 10)  # each size: the first n of these groups
    sizes_out = []
    for n in sizes:
        rollouts = largest[: n * cfg.responses]
        tokens = sum(len(r.response_ids) for r in rollouts)
        jobs = {"floor": lambda: engine.plain_backward(rollouts), "today's floor": lambda: todays_floor(engine, rollouts),
                "exact": lambda: exact(rollouts), "today's exact": lambda: todays_exact(rollouts)}
        names = [name for name in JOBS if n in todays_sizes or not name.startswith("today")]
        rows = {name: Row(name) for name in names}
        for _ in range(cfg.repeats):
            for name in names:
                measure(rows[name], device, jobs[name])
                echo(f"  {n} groups, {name}: {rows[name].seconds[-1]:.2f} s, peak {rows[name].peak_mb[-1]:.0f} MB")
        tensor_peak = peak_tensor_bytes(lambda: exact(rollouts))[0] / 2**20 if device.type == "cpu" else None
        in_flight = {"floor": tokens_in_flight(engine, rollouts, COLLECT), "exact": tokens_in_flight(engine, rollouts, COLLECT)}
        with todays_settings(engine):
            in_flight["today's floor"] = tokens_in_flight(engine, rollouts, PLAIN)
            in_flight["today's exact"] = tokens_in_flight(engine, rollouts, COLLECT)
        sizes_out.append({"groups": n, "response_tokens": tokens, "exact_batches": len(_batches(engine, rollouts, COLLECT)),
                          "jobs": {
            name: {"seconds": rows[name].best, "cpu_seconds": rows[name].best_cpu, "peak_mb": max(rows[name].peak_mb),
                   "seconds_per_1k_tokens": 1000 * rows[name].best / tokens,
                   "response_tokens_per_second": tokens / rows[name].best,
                   "model_tflops": 6 * engine.n_parameters * tokens / rows[name].best / 1e12,
                   "cpu_seconds_per_1k_tokens": 1000 * rows[name].best_cpu / tokens, "tokens_in_flight": in_flight[name],
                   "mb_per_token_in_flight": max(rows[name].peak_mb) / in_flight[name]}
            for name in names}, "exact_tensor_peak_mb": tensor_peak})
    result = summarise_scaling(engine, sizes_out, validation_seconds, getattr(cfg, "peak_tflops", 0.0))
    if attention:
        rollouts = largest[: min(sizes) * cfg.responses]
        result["attention"] = attention_effect(engine, rollouts, exact, attention, cfg.repeats, echo)
    if cfg.batch_groups:
        result["batch_size"] = batch_size_effect(engine, largest, cfg.responses, exact, cfg.batch_groups, cfg.repeats, echo)
    if cfg.compile:
        rollouts = largest[: min(sizes) * cfg.responses]
        result["compile"] = compile_effect(engine, rollouts, exact, cfg.repeats, echo)
    return result


def parse_group_counts(text: str, option: str = "--sizes") -> tuple[int, ...]:
    """A comma-separated list of positive group counts (typer.BadParameter, exit 2, otherwise)."""
    import typer

    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{option} takes group counts such as 2,4,8, got {text!r}") from None
    if any(n < 1 for n in counts):
        raise typer.BadParameter(f"{option} takes positive group counts")
    return counts


def batch_size_effect(engine: ScoringEngine, rollouts: Sequence[RolloutRecord], responses: int, exact: Callable,
                      groups_per_batch: Sequence[int], repeats: int, echo: Callable[[str], None] = print) -> dict:
    """Exact on `rollouts` (groups of one shape) in batches of each number of whole groups (max_batch_tokens
    set to that many groups' rows x width), interleaved; seconds and time per 1k response tokens each."""
    width = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    tokens = sum(len(r.response_ids) for r in rollouts)
    saved = engine.max_batch_tokens
    rows = {k: Row(f"{k} groups per batch") for k in groups_per_batch}
    try:
        for _ in range(repeats):
            for k in groups_per_batch:
                engine.max_batch_tokens = k * responses * width
                measure(rows[k], engine.device, lambda: exact(rollouts))
                echo(f"  batches of {k} groups ({k * responses * width} rows x width): {rows[k].seconds[-1]:.2f} s")
    finally:
        engine.max_batch_tokens = saved
    per_token = {k: 1000 * row.best / tokens for k, row in rows.items()}
    return {"groups": len(rollouts) // responses, "group_rows_x_width": responses * width,
            "activation_mb_per_token": engine.cost_model.row_token / 2**20,
            "per_batch": {k: {"seconds": rows[k].best, "seconds_per_1k_tokens": per_token[k], "peak_mb": max(rows[k].peak_mb),
                              "vs_best": per_token[k] / min(per_token.values())} for k in groups_per_batch}}


def compile_effect(engine: ScoringEngine, rollouts: Sequence[RolloutRecord], exact: Callable, repeats: int,
                   echo: Callable[[str], None] = print) -> dict:
    """Floor and exact on `rollouts`, eager, then with every decoder layer compiled (nn.Module.compile, for
    good): the first call's seconds (compiling), then the best of `repeats`; exact's error when it fails."""
    rows = {name: Row(name) for name in ("floor", "exact", "compiled floor", "compiled exact")}
    for _ in range(repeats):
        measure(rows["floor"], engine.device, lambda: engine.plain_backward(rollouts))
        measure(rows["exact"], engine.device, lambda: exact(rollouts))
    for layer in engine.layout.layers or ():
        layer.compile()
    out: dict = {"groups": len({r.problem_id for r in rollouts})}
    started = time.perf_counter()
    engine.plain_backward(rollouts)
    out["first_compiled_floor_seconds"] = time.perf_counter() - started
    for _ in range(repeats):
        measure(rows["compiled floor"], engine.device, lambda: engine.plain_backward(rollouts))
    try:
        exact(rollouts)
        for _ in range(repeats):
            measure(rows["compiled exact"], engine.device, lambda: exact(rollouts))
    except Exception as exc:  # the finding: exact's per-batch hooks under a compiled graph
        out["compiled_exact_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    out.update({name: row.best for name, row in rows.items() if row.seconds})
    out["compiled_floor_vs_floor"] = out["compiled floor"] / out["floor"]
    if "compiled exact" in out:
        out["compiled_exact_vs_exact"] = out["compiled exact"] / out["exact"]
    echo(f"  torch.compile: floor {out['floor']:.2f} s -> {out['compiled floor']:.2f} s "
         f"(first call {out['first_compiled_floor_seconds']:.1f} s)")
    return out


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def parse_attention(text: str) -> tuple[str, ...]:
    """--attention's comma-separated implementations (typer.BadParameter, exit 2, for an unknown one)."""
    import typer

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in ATTENTION_IMPLEMENTATIONS]
    if unknown:
        raise typer.BadParameter(f"--attention takes {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {', '.join(unknown)}")
    return names


def attention_effect(engine: ScoringEngine, rollouts: Sequence[RolloutRecord], exact: Callable, implementations: Sequence[str],
                     repeats: int, echo: Callable[[str], None] = print) -> dict:
    """Floor and exact on `rollouts` with each attention implementation (transformers' `set_attn_implementation`:
    sdpa, eager, ...), the same batches and memory plan; seconds and peak per implementation and job."""
    model = engine.model
    default = model.config._attn_implementation
    out: dict[str, dict] = {}
    try:
        for impl in implementations:
            model.set_attn_implementation(impl)
            engine.plain_backward(rollouts[: len(rollouts) // 2])  # warm the implementation's kernels
            rows = {"floor": Row("floor"), "exact": Row("exact")}
            for _ in range(repeats):
                measure(rows["floor"], engine.device, lambda: engine.plain_backward(rollouts))
                measure(rows["exact"], engine.device, lambda: exact(rollouts))
            out[impl] = {name: {"seconds": row.best, "peak_mb": max(row.peak_mb)} for name, row in rows.items()}
            echo(f"  attention {impl}: floor {out[impl]['floor']['seconds']:.2f} s, exact {out[impl]['exact']['seconds']:.2f} s, "
                 f"peak {out[impl]['exact']['peak_mb']:.0f} MB")
    finally:
        model.set_attn_implementation(default)
    return {"groups": len({r.problem_id for r in rollouts}), "default": default, "implementations": out}


def summarise_scaling(engine: ScoringEngine, sizes: list[dict], validation_seconds: float, peak_tflops: float = 0.0) -> dict:
    """Ratios and targets of the study; with the device's dense peak (`peak_tflops`), each job's estimated
    fraction of it (6 x parameters x response tokens per second: forward and backward, prompts not counted)."""
    for s in sizes:
        for job in s["jobs"].values():
            job["fraction_of_peak"] = job["model_tflops"] / peak_tflops if peak_tflops > 0 else None
    budget_mb = engine.memory_budget.working_bytes(engine.device) / 2**20
    exact = [s["jobs"]["exact"] for s in sizes]
    per_token = [e["seconds_per_1k_tokens"] for e in exact]
    cpu_per_token = [e["cpu_seconds_per_1k_tokens"] for e in exact]
    for s in sizes:
        jobs = s["jobs"]
        s["exact_vs_floor"] = jobs["exact"]["seconds"] / jobs["floor"]["seconds"]
        s["exact_vs_floor_cpu"] = jobs["exact"]["cpu_seconds"] / jobs["floor"]["cpu_seconds"]
        if "today's floor" in jobs:
            s["todays_floor_vs_floor"] = jobs["today's floor"]["seconds"] / jobs["floor"]["seconds"]
            s["todays_floor_vs_floor_cpu"] = jobs["today's floor"]["cpu_seconds"] / jobs["floor"]["cpu_seconds"]
            s["todays_exact_vs_exact"] = jobs["today's exact"]["seconds"] / jobs["exact"]["seconds"]
    growth = exact[-1]["peak_mb"] / exact[0]["peak_mb"] if exact[0]["peak_mb"] > 0 else float("nan")
    # from the first size whose round takes more than one batch: below it, the whole round is one batch
    # smaller than the budget admits, and memory grows with the round until it fills one
    filled = next((i for i, s in enumerate(sizes) if s["exact_batches"] > 1), None)
    growth_filled = (exact[-1]["peak_mb"] / exact[filled]["peak_mb"]
                     if filled is not None and filled < len(sizes) - 1 else None)
    tensors = [s["exact_tensor_peak_mb"] for s in sizes]
    tensor_targets = {}
    if None not in tensors:
        tensor_targets = {"exact_tensor_peak_within_budget": all(t <= budget_mb for t in tensors),
                          "exact_tensor_peak_growth_below_1.2x": tensors[-1] / tensors[0] < 1.2}
    return {
        "budget_mb": budget_mb,
        "validation_gradient_seconds": validation_seconds,
        "sizes": sizes,
        "exact_peak_growth": growth,
        "exact_peak_growth_beyond_one_batch": growth_filled,
        "first_size_beyond_one_batch": None if filled is None else sizes[filled]["groups"],
        "exact_time_per_token_spread": max(per_token) / min(per_token),
        "exact_cpu_time_per_token_spread": max(cpu_per_token) / min(cpu_per_token),
        "exact_tensor_peak_growth": None if None in tensors else tensors[-1] / tensors[0],
        "targets": {
            "exact_peak_within_budget": all(e["peak_mb"] <= budget_mb for e in exact),
            "exact_peak_growth_below_1.2x": growth < 1.2,
            **tensor_targets,
            "exact_time_per_token_within_1.2x": max(per_token) / min(per_token) <= 1.2,
            "exact_within_1.15x_floor": all(s["exact_vs_floor"] <= 1.15 for s in sizes),
        },
    }


def format_scaling(result: dict) -> str:
    """The study as a table and its ratios."""
    header = (f"{'groups':>6}  {'job':<14}{'seconds':>9}{'cpu s':>8}{'s/1k tok':>10}{'peak MB':>10}"
              f"{'tok in flight':>15}{'MB/tok':>8}")
    lines = [f"scaling within a {result['budget_mb']:.0f} MB memory budget (peak: above the start of each run)",
             header, "-" * len(header)]
    for s in result["sizes"]:
        for name, j in s["jobs"].items():
            lines.append(f"{s['groups']:>6}  {name:<14}{j['seconds']:>9.2f}{j['cpu_seconds']:>8.2f}"
                         f"{j['seconds_per_1k_tokens']:>10.2f}{j['peak_mb']:>10.0f}{j['tokens_in_flight']:>15}"
                         f"{j['mb_per_token_in_flight']:>8.2f}")
    for s in result["sizes"]:
        line = f"{s['groups']} groups: exact/floor {s['exact_vs_floor']:.2f} (cpu {s['exact_vs_floor_cpu']:.2f})"
        if "todays_floor_vs_floor" in s:
            line += (f", today's floor/floor {s['todays_floor_vs_floor']:.2f} (cpu {s['todays_floor_vs_floor_cpu']:.2f}), "
                     f"today's exact/exact {s['todays_exact_vs_exact']:.2f}")
        lines.append(line)
    for s in result["sizes"]:
        exact = s["jobs"]["exact"]
        line = (f"{s['groups']} groups: exact {exact['response_tokens_per_second']:,.0f} response tokens/s, "
                f"{exact['model_tflops']:.3g} TFLOP/s by 6 x parameters x tokens")
        if exact["fraction_of_peak"] is not None:
            line += f", {100 * exact['fraction_of_peak']:.1f}% of the device's dense peak"
        lines.append(line)
    tensors = [s["exact_tensor_peak_mb"] for s in result["sizes"]]
    if None not in tensors:
        lines.append("exact, peak of torch's tensors (untimed run): " + ", ".join(
            f"{t:.0f} MB at {s['groups']} groups" for t, s in zip(tensors, result["sizes"]))
            + f" (growth {result['exact_tensor_peak_growth']:.2f}x)")
    lines.append("exact's batches: " + ", ".join(f"{s['exact_batches']} at {s['groups']} groups" for s in result["sizes"]))
    if result["exact_peak_growth_beyond_one_batch"] is not None:
        lines.append(f"exact: peak growth {result['exact_peak_growth_beyond_one_batch']:.2f}x from "
                     f"{result['first_size_beyond_one_batch']} groups (the first size of more than one batch) to the largest")
    lines.append(f"exact: peak growth {result['exact_peak_growth']:.2f}x from the smallest to the largest size, "
                 f"time per response token spread {result['exact_time_per_token_spread']:.2f}x "
                 f"(cpu time {result['exact_cpu_time_per_token_spread']:.2f}x)")
    lines.append("scaling targets: " + ", ".join(f"{k}={v}" for k, v in result["targets"].items()))
    if "batch_size" in result:
        effect = result["batch_size"]
        lines.append(f"exact at {effect['groups']} groups of {effect['group_rows_x_width']} rows x width "
                     f"({effect['activation_mb_per_token']:.2f} MB of activations per token), by groups per batch: " + ", ".join(
                         f"{k}: {v['seconds_per_1k_tokens']:.2f} s per 1k tokens ({v['vs_best']:.2f}x the best)"
                         for k, v in effect["per_batch"].items()))
    if "compile" in result:
        c = result["compile"]
        line = (f"torch.compile at {c['groups']} groups: floor {c['compiled_floor_vs_floor']:.2f}x eager's time "
                f"(compiling: {c['first_compiled_floor_seconds']:.1f} s); exact ")
        line += (f"{c['compiled_exact_vs_exact']:.2f}x eager's" if "compiled_exact_vs_exact" in c
                 else f"fails: {c['compiled_exact_error']}")
        lines.append(line)
    if "attention" in result:
        effect = result["attention"]
        impls = effect["implementations"]
        base = impls.get(effect["default"])
        for impl, jobs in impls.items():
            line = (f"attention {impl} at {effect['groups']} groups: floor {jobs['floor']['seconds']:.2f} s, "
                    f"exact {jobs['exact']['seconds']:.2f} s, exact's peak {jobs['exact']['peak_mb']:.0f} MB")
            if base is not None and impl != effect["default"]:
                line += (f" ({jobs['exact']['seconds'] / base['exact']['seconds']:.2f}x {effect['default']}'s time, "
                         f"{jobs['exact']['peak_mb'] / max(1.0, base['exact']['peak_mb']):.2f}x its peak)")
            lines.append(line)
    return "\n".join(lines)
