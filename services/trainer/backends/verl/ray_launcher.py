"""RayLauncher: verl's trainer as a job on a Ray cluster, through Ray's Job Submission API.

The same verl command as the `local` launcher (services.trainer.backends.verl.ray_submission
says what is submitted and under which id) goes to the head's job-submission address
(`JobSubmissionClient(settings.ray_address)`, e.g. KubeRay's head service on port 8265).

- Submit or attach: the request's submission id is looked up first. A job that is pending,
  running, or finished with its actor checkpoint still on disk is attached to (a trainer
  killed mid-run and restarted, a retried call); one that failed or was stopped is followed by
  a new attempt (`-r2`, ...), because a retry after a failure should train again; a job made
  by the same request id with a different request body is refused (RequestConflictError).
  Two trainers racing to submit the same id: Ray accepts one, the other attaches.
- Logs: RayLogFollower (services.trainer.backends.verl.ray_logs) hands the driver's log over
  line by line, from its first line (so an attached run re-reads the steps done so far).
- Cancellation and deadline: `stop_job`, then the status is read until it is terminal
  (Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, 3 s by default), at most
  settings.ray_stop_timeout_s; VerlRunError("cancelled ..."/"timed out ...") follows. A consumer
  that goes away (GeneratorExit) stops the job the same way. A trainer that is killed stops
  nothing: its job keeps running, and the retried request attaches to it.
- A job that ends FAILED, or STOPPED by someone else, raises VerlRunError with Ray's message
  and the log's last lines.
- A head that cannot be reached (for 5 minutes while following), or a stop that Ray does not
  confirm, raises VerlRunDetached: the job may still be running, so the backend keeps its
  scratch directory, and the retried request attaches to the job.
"""

from __future__ import annotations

import collections
import importlib
import queue
import shutil
import time
from pathlib import Path
from typing import Iterator, Mapping

from gradalign_common.errors import RequestConflictError
from gradalign_common.logging_setup import get_logger
from services.trainer.backends.verl.job import VerlJob
from services.trainer.backends.verl.launcher import RunIdentity, VerlRunDetached
from services.trainer.backends.verl.process import ShouldStop, VerlRunError
from services.trainer.backends.verl.ray_logs import RayLogFollower
from services.trainer.backends.verl.ray_submission import (
    FINGERPRINT_KEY,
    job_metadata,
    ray_entrypoint,
    ray_runtime_env,
    ray_work_dir,
    submission_id_for,
)

log = get_logger("gradalign.trainer.verl")

MAX_ATTEMPTS = 100  # new submissions of one request id after failed or stopped jobs
TAIL_LINES = 60
CHECK_EVERY_S = 0.2  # how often should_stop and the deadline are looked at
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_NOTHING_NEW = object()


def _missing_job(exc: Exception) -> bool:
    """Whether a JobSubmissionClient error says that the job does not exist (HTTP 404)."""
    text = str(exc)
    return "status code 404" in text or "does not exist" in text


def _verdict(message: str | None) -> str:
    """Ray's message about a finished job without the log excerpt it appends (ours follows)."""
    first = (message or "").strip().splitlines()[0] if (message or "").strip() else "no message from Ray"
    return first.split(", last available logs")[0]


