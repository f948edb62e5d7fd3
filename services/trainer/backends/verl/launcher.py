"""Where verl's trainer runs: the launchers of a prepared VerlJob, behind one interface.

One command builder (services.trainer.backends.verl.command), two launchers:
- `local` (LocalLauncher): `job.train_command` as a subprocess of the trainer service, in its
  own process group (services.trainer.backends.verl.process), on this node's GPUs;
- `ray` (services.trainer.backends.verl.ray_launcher.RayLauncher): the same command as a job
  on a Ray cluster through Ray's Job Submission API, so verl places its workers over
  several nodes.

A launcher runs the trainer command to its end and yields its output lines (verl's console
metrics among them: services.trainer.backends.verl.run reads them); it raises VerlRunError
when the run fails, is cancelled (should_stop) or passes the deadline. It also says where the
run's scratch directory goes: a fresh one per call locally; one derived from the request with
Ray, so that a retried request finds the running job's files again. What follows the trainer
(checking the actor checkpoint, the model merger) is the same for both and runs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from services.trainer.backends.verl.job import VerlJob, new_work_dir
from services.trainer.backends.verl.process import ShouldStop, VerlProcess, VerlRunError

LAUNCHERS = ("local", "ray")


class VerlRunDetached(VerlRunError):
    """The launcher lost track of a run that may still be going (an unreachable Ray head, a stop that
    was not confirmed): its scratch directory is kept for a retry that attaches to it."""


@dataclass(frozen=True)
class RunIdentity:
    """The train request a verl run is for: its idempotency key and its body's fingerprint
    (gradalign_common.request_identity)."""

    request_id: str
    fingerprint: str


class VerlLauncher(Protocol):
    name: str  # settings.verl_launcher

    def work_dir(self, root: Path, name: str, identity: RunIdentity) -> Path:
        """The run's scratch directory under root (not created here)."""

    def run_trainer(
        self, job: VerlJob, identity: RunIdentity, should_stop: ShouldStop | None, deadline: float | None
    ) -> Iterator[str]:
        """Run job.train_command to its end, yielding its output lines (without line ends); raise
        VerlRunError (with the output's last lines) when it fails, once should_stop() is true (after
        stopping it) or once time.monotonic() passes deadline."""


class LocalLauncher:
    """verl's trainer as a subprocess of this service (one node's GPUs)."""

    name = "local"

    def work_dir(self, root: Path, name: str, identity: RunIdentity) -> Path:
        return new_work_dir(root, name)  # a temporary's name: swept at start-up if the trainer is killed

    def run_trainer(
        self, job: VerlJob, identity: RunIdentity, should_stop: ShouldStop | None, deadline: float | None
    ) -> Iterator[str]:
        proc = VerlProcess(job.train_command, job.env, job.work_dir)
        try:
            yield from proc.output(should_stop, deadline)
            code = proc.wait()
        except BaseException:  # including GeneratorExit: the consumer went away
            proc.stop()
            raise
        if code != 0:
            raise VerlRunError(f"verl exited with status {code}; last output:\n" + "\n".join(proc.tail))


def create_launcher(settings) -> VerlLauncher:
    """The launcher settings.verl_launcher names (a TrainerSettings, validated at start-up)."""
    if settings.verl_launcher == "local":
        return LocalLauncher()
    if settings.verl_launcher == "ray":
        from services.trainer.backends.verl.ray_launcher import RayLauncher

        return RayLauncher.from_settings(settings)
    raise ValueError(f"unknown verl launcher {settings.verl_launcher!r}; choose {' or '.join(LAUNCHERS)}")
