"""Every mode x seed of a regime: finished runs are reused, the rest run and are written as they finish."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

from gradalign_common.artifacts import atomic_write_bytes
from gradalign_tools.bench.quality.config import RUN_FORMAT, run_hash
from gradalign_tools.bench.quality.report import write_summary
from gradalign_tools.bench.quality.run import run_one
from gradalign_tools.bench.quality.warm_start import warm_model_dir


def run_path(results: Path, mode: str, seed: int) -> Path:
    return results / "runs" / f"{mode}-seed{seed}.json"


def load_run(path: Path, config_hash: str) -> dict | None:
    """A finished run's record when it is complete and made with this config, else None."""
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(run, dict) or run.get("config_hash") != config_hash or run.get("format") != RUN_FORMAT:
        return None
    return run


@dataclass(frozen=True)
class RunScope:
    """Which runs of a regime to do, where warm-start models are cached, and how progress is shown."""

    seeds: Sequence[int] | None = None  # None: the config's seeds
    modes: Sequence[str] | None = None  # None: the config's modes
    model_cache: Path | None = None  # None: <results>/models
    progress: bool = True  # a progress bar over the rounds (stderr)
    echo: Callable[[str], None] = print  # where the run counts are written

    def runs(self, config: dict) -> tuple[list[int], list[str]]:
        """The seeds and modes to run."""
        return list(config["seeds"] if self.seeds is None else self.seeds), list(config["modes"] if self.modes is None else self.modes)

    def cache(self, results: Path) -> Path:
        return self.model_cache or results / "models"


def run_benchmark(config: dict, results: Path, scope: RunScope = RunScope()) -> dict[tuple[str, int], dict]:
    """Run (or load, when already finished) every mode x seed of `scope`; write the summary and the plots."""
    from tqdm import tqdm

    from gradalign_common.modeling import configure_torch_threads

    seeds, modes = scope.runs(config)
    results.mkdir(parents=True, exist_ok=True)
    cache, echo = scope.cache(results), scope.echo
    configure_torch_threads(int(config["threads"]))
    with contextlib.suppress(ImportError):  # one progress bar: not transformers' per checkpoint load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    digest = run_hash(config)
    atomic_write_bytes(results / "config.json", json.dumps(config, indent=1).encode())
    runs: dict[tuple[str, int], dict] = {}
    todo = []
    for seed in seeds:
        for mode in modes:
            run = load_run(run_path(results, mode, seed), digest)
            if run is not None:
                runs[(mode, seed)] = run
            else:
                todo.append((mode, seed))
    rounds = config["loop"]["rounds"]
    echo(
        f"gradalign bench quality: regime {config['name']}, {len(modes)} modes x {len(seeds)} seeds; "
        f"{len(runs)} runs already finished in {results}, {len(todo)} to run"
    )
    bar = tqdm(total=len(todo) * rounds, unit="round", desc=config["name"], disable=not scope.progress, file=sys.stderr)
    with bar:
        for mode, seed in todo:
            bar.set_postfix_str(f"{mode} seed {seed}: warm start")
            model_dir = warm_model_dir(config, seed, cache)

            def on_round(r: int, acc: float, mode=mode, seed=seed) -> None:
                bar.update(1)
                bar.set_postfix_str(f"{mode} seed {seed} round {r}/{rounds} test acc {acc:.3f}")

            run = run_one(config, mode, seed, model_dir, on_round)
            atomic_write_bytes(run_path(results, mode, seed), json.dumps(run, indent=1).encode())
            runs[(mode, seed)] = run
    write_summary(config, results, runs, modes, seeds)
    return runs
