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
back, and reports both peaks (memory must stay flat). --replicas N scores the round with N scorer processes (services.scoring.server,
--replica-threads torch threads each) against one such process, and reports the time ratio.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import typer

from gradalign_common.errors import InvalidInputError
from gradalign_common.modeling import parse_dtype
from gradalign_common.records import RolloutRecord, ScoreRecord, group_rollouts, write_rollouts, write_rollouts_jsonl
from gradalign_common.advantages import accuracy, grpo_advantages, is_zero_advantage
from gradalign_common.selection import GroupSignals, get_mode, select_top
from services.scoring.engine import ScoringEngine, parse_device
from gradalign_common.scoring_methods import parse_method
from services.scoring.pergroup import DEFAULT_MAX_BATCH_TOKENS

DEFAULT_APPROXIMATIONS = ("project", "top-layers", "fewer-responses")

PRESETS = {
    # name: (layers, hidden, intermediate, heads, kv heads, vocab)
    "tiny": (4, 256, 768, 4, 2, 2048),
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936),
}


@dataclass
class BenchConfig:
    layers: int = 4
    hidden: int = 256
    intermediate: int = 768
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 2048
    groups: int = 64
    responses: int = 8
    tokens: int = 80
    prompt_tokens: int = 24
    validation_groups: int = 16
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
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    seed: int = 0


@dataclass
class Row:
    """One measured method."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    peak_total_mb: list[float] = field(default_factory=list)
    scores: list[ScoreRecord] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu_seconds)


# ----------------------------------------------------------------------------- inputs


def build_model(cfg: BenchConfig):
    """The random-weight Qwen2 causal LM of the benchmark (tied embeddings), seeded."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=max(512, 2 * (cfg.prompt_tokens + cfg.tokens)),
    )
    torch.manual_seed(cfg.seed)
    return transformers.Qwen2ForCausalLM(config).eval()


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


def response_tokens(rollouts: Sequence[RolloutRecord]) -> int:
    return sum(len(r.response_ids) for r in rollouts)


# ----------------------------------------------------------------------------- the reference's method


