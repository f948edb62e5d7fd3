"""`gradalign bench quality-sweep`: many regime variants x modes x seeds in one resumable command.

A sweep manifest (benchmarks/quality/sweep.yaml) names regime configs (the variants, paths relative to the
manifest), the modes, the seeds, the baseline (rand) and optionally the recommended default mode. Every
variant x mode x seed goes through the quality benchmark's own run (quality/run.py `run_one`), its warm-started
model cache (shared by all variants of a model block, `--model-cache`) and its results layout:
<results>/<variant>/runs/<mode>-seed<seed>.json, reused when finished with the same config, so a killed sweep
resumes. Runs go to a pool of `workers` processes (spawned; torch at `threads` threads each): the warm starts
first, then the runs seed by seed, so a sweep cut short has whole seeds. At the end it writes each variant's own
`bench quality` summary (summary.md, plots) and the sweep's summary.json, summary.csv and summary.md
(quality/sweep_report.py: each mode against the baseline, the default against every mode, paired t-test and
sign test).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional, Sequence

import typer
from pydantic import BaseModel, ConfigDict, ValidationError

from gradalign_common.errors import InvalidInputError


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    description: str = ""
    variants: list[str]  # regime config files, relative to the manifest's folder
    modes: list[str]
    seeds: list[int]
    baseline: str = "rand"
    default: Optional[str] = None  # the recommended default mode: compared against every other mode
    workers: int = 2
    threads: int = 1


def load_manifest(path: str | Path) -> dict:
    """The manifest merged over its defaults, each variant's config loaded (load_config) and checked; the
    variants' names must be distinct, the modes registered, the baseline and default among the modes."""
    from gradalign_common.selection import get_mode
    from gradalign_tools.bench.quality.config import load_config, read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path, "manifest", "manifest not found")
    try:
        manifest = Manifest.model_validate(raw).model_dump()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidInputError(f"manifest: {where}: {error['msg']}") from None
    manifest["name"] = manifest["name"] or path.stem
    if not manifest["variants"] or not manifest["modes"] or not manifest["seeds"]:
        raise InvalidInputError("manifest: variants, modes and seeds must be non-empty")
    if any(s < 0 for s in manifest["seeds"]) or len(set(manifest["seeds"])) != len(manifest["seeds"]):
        raise InvalidInputError("manifest: seeds must be distinct integers >= 0")
    for mode in manifest["modes"]:
        get_mode(mode)
    if len(set(manifest["modes"])) != len(manifest["modes"]):
        raise InvalidInputError("manifest: a mode is listed twice")
    if manifest["baseline"] not in manifest["modes"]:
        raise InvalidInputError(f"manifest: the baseline {manifest['baseline']!r} is not among the modes")
    if manifest["default"] is not None and manifest["default"] not in manifest["modes"]:
        raise InvalidInputError(f"manifest: the default {manifest['default']!r} is not among the modes")
    if manifest["workers"] < 1 or manifest["threads"] < 1:
        raise InvalidInputError("manifest: workers and threads must be >= 1")
    configs: dict[str, dict] = {}
    for rel in manifest["variants"]:
        config = load_config(path.parent / rel)
        config["threads"] = manifest["threads"]
        if config["name"] in configs:
            raise InvalidInputError(f"manifest: two variants are named {config['name']!r}")
        configs[config["name"]] = config
    manifest["configs"] = configs
    manifest["variant_names"] = list(configs)
    manifest["path"] = str(path)
    return manifest


def narrow(manifest: dict, *, variants: Sequence[str] | None = None, modes: Sequence[str] | None = None,
           seeds: Sequence[int] | None = None) -> dict:
    """The manifest restricted to some variants, modes or seeds (each must be in the manifest)."""
    out = dict(manifest)
    for key, chosen, known in (("variant_names", variants, manifest["variant_names"]), ("modes", modes, manifest["modes"]),
                               ("seeds", seeds, manifest["seeds"])):
        if chosen is None:
            continue
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise InvalidInputError(f"{', '.join(map(str, unknown))}: not in the manifest's {key.replace('_names', 's')} ({', '.join(map(str, known))})")
        out[key] = [k for k in known if k in chosen]
    if out["baseline"] not in out["modes"]:
        out["baseline"] = manifest["baseline"]
        out["modes"] = list(dict.fromkeys([*out["modes"], manifest["baseline"]]))
    if out["default"] is not None and out["default"] not in out["modes"]:
        out["default"] = None
    out["configs"] = {n: manifest["configs"][n] for n in out["variant_names"]}
    return out


# ---- the work, in worker processes -------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    import contextlib

    from gradalign_common.modeling import configure_torch_threads

    configure_torch_threads(threads)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _warm(config: dict, seed: int, cache: str) -> dict:
    from gradalign_tools.bench.quality.warm_start import warm_model_dir

    started, cpu = time.perf_counter(), time.process_time()
    out = warm_model_dir(config, seed, Path(cache))
    return {"model": str(out), "seconds": round(time.perf_counter() - started, 2), "cpu_seconds": time.process_time() - cpu}


