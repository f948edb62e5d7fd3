"""The orchestrator: drives each experiment as a durable state machine over the stage table.

The round's stages are services.scheduler.stages.STAGES, run in order. Every transition is
committed before the next request goes out; a stage's results and its "succeeded" mark are
committed in one transaction, so a scheduler killed at any moment repeats at most the stage
that was in flight, and the workers' idempotency (same request id and body, same output
path, atomic writes) makes the repeat harmless. Request ids and artifact paths are keyed by
the experiment's never-reused uid, so no experiment meets another's outputs.

A worker that is unreachable is retried with exponential backoff up to a cap; the
experiment's status_detail names the service meanwhile. A worker at capacity
(RESOURCE_EXHAUSTED) is retried without counting an attempt. A worker that rejects a
request fails the experiment with the worker's message.

Experiments advance side by side: each active experiment is driven by its own thread (up to
max_parallel_experiments), so a stage of one never waits for a stage of another unless both
need the same worker replica. Worker capacity is explicit (services.scheduler.capacity): a
request takes a slot of its replica before it is sent, and requests beyond capacity queue here,
shared fairly between experiments by priority; each stage records how long it queued.

Two timers run beside the drivers: leases are renewed every third of their TTL, independent
of worker progress (a long model load cannot let another replica take an experiment
mid-stage); and every `cancel_poll_s` the experiments being driven are checked, so one that
was cancelled or deleted (by any replica's API), or whose lease was lost, has its in-flight
worker calls cancelled: the workers stop between batches or steps and free their capacity.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.checkpoint_retention import prune_checkpoints
from gradalign_common.datasets import load_problems
from gradalign_common.errors import InvalidInputError
from gradalign_common.logging_setup import get_logger
from gradalign_common.records import Problem
from services.scheduler.capacity import SlotWaitCancelled, WorkerCapacity
from services.scheduler.db import Experiment, Round, Stage, utcnow
from services.scheduler.discovery import make_discovery
from services.scheduler.events import EventBus
from services.scheduler.experiments import remove_experiment_artifacts
from services.scheduler.leases import make_lease
from services.scheduler.progress import ProgressFn, StageProgress
from services.scheduler.public_errors import public_message
from services.scheduler.settings import SchedulerSettings
from services.scheduler.spec import StoredSpec
from services.scheduler.stages import STAGES, RoundResults, StageRuntime, result_to_json
from services.scheduler.status import ACTIVE, STAGE_DONE, ExperimentStatus, RoundStatus, StageStatus
from services.scheduler.workers import CallCancelled, CallScope, WorkerBusy, WorkerRejected, WorkerUnavailable

log = get_logger("gradalign.orchestrator")
STAGE_SECONDS = Histogram("gradalign_stage_seconds", "Wall time of a stage", ["stage"])
STAGE_RETRIES = Counter("gradalign_stage_retries_total", "Stage attempts that found a worker unavailable", ["stage", "service"])
STAGE_CANCELLED = Counter("gradalign_stage_cancelled_total", "Stages whose worker calls were cancelled mid-flight", ["stage"])
ROUND_OVERHEAD = Gauge("gradalign_round_overhead_seconds", "Fixed overhead of the last finished round", ["experiment"])


class Orchestrator:
    def __init__(self, settings: SchedulerSettings, sessions: sessionmaker, bus: EventBus):
        self.settings = settings
        self.sessions = sessions
        self.bus = bus
        self.store = ArtifactStore(settings.artifact_root)
        self.worker_deadline_s = settings.worker_deadline_s
        self.owner = settings.lease_owner()
        self.lease = make_lease(settings.redis_url, sessions, self.owner, settings.lease_ttl_s)
        self.discovery = make_discovery(settings)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._not_before: dict[int, float] = {}
        self._dataset_cache: dict[str, dict[str, Problem]] = {}
        self._progress = StageProgress(sessions, self.publish)
        self.capacity = WorkerCapacity(
            {"rollout": settings.rollout_slots, "scoring": settings.scoring_slots, "trainer": settings.trainer_slots}
        )
        self._drivers = ThreadPoolExecutor(max_workers=settings.max_parallel_experiments, thread_name_prefix="experiment")
        self._inflight: dict[int, CallScope] = {}  # experiments a driver thread is advancing -> their live worker calls
        self._uids: dict[int, str] = {}  # experiment id -> the uid its driver works for (SQLite reuses ids)
        self._lost: set[int] = set()  # experiments whose lease could not be renewed: their drivers stop
        self._inflight_lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self.run_forever, "orchestrator"), (self._renew_leases, "lease-renewer"), (self._watch_cancellations, "cancel-watcher")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._drivers.shutdown(wait=False, cancel_futures=True)

    def _renew_leases(self) -> None:
        """Renew the lease of every experiment being driven, every third of the TTL, whatever the workers do."""
        period = self.settings.lease_ttl_s / 3
        while not self._stop.wait(period):
            for exp_id in self._driven():
                try:
                    renewed = self.lease.renew(exp_id)
                except Exception:  # noqa: BLE001 - a lease store hiccup: try again next period
                    log.warning("lease_renew_failed", experiment=exp_id)
                    continue
                if not renewed:
                    log.warning("lease_lost", experiment=exp_id, owner=self.owner)
                    with self._inflight_lock:
                        self._lost.add(exp_id)
                    self._cancel_calls(exp_id, "the lease was lost to another scheduler replica")

    def _watch_cancellations(self) -> None:
        """Cancel the in-flight worker calls of driven experiments that were cancelled, deleted or replaced."""
        while not self._stop.wait(self.settings.cancel_poll_s):
            driven = self._driven()
            if not driven:
                continue
            try:
                with self.sessions() as s:
                    rows = dict(s.execute(select(Experiment.id, Experiment.uid).where(
                        Experiment.id.in_(driven), Experiment.status.in_(ACTIVE)
                    )).all())
            except Exception:  # noqa: BLE001 - a database hiccup: look again next period
                log.warning("cancel_watch_failed")
                continue
            for exp_id in driven:
                if rows.get(exp_id) != self._uids.get(exp_id):
                    self._cancel_calls(exp_id, "the experiment was cancelled or deleted")

    def _driven(self) -> list[int]:
        with self._inflight_lock:
            return list(self._inflight)

    def _cancel_calls(self, exp_id: int, reason: str) -> None:
        with self._inflight_lock:
            scope = self._inflight.get(exp_id)
        if scope is not None and not scope.cancelled:
            log.info("worker_calls_cancelled", experiment=exp_id, reason=reason)
            scope.cancel(reason)

    def run_forever(self) -> None:
        log.info("orchestrator_started", owner=self.owner)
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # noqa: BLE001 - the loop must survive anything one experiment does
                log.exception("orchestrator_iteration_failed")
                worked = False
            if not worked:
                self._stop.wait(self.settings.poll_interval_s)

    def run_once(self) -> bool:
        """Give every runnable experiment that has none a driver thread; True when one was started."""
        with self.sessions() as s:
            rows = s.execute(select(Experiment.id, Experiment.uid).where(Experiment.status.in_(ACTIVE)).order_by(Experiment.id)).all()
        started = False
        now = time.monotonic()
        for exp_id, uid in rows:
            if self._stop.is_set():
                break
            with self._inflight_lock:
                if exp_id in self._inflight:
                    continue
                if len(self._inflight) >= self.settings.max_parallel_experiments:
                    break
            if self._not_before.get(exp_id, 0) > now or not self.lease.acquire(exp_id):
                continue
            with self._inflight_lock:
                self._inflight[exp_id] = CallScope()
                self._uids[exp_id] = uid
                self._lost.discard(exp_id)
            self._drivers.submit(self._drive, exp_id)
            started = True
        return started

    def _drive(self, exp_id: int) -> None:
        """Advance one experiment stage by stage until it ends, backs off, or its lease is lost."""
        try:
            while not self._stop.is_set() and exp_id not in self._lost:
                if not self.step(exp_id) or self._not_before.get(exp_id, 0) > time.monotonic():
                    break
        except Exception:  # noqa: BLE001 - the driver must hand the experiment back whatever happens
            log.exception("experiment_driver_failed", experiment=exp_id)
        finally:
            with self._inflight_lock:
                self._inflight.pop(exp_id, None)
                self._lost.discard(exp_id)
            self._forget_if_ended(exp_id)

    def _forget_if_ended(self, exp_id: int) -> None:
        """An experiment that ended leaves the fair-share accounts and the caches. One deleted while a call was
        in flight loses the artifacts a worker may have written after the delete removed its directory."""
        uid = self._uids.get(exp_id)
        with self.sessions() as s:
            row = s.execute(select(Experiment.uid, Experiment.status).where(Experiment.id == exp_id)).first()
        if row is not None and row.status in ACTIVE and row.uid == uid:
            return
        self.capacity.forget(exp_id)
        self._uids.pop(exp_id, None)
        self._not_before.pop(exp_id, None)
        if uid is not None and (row is None or row.uid != uid):
            remove_experiment_artifacts(self.store, uid)

    def release_all(self) -> None:
        self.lease.release_all()

    # ---- the state machine -----------------------------------------------------------------
    def step(self, exp_id: int) -> bool:
        """Run the experiment's next stage (or close its round); True when progress was made."""
        with self.sessions() as s:
            exp = s.get(Experiment, exp_id)
            if exp is None or exp.status not in ACTIVE or exp.uid != self._uids.get(exp_id, exp.uid):
                return False
            try:
                spec = StoredSpec.model_validate(exp.config)
            except ValueError as exc:  # a stored spec this version cannot read: fail it, do not loop on it
                exp.status, exp.error, exp.finished_at = ExperimentStatus.FAILED, f"stored spec is invalid: {exc}", utcnow()
                s.commit()
                self.lease.release(exp_id)
                return False
            if exp.status == ExperimentStatus.PENDING:
                exp.status, exp.started_at = ExperimentStatus.RUNNING, utcnow()
            rnd = self._current_round(s, exp)
            stage = next((st for st in rnd.stages if st.status not in STAGE_DONE), None)
            if stage is None:
                self._finish_round(s, exp, rnd)
                s.commit()
                if exp.status == ExperimentStatus.COMPLETED:
                    self.lease.release(exp_id)
                self.publish(exp_id, "round_finished", round=rnd.index, status=exp.status)
                return True
            stage.status, stage.attempts, stage.started_at = StageStatus.RUNNING, stage.attempts + 1, utcnow()
            stage.error = None
            exp.current_stage = stage.name
            exp.status_detail = None  # a retry's "waiting for ..." described the attempt before this one
            rt = StageRuntime(
                experiment_id=exp.id, uid=exp.uid, spec=spec,
                round_index=rnd.index, round_id=rnd.id, stage_id=stage.id, checkpoint_in=rnd.checkpoint_in,
                previous=RoundResults.from_rows({st.name: st.result or {} for st in rnd.stages if st.status == StageStatus.SUCCEEDED}),
                platform=self,
            )
            stage_name, attempt = stage.name, stage.attempts
            s.commit()
        self.publish(exp_id, "stage_started", round=rt.round_index, stage=stage_name, attempt=attempt)
        log.info("stage_started", experiment=exp_id, round=rt.round_index, stage=stage_name, attempt=attempt)
        started = time.perf_counter()
        try:
            outcome = STAGES[stage_name].run(rt)
        except SlotWaitCancelled:
            self._requeue(rt, attempt)
            return False
        except CallCancelled as exc:
            STAGE_CANCELLED.labels(stage_name).inc()
            log.info("stage_cancelled", experiment=exp_id, stage=stage_name, reason=str(exc))
            self._requeue(rt, attempt)
            return False
        except WorkerBusy as exc:
            self._stage_busy(rt, stage_name, attempt, exc)
            return True
        except WorkerUnavailable as exc:
            self._stage_unavailable(rt, stage_name, attempt, exc)
            return True
        except (WorkerRejected, InvalidInputError) as exc:
            self._fail(rt, stage_name, str(exc))
            return True
        except Exception as exc:  # noqa: BLE001 - a bug in one stage fails that experiment, not the scheduler
            log.exception("stage_crashed", experiment=exp_id, stage=stage_name)
            self._fail(rt, stage_name, f"{type(exc).__name__}: {exc}")
            return True
        wall = time.perf_counter() - started
        STAGE_SECONDS.labels(stage_name).observe(wall)
        self._not_before.pop(exp_id, None)
        with self.sessions() as s:
            st = s.get(Stage, rt.stage_id)
            exp = s.get(Experiment, exp_id)
            if st is None or exp is None:  # deleted while the stage ran
                return False
            st.status, st.finished_at, st.compute_seconds = StageStatus.SUCCEEDED, utcnow(), outcome.compute_seconds
            st.result = result_to_json(outcome.result)
            st.queued_seconds = max(rt.queued, default=0.0)
            exp.status_detail = None
            s.commit()
        self.publish(exp_id, "stage_finished", round=rt.round_index, stage=stage_name, seconds=round(wall, 3))
        return True

    def _current_round(self, s: Session, exp: Experiment) -> Round:
        rnd = s.scalar(select(Round).where(Round.experiment_id == exp.id, Round.index == exp.current_round))
        if rnd is None:
            rnd = Round(experiment_id=exp.id, index=exp.current_round, status=RoundStatus.RUNNING, checkpoint_in=exp.checkpoint)
            rnd.stages = [Stage(name=name, status=StageStatus.PENDING) for name in STAGES]
            s.add(rnd)
            s.flush()
        return rnd

    def _finish_round(self, s: Session, exp: Experiment, rnd: Round) -> None:
        rnd.status, rnd.finished_at = RoundStatus.COMPLETED, utcnow()
        rnd.compute_seconds = sum(st.compute_seconds for st in rnd.stages)
        wall = (_aware(rnd.finished_at) - _aware(rnd.started_at)).total_seconds()
        rnd.overhead_seconds = max(0.0, wall - rnd.compute_seconds)
        ROUND_OVERHEAD.labels(str(exp.id)).set(rnd.overhead_seconds)
        exp.checkpoint = rnd.checkpoint_out or exp.checkpoint
        spec = StoredSpec.model_validate(exp.config)
        self._prune_checkpoints(s, exp, spec)
        exp.current_round = rnd.index + 1
        exp.current_stage = None
        if exp.current_round >= spec.num_selections:
            exp.status, exp.finished_at = ExperimentStatus.COMPLETED, utcnow()

    def _prune_checkpoints(self, s: Session, exp: Experiment, spec: StoredSpec) -> None:
        """Apply the experiment's checkpoint retention; round r's checkpoint is judged by round r+1's validation reward."""
        if not spec.keep_last_checkpoints:
            return
        rewards = {
            r.index - 1: r.validation_reward
            for r in s.scalars(select(Round).where(Round.experiment_id == exp.id))
            if r.index > 0
        }
        deleted = prune_checkpoints(
            self.store.experiment_dir(exp.uid) / "checkpoints",
            rewards,
            keep_last=spec.keep_last_checkpoints,
            keep_best=spec.keep_best_checkpoints,
            in_use=[exp.checkpoint],
        )
        if deleted:
            log.info("checkpoints_pruned", experiment=exp.id, deleted=[str(p) for p in deleted])

    def _requeue(self, rt: StageRuntime, attempt: int) -> None:
        """A stage that stopped (waiting for a slot, or with its calls cancelled: the experiment was cancelled,
        the scheduler stops, the lease was lost) goes back to pending without counting as an attempt."""
        with self.sessions() as s:
            st = s.get(Stage, rt.stage_id)
            if st is not None and st.status == StageStatus.RUNNING and st.attempts == attempt:
                st.status, st.attempts = StageStatus.PENDING, attempt - 1
            s.commit()
        log.info("stage_requeued", experiment=rt.experiment_id, stage_id=rt.stage_id)

    # ---- what stages run against (services.scheduler.stages.StagePlatform) -------------------
    def call(self, rt: StageRuntime, role: str, address: str, fn: Callable[[CallScope], Any]) -> Any:
        """Run one worker call inside a slot of its replica (queued here when the replica is busy), cancellable
        through the experiment's call scope."""
        with self._inflight_lock:
            scope = self._inflight.get(rt.experiment_id) or CallScope()
        with self.capacity.slot(
            role, address, rt.experiment_id, rt.spec.priority, should_stop=lambda: self._should_stop(rt.experiment_id, scope)
        ) as waited:
            rt.queued.append(waited)
            return fn(scope)

    def _should_stop(self, exp_id: int, scope: CallScope) -> bool:
        """Stop waiting for a slot: the scheduler stops, the lease was lost, or the experiment's calls were cancelled."""
        return self._stop.is_set() or exp_id in self._lost or scope.cancelled

    def addresses(self, role: str) -> list[str]:
        """Ready replicas of a worker (static settings, or Kubernetes EndpointSlices); none: retry later."""
        addresses = self.discovery.addresses().get(role) or []
        if not addresses:
            raise WorkerUnavailable(role, "<no ready replica>", grpc.StatusCode.UNAVAILABLE, "discovery found no ready replica")
        return addresses

    def dataset(self, path: str) -> dict[str, Problem]:
        """The problems of a dataset file (resolved and checked when the experiment was created), by id."""
        if path not in self._dataset_cache:
            self._dataset_cache[path] = {p.problem_id: p for p in load_problems(path)}
        return self._dataset_cache[path]

    def progress(self, rt: StageRuntime, stage: str, n_jobs: int) -> Callable[[int], ProgressFn]:
        return self._progress.callbacks(rt.experiment_id, rt.round_index, rt.stage_id, stage, n_jobs)

    def publish(self, exp_id: int, kind: str, **fields) -> None:
        try:
            self.bus.publish({"type": kind, "experiment_id": exp_id, "time": time.time(), **fields})
        except Exception:  # noqa: BLE001 - events are best effort; the database is the record
            log.warning("event_publish_failed", experiment=exp_id, type=kind)

    # ---- failures ----------------------------------------------------------------------------
    def _stage_busy(self, rt: StageRuntime, stage_name: str, attempt: int, exc: WorkerBusy) -> None:
        """The worker is at capacity (serving another scheduler replica, or a slots setting above its own):
        queue the stage again shortly, without counting the attempt."""
        detail = f"queued: the {exc.service} service at {exc.address} is at capacity; retrying"
        self._retry_later(rt, stage_name, attempt, exc, max(self.settings.retry_backoff_s, 0.1), detail, count_attempt=False)

    def _stage_unavailable(self, rt: StageRuntime, stage_name: str, attempt: int, exc: WorkerUnavailable) -> None:
        if attempt > self.settings.retry_limit:
            STAGE_RETRIES.labels(stage_name, exc.service).inc()
            self._fail(rt, stage_name, f"gave up after {attempt} attempts: {exc}")
            return
        backoff = min(self.settings.retry_backoff_max_s, self.settings.retry_backoff_s * 2 ** (attempt - 1))
        detail = f"waiting for the {exc.service} service at {exc.address} (attempt {attempt}, retry in {backoff:.1f}s): {exc.code.name}"
        self._retry_later(rt, stage_name, attempt, exc, backoff, detail, count_attempt=True)

    def _retry_later(
        self, rt: StageRuntime, stage_name: str, attempt: int, exc: WorkerUnavailable, backoff: float, detail: str, count_attempt: bool
    ) -> None:
        """Put the stage back to pending, to be tried again after `backoff`; status_detail says why meanwhile."""
        STAGE_RETRIES.labels(stage_name, exc.service).inc()
        self._not_before[rt.experiment_id] = time.monotonic() + backoff
        with self.sessions() as s:
            st = s.get(Stage, rt.stage_id)
            exp = s.get(Experiment, rt.experiment_id)
            if st is None or exp is None:
                return
            st.status, st.error = StageStatus.PENDING, public_message(str(exc), self.settings)
            if not count_attempt and st.attempts == attempt:
                st.attempts = attempt - 1
            if exp.status in ACTIVE:
                exp.status_detail = detail
            s.commit()
        log.warning("worker_unavailable", experiment=rt.experiment_id, stage=stage_name, service=exc.service,
                    address=exc.address, attempt=attempt, busy=not count_attempt)
        self.publish(rt.experiment_id, "stage_retry", stage=stage_name, detail=detail)

    def _fail(self, rt: StageRuntime, stage_name: str, message: str) -> None:
        message = public_message(message, self.settings)  # stored and shown by the API: no server paths
        with self.sessions() as s:
            st = s.get(Stage, rt.stage_id)
            exp = s.get(Experiment, rt.experiment_id)
            if st is None or exp is None:
                return
            st.status, st.error, st.finished_at = StageStatus.FAILED, message, utcnow()
            if exp.status in ACTIVE:
                exp.status, exp.error, exp.finished_at = ExperimentStatus.FAILED, f"{stage_name}: {message}", utcnow()
            s.commit()
        self.lease.release(rt.experiment_id)
        log.error("experiment_failed", experiment=rt.experiment_id, stage=stage_name, error=message)
        self.publish(rt.experiment_id, "experiment_failed", stage=stage_name, error=message)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