class RayLauncher:
    """verl's trainer as a Ray job at `address` (see the module docstring)."""

    name = "ray"

    def __init__(
        self,
        address: str,
        python: str = "python3",
        working_dir: str | None = None,
        env_vars: Mapping[str, str] | None = None,
        stop_timeout_s: float = 20.0,
    ):
        try:
            importlib.import_module("ray.job_submission")  # checked at start-up; used per request
        except ImportError as exc:
            raise RuntimeError(
                "GRADALIGN_TRAINER_VERL_LAUNCHER=ray needs Ray's job-submission client in the trainer's "
                f"environment (pip install 'ray[default]'): {exc}"
            ) from None
        self.address = address
        self.python = python
        self.working_dir = working_dir
        self.env_vars = dict(env_vars or {})
        self.stop_timeout_s = stop_timeout_s

    @classmethod
    def from_settings(cls, settings) -> "RayLauncher":
        return cls(
            settings.ray_address,
            python=settings.ray_entrypoint_python,
            working_dir=settings.ray_working_dir,
            env_vars=settings.ray_env_vars,
            stop_timeout_s=settings.ray_stop_timeout_s,
        )

    def work_dir(self, root: Path, name: str, identity: RunIdentity) -> Path:
        return ray_work_dir(Path(root).resolve(), name, identity.request_id, identity.fingerprint)

    def client(self):
        """A JobSubmissionClient for the head (it checks the connection); VerlRunDetached if unreachable."""
        from ray.job_submission import JobSubmissionClient

        try:
            return JobSubmissionClient(self.address)
        except Exception as exc:
            raise VerlRunDetached(f"cannot reach the Ray head at {self.address}: {exc}") from None

    def run_trainer(
        self, job: VerlJob, identity: RunIdentity, should_stop: ShouldStop | None, deadline: float | None
    ) -> Iterator[str]:
        client = self.client()
        submission_id = self.submit_or_attach(client, job, identity)
        yield from self._follow(client, submission_id, should_stop, deadline)

    # --- submission ------------------------------------------------------------------------------

    def _job_info(self, client, submission_id: str):
        """The job's JobDetails, or None if there is no such job."""
        try:
            return client.get_job_info(submission_id)
        except RuntimeError as exc:
            if _missing_job(exc):
                return None
            raise VerlRunDetached(f"cannot read Ray job {submission_id} at {self.address}: {exc}") from None
        except Exception as exc:  # connection errors
            raise VerlRunDetached(f"cannot read Ray job {submission_id} at {self.address}: {exc}") from None

    def _reusable(self, info, job: VerlJob, identity: RunIdentity) -> bool:
        """Whether an existing job of this request is the one to attach to (else: the next attempt)."""
        recorded = (info.metadata or {}).get(FINGERPRINT_KEY)
        if recorded != identity.fingerprint:
            raise RequestConflictError(identity.request_id, f"Ray job {info.submission_id} at {self.address}")
        status = str(info.status)
        return status in ("PENDING", "RUNNING") or (status == "SUCCEEDED" and job.actor_dir.is_dir())

    def submit_or_attach(self, client, job: VerlJob, identity: RunIdentity) -> str:
        """The submission id of this request's job: an existing one to attach to, or a newly submitted one."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            submission_id = submission_id_for(identity.request_id, attempt)
            info = self._job_info(client, submission_id)
            if info is None:
                info = self._submit(client, job, identity, submission_id)
                if info is None:
                    return submission_id
            if self._reusable(info, job, identity):
                log.info("ray_job_attached", submission_id=submission_id, status=str(info.status), address=self.address)
                return submission_id
            log.info("ray_job_not_reused", submission_id=submission_id, status=str(info.status))
        raise VerlRunError(f"request {identity.request_id!r} already has {MAX_ATTEMPTS} Ray jobs; not submitting another")

    def _submit(self, client, job: VerlJob, identity: RunIdentity, submission_id: str):
        """Submit the job; None when submitted, else the JobDetails of the job another trainer submitted first."""
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)  # an earlier attempt's partial checkpoints
        try:
            client.submit_job(
                entrypoint=ray_entrypoint(job, self.python),
                submission_id=submission_id,
                runtime_env=ray_runtime_env(job, self.env_vars, self.working_dir),
                metadata=job_metadata(identity.request_id, identity.fingerprint),
            )
        except Exception as exc:
            raced = self._job_info(client, submission_id)
            if raced is None:
                raise VerlRunError(f"the Ray head at {self.address} refused job {submission_id}: {exc}") from None
            return raced
        log.info("ray_job_submitted", submission_id=submission_id, address=self.address, work_dir=str(job.work_dir))
        return None

    # --- following -------------------------------------------------------------------------------

    def _follow(
        self, client, submission_id: str, should_stop: ShouldStop | None, deadline: float | None
    ) -> Iterator[str]:
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        follower = RayLogFollower(client, submission_id).start()
        next_check = 0.0
        try:
            while True:
                try:
                    line = follower.lines.get(timeout=CHECK_EVERY_S)
                except queue.Empty:
                    line = _NOTHING_NEW
                now = time.monotonic()
                if now >= next_check:  # also while lines keep coming (a chatty log must not delay a cancel)
                    next_check = now + CHECK_EVERY_S
                    if should_stop is not None and should_stop():
                        status = self.stop(client, submission_id)
                        raise self._stopped_error("cancelled", submission_id, status, tail)
                    if deadline is not None and now > deadline:
                        status = self.stop(client, submission_id)
                        raise self._stopped_error("timed out", submission_id, status, tail)
                if line is _NOTHING_NEW:
                    continue
                if line is None:
                    break
                tail.append(line)
                yield line
        except GeneratorExit:  # the consumer went away: the job must not train on for nobody
            self.stop(client, submission_id)
            raise
        finally:
            follower.close()
        if follower.error is not None:
            raise VerlRunDetached(f"lost Ray job {submission_id}: {follower.error}; last output:\n" + "\n".join(tail))
        info = self._job_info(client, submission_id)
        status = str(info.status) if info is not None else "GONE"
        if status != "SUCCEEDED":
            message = _verdict(info.message) if info is not None else "the job vanished from the Ray head"
            raise VerlRunError(f"Ray job {submission_id} {status}: {message}; last output:\n" + "\n".join(tail))
        log.info("ray_job_succeeded", submission_id=submission_id)

    @staticmethod
    def _stopped_error(why: str, submission_id: str, status: str, tail) -> VerlRunError:
        """VerlRunError for a job we stopped; VerlRunDetached if Ray did not confirm the stop."""
        text = f"{why}: Ray job {submission_id} is {status}; last output:\n" + "\n".join(tail)
        return VerlRunError(text) if status in TERMINAL else VerlRunDetached(text)

    def stop(self, client, submission_id: str) -> str:
        """Ask Ray to stop the job and wait (at most stop_timeout_s) for a terminal status; returns the last status seen."""
        started = time.monotonic()
        try:
            client.stop_job(submission_id)
        except Exception as exc:
            log.warning("ray_stop_failed", submission_id=submission_id, error=str(exc)[:300])
        status = "UNKNOWN"
        while time.monotonic() - started < self.stop_timeout_s:
            try:
                current = client.get_job_status(submission_id)
                status = str(current)
                if current.is_terminal():
                    break
            except Exception as exc:
                log.warning("ray_status_unavailable", submission_id=submission_id, error=str(exc)[:300])
            time.sleep(0.2)
        log.info("ray_job_stopped", submission_id=submission_id, status=status, seconds=round(time.monotonic() - started, 2))
        return status