class ReferenceMethod:
    """The reference's per-group scoring, re-implemented (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, mini_batch_size: int = 32):
        self.model = model
        self.device = device
        self.mini_batch_size = mini_batch_size

    def _accumulate_gradients(self, groups: list[list[RolloutRecord]], advantages: list[list[float]], denominator_of) -> None:
        """model.zero_grad, then forward and backward in mini-batches of responses, gradients into .grad."""
        self.model.zero_grad(set_to_none=True)
        items = [(r, a, denominator_of(gi)) for gi, (g, adv) in enumerate(zip(groups, advantages)) for r, a in zip(g, adv)]
        for start in range(0, len(items), self.mini_batch_size):
            batch = items[start : start + self.mini_batch_size]
            width = max(len(r.prompt_ids) + len(r.response_ids) for r, _, _ in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            response_mask = torch.zeros((len(batch), width), dtype=torch.float64)
            scale = torch.zeros((len(batch), 1), dtype=torch.float64)
            for b, (r, a, d) in enumerate(batch):
                ids = list(r.prompt_ids) + list(r.response_ids)
                input_ids[b, : len(ids)] = torch.tensor(ids)
                attention_mask[b, : len(ids)] = 1
                response_mask[b, len(r.prompt_ids) : len(ids)] = 1.0
                scale[b] = a / d
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            positions = torch.arange(width, device=self.device).expand(len(batch), width)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                use_cache=False).logits
            # compute_log_probs: log-softmax over every position, the next token's log-probability.
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            mask = (response_mask[:, 1:] * scale).to(self.device, log_probs.dtype)
            loss = -(log_probs * mask).sum()
            loss.backward()

    def _gradients(self, normalise: bool) -> tuple[dict[str, torch.Tensor], float]:
        gradients: dict[str, torch.Tensor] = {}
        norm_sq = torch.tensor(0.0, dtype=torch.float32, device=self.device)
        for name, param in self.model.named_parameters():
            if param.grad is not None:
                grad = param.grad.clone().detach().to(torch.float32)
                gradients[name] = grad
                norm_sq += torch.sum(grad**2)
        norm = float(norm_sq.item()) ** 0.5
        if normalise:
            for name in gradients:
                gradients[name] = gradients[name] / norm
        return gradients, norm

    def validation_gradient(self, validation: Sequence[RolloutRecord]) -> dict[str, torch.Tensor]:
        groups = list(group_rollouts(validation).values())
        total = response_tokens(validation)
        self._accumulate_gradients(groups, [grpo_advantages([r.reward for r in g]) for g in groups], lambda _: total)
        return self._gradients(normalise=True)[0]

    def score(self, candidates: Sequence[RolloutRecord], g_v: dict[str, torch.Tensor], mode: str) -> list[ScoreRecord]:
        mode = get_mode(mode)
        out = []
        for pid, group in group_rollouts(candidates).items():
            rewards = [r.reward for r in group]
            advantages = grpo_advantages(rewards)
            zero = is_zero_advantage(advantages)
            cosine = dot = 0.0
            if not zero:
                self._accumulate_gradients([group], [advantages], lambda _: response_tokens(group))
                gradients, norm = self._gradients(normalise=mode.name != "dot")
                total = torch.tensor(0.0, dtype=torch.float32, device=self.device)
                per_module: dict[str, torch.Tensor] = {}
                for name in g_v:
                    dp = torch.sum(g_v[name].flatten() * gradients[name].flatten())
                    total += dp
                    module = name.rsplit(".", 1)[0]
                    per_module[module] = per_module.get(module, 0.0) + dp
                _distribution = {m: float(v.item()) for m, v in per_module.items()}  # noqa: F841 - reported by the reference
                cosine = dot = float(total.item())
                if mode.name == "dot":
                    cosine = dot / norm if norm > 0 else 0.0
                else:
                    dot = cosine * norm
            signals = GroupSignals(accuracy(rewards), zero, cosine=cosine, dot=dot)
            out.append(ScoreRecord(pid, mode.score(signals), accuracy(rewards), len(group), zero))
        self.model.zero_grad(set_to_none=True)
        return out


# ----------------------------------------------------------------------------- measurement


_LIBC = None


def _trim_malloc() -> None:
    """Return freed heap memory to the OS so that the next run's resident-set peak starts clean."""
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block: CUDA peak allocation, or the process's peak RSS (VmHWM reset through
    /proc/self/clear_refs; a sampling thread where that is not allowed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_above_start_mb = 0.0
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _trim_malloc()
        self._start = (_status_kb("VmRSS") or 0) * 1024
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self._sampled = self._start
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, (_status_kb("VmRSS") or 0) * 1024)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = self._sampled
        else:
            peak = (_status_kb("VmHWM") or 0) * 1024
        self.peak_mb = peak / 2**20
        self.peak_above_start_mb = max(0.0, peak - self._start) / 2**20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(row: Row, device: torch.device, fn: Callable[[], object]) -> object:
    """Run fn once, adding its wall time, the process's CPU time and peak memory to row."""
    with PeakMemory(device) as memory:
        _synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        result = fn()
        _synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    row.seconds.append(seconds)
    row.cpu_seconds.append(cpu_seconds)
    row.peak_mb.append(memory.peak_above_start_mb)
    row.peak_total_mb.append(memory.peak_mb)
    return result


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (nan when either side is constant or there are < 2 values)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity(exact: Sequence[ScoreRecord], approximate: Sequence[ScoreRecord], mode: str, fraction: float) -> dict:
    """Spearman over the non-zero-advantage candidates and the overlap of the selected top fraction."""
    by_id = {s.problem_id: s.score for s in approximate}
    live = [s for s in exact if not s.zero_advantage]
    n_select = max(1, round(fraction * len(exact)))
    top_exact = set(select_top(exact, mode, n_select))
    top_approx = set(select_top(approximate, mode, n_select))
    return {
        "spearman": spearman([s.score for s in live], [by_id[s.problem_id] for s in live]),
        "top_overlap": len(top_exact & top_approx) / n_select,
        "n_select": n_select,
    }


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
    engine = ScoringEngine(model, device=device, dtype=dtype, max_batch_tokens=cfg.max_batch_tokens)
    if not engine.batched:
        raise InvalidInputError(f"the batched path does not support the model: {engine.layout.reason}")
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
    validation_seconds: dict[str, float] = {}
    g_v: dict[str, torch.Tensor] = {}
    for spec in [parse_method("exact"), *approximations]:
        if spec.gradient_space not in g_v:
            started = time.perf_counter()
            g_v[spec.gradient_space] = engine.validation_gradient(val_source, method=spec)
            _synchronize(device)
            validation_seconds[spec.gradient_space] = time.perf_counter() - started
    reference = ReferenceMethod(engine.model, device)
    started = time.perf_counter()
    reference_g_v = reference.validation_gradient(val_source)
    validation_seconds["baseline"] = time.perf_counter() - started

    rows = {name: Row(name) for name in ["floor", "baseline", "exact", *(s.name for s in approximations)]}
    jobs: list[tuple[str, Callable[[], object]]] = [
        ("floor", lambda: engine.plain_backward(candidates)),
        ("baseline", lambda: reference.score(candidates, reference_g_v, mode.name)),
        ("exact", lambda: list(engine.score(candidates, mode, validation_gradient=g_v["full"]))),
    ]
    for spec in approximations:
        jobs.append((spec.name, lambda spec=spec: list(
            engine.score(candidates, mode, validation_gradient=g_v[spec.gradient_space], method=spec, seed=cfg.seed))))
    # Warm-up (first calls pay one-off costs): each job once on the first two groups, untimed.
    few = [r for g in list(group_rollouts(candidates).values())[:2] for r in g]
    engine.plain_backward(few)
    reference.score(few, reference_g_v, mode.name)
    for spec in [parse_method("exact"), *approximations]:
        list(engine.score(few, mode, validation_gradient=g_v[spec.gradient_space], method=spec, seed=cfg.seed))
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
        measure(base, device, lambda: list(engine.score(candidates, mode, validation_gradient=g_v["full"])))
        measure(multiplied, device, lambda: list(engine.score(more, mode, validation_gradient=g_v["full"])))
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
    result["environment"] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    return result


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