def _run(config: dict, mode: str, seed: int, cache: str, results: str) -> dict:
    from gradalign_common.artifacts import atomic_write_bytes
    from gradalign_tools.bench.quality.benchmark import run_path
    from gradalign_tools.bench.quality.run import run_one
    from gradalign_tools.bench.quality.warm_start import warm_model_dir

    cpu = time.process_time()
    model_dir = warm_model_dir(config, seed, Path(cache))
    run = run_one(config, mode, seed, model_dir)
    atomic_write_bytes(run_path(Path(results), mode, seed), json.dumps(run, indent=1).encode())
    return {"final": run["accuracy"][-1], "seconds": run["wall_seconds"], "cpu_seconds": time.process_time() - cpu}


def _call(task: tuple) -> dict:
    kind, args = task[0], task[1:]
    return _warm(*args) if kind == "warm" else _run(*args)


def _block_key(config: dict) -> str:
    from gradalign_tools.bench.quality.config import digest

    return digest({"model": config["model"], "warm_start": config["warm_start"]})


def _model_ready(config: dict, seed: int, cache: Path) -> bool:
    """Whether warm_start.warm_model_dir would find this model built (the same key as there)."""
    from gradalign_tools.bench.quality.config import digest
    from gradalign_tools.bench.task_families import TEST_RESERVE, VAL_RESERVE

    key = digest({"model": config["model"], "warm_start": config["warm_start"], "reserves": [TEST_RESERVE, VAL_RESERVE]})
    return (cache / f"tiny-{key}-seed{seed}" / "warm_start.json").is_file()


def plan(manifest: dict, results: Path, cache: Path) -> tuple[list[tuple], dict[str, dict], int]:
    """(tasks to run: the missing warm starts' and runs', warm starts first then runs seed by seed; finished runs
    by variant; how many runs were already finished)."""
    from gradalign_tools.bench.quality.benchmark import load_run, run_path
    from gradalign_tools.bench.quality.config import run_hash

    finished: dict[str, dict] = {name: {} for name in manifest["variant_names"]}
    warm: dict[tuple[str, int], tuple] = {}
    runs: list[tuple] = []
    done = 0
    for seed in manifest["seeds"]:
        for name in manifest["variant_names"]:
            config = manifest["configs"][name]
            digest = run_hash(config)
            for mode in manifest["modes"]:
                path = run_path(results / name, mode, seed)
                run = load_run(path, digest)
                if run is not None:
                    finished[name][(mode, seed)] = run
                    done += 1
                    continue
                if not _model_ready(config, seed, cache):
                    warm.setdefault((_block_key(config), seed), ("warm", config, seed, str(cache)))
                runs.append(("run", config, mode, seed, str(cache), str(results / name)))
    return [*warm.values(), *runs], finished, done


