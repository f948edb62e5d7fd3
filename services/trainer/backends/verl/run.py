"""Running a prepared VerlJob: verl's trainer (its console metrics as StepMetrics), then the model merger."""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

from gradalign_common.logging_setup import get_logger
from services.trainer.backends.verl.job import VerlJob
from services.trainer.backends.verl.metrics import parse_console_metrics, step_metrics_from_verl
from services.trainer.backends.verl.process import ShouldStop, VerlProcess, VerlRunError
from services.trainer.grpo import GRPOConfig, StepMetrics

log = get_logger("gradalign.trainer.verl")


def _run_checked(
    argv: Sequence[str],
    job: VerlJob,
    what: str,
    should_stop: ShouldStop | None,
    deadline: float | None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    proc = VerlProcess(argv, job.env, job.work_dir)
    try:
        for line in proc.output(should_stop, deadline):
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    except BaseException:
        proc.stop()
        raise
    if code != 0:
        raise VerlRunError(f"{what} exited with status {code}; last output:\n" + "\n".join(proc.tail))


def iter_verl(
    job: VerlJob,
    config: GRPOConfig,
    n_gpus: int = 1,
    should_stop: ShouldStop | None = None,
    timeout_s: float | None = None,
) -> Iterator[StepMetrics]:
    """Run verl's trainer (yielding each step's metrics as its console prints them), then the merger.

    On success job.output_dir is a Hugging Face directory. Raises VerlRunError when either
    command fails, verl leaves no actor checkpoint, the deadline passes or should_stop()
    turns true (the subprocess group is then terminated).
    """
    deadline = time.monotonic() + timeout_s if timeout_s else None
    log.info("verl_started", command=" ".join(job.train_command[:3]), work_dir=str(job.work_dir))
    proc = VerlProcess(job.train_command, job.env, job.work_dir)
    try:
        for line in proc.output(should_stop, deadline):
            parsed = parse_console_metrics(line)
            if parsed is None:
                continue
            metrics = step_metrics_from_verl(parsed, config, n_gpus)
            if metrics is not None:
                yield metrics
        code = proc.wait()
    except BaseException:  # including GeneratorExit: the consumer went away
        proc.stop()
        raise
    if code != 0:
        raise VerlRunError(f"verl exited with status {code}; last output:\n" + "\n".join(proc.tail))
    if not job.actor_dir.is_dir():
        raise VerlRunError(f"verl finished without an actor checkpoint at {job.actor_dir}")
    _run_checked(job.merge_command, job, "verl model merger", should_stop, deadline)
    if not (job.output_dir / "config.json").is_file():
        raise VerlRunError(f"the model merger wrote no Hugging Face config to {job.output_dir}")
    log.info("verl_finished", output=str(job.output_dir))


def run_verl(
    job: VerlJob,
    config: GRPOConfig,
    n_gpus: int = 1,
    on_step: Callable[[StepMetrics], None] | None = None,
    should_stop: ShouldStop | None = None,
    timeout_s: float | None = None,
) -> list[StepMetrics]:
    """iter_verl to the end; returns the step metrics (on_step is called with each as it arrives)."""
    history = []
    for metrics in iter_verl(job, config, n_gpus, should_stop, timeout_s):
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
    return history
