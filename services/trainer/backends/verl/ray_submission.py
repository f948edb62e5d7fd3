"""What the `ray` launcher submits for a VerlJob, and under which id.

- The entrypoint is the job's own verl command (services.trainer.backends.verl.command, the one
  the `local` launcher runs), with the Ray cluster's interpreter in place of argv[0], quoted for
  the shell Ray runs it with (shlex). Its paths (dataset, starting checkpoint, verl's checkpoint
  directory, the reward file) are absolute paths on the shared artifact store and in our
  package, which the Ray pods mount and install at the same paths: nothing is uploaded.
- The runtime environment: verl's environment variables (job.env: PYTHONPATH with our package,
  HYDRA_FULL_ERROR, PYTHONUNBUFFERED), then the configured ones; a working_dir only when one is
  configured (else the package is installed in the Ray image).
- The submission id is derived from the request's idempotency key, so a retried request (the
  same key) finds its job again instead of submitting a second one: `gradalign-train-`, the key
  reduced to the characters that are safe in Ray's URLs and log file names ([A-Za-z0-9_-],
  at most 48), and a hash of the whole key (two keys that reduce alike still differ). A key's
  later attempts (after a failed or stopped job: submission ids are never reused) add `-r<N>`.
- The job's metadata records the request id and the request body's fingerprint, so the same
  key with a different body is refused rather than attached to.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path
from typing import Mapping

from services.trainer.backends.verl.job import VerlJob

SUBMISSION_PREFIX = "gradalign-train-"
MAX_KEY_CHARS = 48
REQUEST_ID_KEY = "gradalign_request_id"
FINGERPRINT_KEY = "gradalign_fingerprint"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _digest(request_id: str) -> str:
    return hashlib.sha256(request_id.encode()).hexdigest()[:12]


def submission_id_for(request_id: str, attempt: int = 1) -> str:
    """The Ray submission id of a request's `attempt`-th job (1, 2, ...): deterministic, URL- and file-name-safe."""
    if not request_id:
        raise ValueError("a Ray submission id needs the request's request_id")
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    readable = _UNSAFE.sub("-", request_id).strip("-")[:MAX_KEY_CHARS].strip("-")
    base = f"{SUBMISSION_PREFIX}{readable}-{_digest(request_id)}" if readable else f"{SUBMISSION_PREFIX}{_digest(request_id)}"
    return base if attempt == 1 else f"{base}-r{attempt}"


def ray_work_dir(root: str | Path, name: str, request_id: str, fingerprint: str) -> Path:
    """The scratch directory of a request's Ray runs under root (on the artifact store): the same for every
    retry of the request, so a restarted trainer finds the running job's dataset and checkpoints again; a
    different body under the same key (refused) gets another one, so it cannot touch the job's files. Not
    named like a temporary: the start-up sweep must not remove it under a job that is still running."""
    return Path(root) / f".{name}-verl-ray-{_digest(request_id + chr(0) + fingerprint)}"


def ray_entrypoint(job: VerlJob, python: str) -> str:
    """The shell command Ray runs: job.train_command with `python` as its interpreter."""
    return shlex.join([python, *job.train_command[1:]])


def ray_runtime_env(job: VerlJob, env_vars: Mapping[str, str], working_dir: str | None) -> dict:
    """The job's runtime_env: verl's environment variables, then env_vars; working_dir when given."""
    runtime_env: dict = {"env_vars": {**job.env, **env_vars}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    return runtime_env


def job_metadata(request_id: str, fingerprint: str) -> dict[str, str]:
    """What the job records of the request (Ray's metadata values are strings)."""
    return {REQUEST_ID_KEY: request_id, FINGERPRINT_KEY: fingerprint}