def _describe(task: tuple) -> str:
    if task[0] == "warm":
        return f"warm start seed {task[2]} ({task[1]['name']}'s model block)"
    return f"{task[1]['name']} {task[2]} seed {task[3]}"


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def run_sweep(manifest: dict, results: Path, *, model_cache: Path | None = None, workers: int | None = None,
              echo=print, command: str | None = None, report_only: bool = False) -> dict:
    """Run every missing warm start and run of the manifest (a pool of worker processes), then write the variants'
    summaries and the sweep's summary.json, summary.csv and summary.md; returns the summary. Failed tasks are
    reported and left out (a rerun retries them)."""
    from gradalign_common.artifacts import atomic_write_bytes
    from gradalign_tools.bench.quality.benchmark import load_run, run_path
    from gradalign_tools.bench.quality.config import run_hash
    from gradalign_tools.bench.quality.sweep_report import CSV_COLUMNS, csv_rows, markdown, sweep_summary

    results.mkdir(parents=True, exist_ok=True)
    cache = model_cache or results / "models"
    workers = workers or manifest["workers"]
    for name in manifest["variant_names"]:
        (results / name / "runs").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(results / name / "config.json", json.dumps(manifest["configs"][name], indent=1).encode())
    tasks, _, done = plan(manifest, results, cache)
    if report_only:  # the summary of what is finished; nothing runs
        echo(f"--report-only: {len(tasks)} missing tasks not run")
        tasks = []
    n_runs = sum(t[0] == "run" for t in tasks)
    echo(
        f"gradalign bench quality-sweep: {manifest['name']}, {len(manifest['variant_names'])} variants x "
        f"{len(manifest['modes'])} modes x {len(manifest['seeds'])} seeds; {done} runs already finished in {results}, "
        f"{n_runs} to run and {len(tasks) - n_runs} warm starts to build, on {workers} worker processes"
    )
    started = time.perf_counter()
    failures: list[str] = []
    cpu_seconds = 0.0
    if tasks:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                 initargs=(manifest["threads"],)) as pool:
            pending = {pool.submit(_call, task): task for task in tasks}
            count = 0
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = pending.pop(future)
                    count += 1
                    elapsed = time.perf_counter() - started
                    try:
                        out = future.result()
                    except Exception as exc:  # noqa: BLE001 - one broken task must not lose the others
                        failures.append(f"{_describe(task)}: {type(exc).__name__}: {exc}")
                        echo(f"[{count}/{len(tasks)}] {_describe(task)}: FAILED ({type(exc).__name__}: {exc})")
                        continue
                    cpu_seconds += out.get("cpu_seconds", 0.0)
                    what = (f"final test accuracy {100 * out['final']:.1f}%, {out['seconds']:.0f} s" if task[0] == "run"
                            else f"{out['seconds']:.0f} s")
                    eta = elapsed / count * (len(tasks) - count)
                    echo(f"[{count}/{len(tasks)}] {_describe(task)}: {what}; elapsed {_clock(elapsed)}, about {_clock(eta)} left")
                    sys.stdout.flush()
    runs_by_variant: dict[str, dict] = {}
    for name in manifest["variant_names"]:
        config = manifest["configs"][name]
        digest = run_hash(config)
        runs = {}
        for seed in manifest["seeds"]:
            for mode in manifest["modes"]:
                run = load_run(run_path(results / name, mode, seed), digest)
                if run is not None:
                    runs[(mode, seed)] = run
        runs_by_variant[name] = runs
        if runs:
            try:  # the variant's own `bench quality` report (tables and plots)
                from gradalign_tools.bench.quality.report import write_summary

                write_summary(config, results / name, runs, manifest["modes"], manifest["seeds"])
            except Exception as exc:  # noqa: BLE001 - the sweep's own summary does not depend on it
                echo(f"warning: {name}: the variant's summary.md was not written ({type(exc).__name__}: {exc})")
    summary = sweep_summary(manifest, runs_by_variant)
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["workers"] = workers
    # CPU time of this invocation's tasks (warm starts and runs, not the workers' start-up): divided by the
    # workers, about what the wall time would be on that many otherwise idle cores
    summary["task_cpu_seconds"] = round(cpu_seconds, 1)
    summary["tasks_run"] = len(tasks)
    summary["failures"] = failures
    summary["manifest"] = manifest["path"]
    atomic_write_bytes(results / "summary.json", json.dumps(summary, indent=1).encode())
    atomic_write_bytes(results / "summary.md", markdown(summary, command).encode())
    atomic_write_bytes(results / "summary.csv", _csv(CSV_COLUMNS, csv_rows(summary)))
    return summary


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> bytes:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


# ---- the command line -----------------------------------------------------------------------------------


def quality_sweep_command(
    manifest_path: Path = typer.Option(..., "--manifest", help="sweep manifest (YAML), e.g. benchmarks/quality/sweep.yaml"),
    results: Path = typer.Option(..., "--results", help="results folder: <variant>/runs/, summary.{md,json,csv}"),
    model_cache: Optional[Path] = typer.Option(None, "--model-cache", help="warm-started model cache (default: <results>/models); share it with `bench quality`"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="worker processes (default: the manifest's)"),
    variants: Optional[str] = typer.Option(None, "--variants", help="comma-separated variant names (default: all)"),
    modes: Optional[str] = typer.Option(None, "--modes", help="comma-separated modes (default: the manifest's; the baseline is always kept)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds (default: the manifest's)"),
    report_only: bool = typer.Option(False, "--report-only", help="run nothing: write the summaries of the finished runs"),
) -> None:
    """Selection-quality sweep: every variant x mode x seed of a manifest through `bench quality`'s runs, on a pool
    of worker processes; resumable; writes each mode against rand and the default against every mode, paired by seed,
    with a paired t-test and a sign test (summary.md, summary.json, summary.csv)."""
    from gradalign_tools.bench.quality.command import _parse_list

    try:
        manifest = narrow(load_manifest(manifest_path), variants=_parse_list(variants, str, "--variants"),
                          modes=_parse_list(modes, str, "--modes"), seeds=_parse_list(seeds, int, "--seeds"))
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    command = f"gradalign bench quality-sweep --manifest {manifest_path} --results {results}" + "".join(
        f" {flag} {value}" for flag, value in (("--model-cache", model_cache), ("--workers", workers), ("--variants", variants),
                                               ("--modes", modes), ("--seeds", seeds)) if value is not None
    )
    summary = run_sweep(manifest, results, model_cache=model_cache, workers=workers, echo=typer.echo, command=command,
                        report_only=report_only)
    typer.echo((results / "summary.md").read_text())
    typer.echo(f"wrote {results / 'summary.md'}, {results / 'summary.json'}, {results / 'summary.csv'} "
               f"in {_clock(summary['wall_seconds'])} on {summary['workers']} workers ({summary['tasks_run']} tasks, "
               f"{summary['task_cpu_seconds']:.0f} CPU s: {_clock(summary['task_cpu_seconds'] / summary['workers'])} "
               f"per worker on idle cores)")
    if summary["failures"]:
        typer.echo(f"{len(summary['failures'])} tasks failed (rerun to retry):\n  " + "\n  ".join(summary["failures"]), err=True)
        raise typer.Exit(1)
