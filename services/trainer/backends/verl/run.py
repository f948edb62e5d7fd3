"""Running a prepared VerlJob: verl's trainer through a launcher (services.trainer.backends.verl.launcher:
a local subprocess or a Ray job; its console metrics as StepMetrics), then the model merger, here."""

from __future__ import annotations

import time
from contextlib import closing
from typing import Callable, Iterator, Sequence

from gradalign_common.logging_setup import get_logger
from services.trainer.backends.verl.job import VerlJob
from services.trainer.backends.verl.launcher import LocalLauncher, RunIdentity, VerlLauncher
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
    launcher: VerlLauncher | None = None,
    identity: RunIdentity | None = None,
) -> Iterator[StepMetrics]:
    """Run verl's trainer with `launcher` (default: a local subprocess), yielding each step's metrics as
    its console prints them, then the model merger here.

    On success job.output_dir is a Hugging Face directory. Raises VerlRunError when either
    command fails, verl leaves no actor checkpoint, the deadline passes or should_stop()
    turns true (the launcher then ends the run: the subprocess group, or the Ray job).
    `identity` (the train request) lets the Ray launcher find a retried request's job again.
    """
    launcher = launcher if launcher is not None else LocalLauncher()
    identity = identity if identity is not None else RunIdentity(job.work_dir.name, "")
    deadline = time.monotonic() + timeout_s if timeout_s else None
    log.info("verl_started", launcher=launcher.name, command=" ".join(job.train_command[:3]), work_dir=str(job.work_dir))
    # closing: a consumer that goes away mid-run ends the launcher's run at once (it stops verl)
    with closing(launcher.run_trainer(job, identity, should_stop, deadline)) as output:
        for line in output:
            parsed = parse_console_metrics(line)
            if parsed is None:
                continue
            metrics = step_metrics_from_verl(parsed, config, n_gpus)
            if metrics is not None:
                yield metrics
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