def run_replicas(
    cfg: BenchConfig, model, candidates: list[RolloutRecord], validation: list[RolloutRecord] | None,
    echo: Callable[[str], None],
) -> dict:
    """The round on one scorer process vs sharded over cfg.replicas processes (cfg.replica_threads each)."""
    from services.scoring.replicas import score_request, score_sharded, start_replicas
    from gradalign_common.pb import scoring_pb2

    n = cfg.replicas
    with tempfile.TemporaryDirectory(prefix="gradalign-bench-") as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "model")
        groups = list(group_rollouts(candidates).values())
        shards = [[r for g in groups[i::n] for r in g] for i in range(n)]
        shard_paths = [str(write_rollouts(root / f"shard-{i}.parquet", s)) for i, s in enumerate(shards)]
        common = dict(checkpoint=str(root / "model"), mode=cfg.mode, dtype=cfg.dtype)
        if validation is not None:
            validation_path = root / "validation.jsonl"
            write_rollouts_jsonl(validation_path, validation)
            common["validation_paths"] = [str(validation_path)]
        else:  # align: every shard uses the whole round's candidates as validation
            validation_path = None
            common["validation_paths"] = shard_paths
        echo(f"replicas: starting {n} scorer processes ({cfg.replica_threads} torch thread(s) each)")
        replicas = start_replicas(n, torch_threads=cfg.replica_threads, device=cfg.device)
        try:
            addresses = [r.address for r in replicas]
            # Warm up: load the model and compute (and cache) g_V on every replica.
            score_sharded(addresses, [[p] for p in shard_paths], **common)

            def one() -> tuple[list[ScoreRecord], float]:
                started = time.perf_counter()
                scores, _ = score_request(addresses[0], scoring_pb2.ScoreRequest(candidate_paths=shard_paths, **common))
                return scores, time.perf_counter() - started

            def touch() -> None:  # a new validation file: g_V is recomputed by every replica
                for p in ([validation_path] if validation_path else [Path(p) for p in shard_paths]):
                    os.utime(p, ns=(time.time_ns(), time.time_ns()))

            single, t_single = one()
            sharded, t_sharded = score_sharded(addresses, [[p] for p in shard_paths], **common)
            touch()
            _, t_single_cold = one()
            touch()
            _, t_sharded_cold = score_sharded(addresses, [[p] for p in shard_paths], **common)
        finally:
            for r in replicas:
                r.stop()
    by_id = {s.problem_id: s.score for s in single}
    result = {
        "replicas": n,
        "threads_per_replica": cfg.replica_threads,
        "one_replica_seconds": t_single,
        "sharded_seconds": t_sharded,
        "ratio": t_sharded / t_single,
        "one_replica_seconds_with_validation_gradient": t_single_cold,
        "sharded_seconds_with_validation_gradient": t_sharded_cold,
        "ratio_with_validation_gradient": t_sharded_cold / t_single_cold,
        "max_abs_diff_sharded_vs_one": max(abs(s.score - by_id[s.problem_id]) for s in sharded),
    }
    echo(
        f"replicas: 1 process {t_single:.2f} s, {n} processes {t_sharded:.2f} s, ratio {result['ratio']:.2f} "
        f"(with g_V recomputed: {t_single_cold:.2f} s vs {t_sharded_cold:.2f} s, ratio "
        f"{result['ratio_with_validation_gradient']:.2f}); max |score diff| {result['max_abs_diff_sharded_vs_one']:.1e}"
    )
    return result


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
    max_batch_tokens: int = typer.Option(
        DEFAULT_MAX_BATCH_TOKENS, "--max-batch-tokens", min=1,
        help="Rows x width of one batched forward (floor and exact alike); raise it on a GPU.",
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
        replica_threads=replica_threads, max_batch_tokens=max_batch_tokens, seed=seed,
    )  # fmt: skip
    try:
        result = run_benchmark(cfg, echo=typer.echo)
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_table(result))
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
