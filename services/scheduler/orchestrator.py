"""The orchestrator: drives each experiment as a durable state machine.

round -> rollout_train -> rollout_val -> score -> select -> train -> next round.
Every transition is committed before the next request goes out; a stage's results and
its "succeeded" mark are committed in one transaction, so a scheduler killed at any
moment repeats at most the stage that was in flight, and the workers' idempotency (same
request id, same deterministic output path, atomic writes) makes the repeat harmless.

A worker that is unreachable is retried with exponential backoff up to a cap; the
experiment's status_detail names the service meanwhile. A worker that rejects a request
fails the experiment with the worker's message.

Experiments advance side by side: each active experiment is driven by its own thread (up to
max_parallel_experiments), so a stage of one never waits for a stage of another unless both
need the same worker replica. Worker capacity is explicit (services.scheduler.capacity): a
request takes a slot of its replica before it is sent, and requests beyond capacity queue here,
shared fairly between experiments by priority; each stage records how long it queued. Leases
are renewed on a timer, independent of worker progress, so a long model load cannot let
another scheduler replica take an experiment mid-stage.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import grpc
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.checkpoint_retention import prune_checkpoints
from gradalign_common.datasets import load_problems
from gradalign_common.errors import InvalidInputError
from gradalign_common.logging_setup import get_logger
from gradalign_common.pb import rollout_pb2, scoring_pb2, training_pb2
from gradalign_common.records import Problem, ScoreRecord, write_problems
from gradalign_common.selection import get_mode, select_top
from services.scheduler.bulk import insert_candidates, update_candidates
from services.scheduler.capacity import SlotWaitCancelled, WorkerCapacity
from services.scheduler.db import Candidate, Experiment, PoolProblem, Round, Stage, TrainStep, utcnow
from services.scheduler.events import EventBus
from services.scheduler.discovery import make_discovery
from services.scheduler.leases import make_lease
from services.scheduler.settings import SchedulerSettings
from services.scheduler import workers
from services.scheduler.workers import WorkerRejected, WorkerUnavailable

STAGES = ("rollout_train", "rollout_val", "score", "select", "train")
ACTIVE = ("pending", "running")

log = get_logger("gradalign.orchestrator")
STAGE_SECONDS = Histogram("gradalign_stage_seconds", "Wall time of a stage", ["stage"])
STAGE_RETRIES = Counter("gradalign_stage_retries_total", "Stage attempts that found a worker unavailable", ["stage", "service"])
ROUND_OVERHEAD = Gauge("gradalign_round_overhead_seconds", "Fixed overhead of the last finished round", ["experiment"])


@dataclass
class StageContext:
    """What a stage handler needs; handlers return (result dict, compute seconds)."""

    experiment_id: int
    config: dict
    round_index: int
    checkpoint_in: str
    round_id: int
    stage_id: int
    previous: dict  # stage name -> result of the stages already succeeded in this round
    priority: float = 1.0  # share of contended worker time
    queued: list[float] = field(default_factory=list)  # seconds each of the stage's requests waited for a slot


class Orchestrator:
    def __init__(self, settings: SchedulerSettings, sessions: sessionmaker, bus: EventBus):
        self.settings = settings
        self.sessions = sessions
        self.bus = bus
        self.store = ArtifactStore(settings.artifact_root)
        self.owner = settings.lease_owner()
        self.lease = make_lease(settings.redis_url, sessions, self.owner, settings.lease_ttl_s)
        self.discovery = make_discovery(settings)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._not_before: dict[int, float] = {}
        self._dataset_cache: dict[str, dict[str, Problem]] = {}
        self._progress_written: dict[int, float] = {}
        self.capacity = WorkerCapacity(
            {"rollout": settings.rollout_slots, "scoring": settings.scoring_slots, "trainer": settings.trainer_slots}
        )
        self._drivers = ThreadPoolExecutor(max_workers=settings.max_parallel_experiments, thread_name_prefix="experiment")
        self._inflight: set[int] = set()  # experiments a driver thread is advancing
        self._lost: set[int] = set()  # experiments whose lease could not be renewed: their drivers stop
        self._inflight_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._active_checked: dict[int, tuple[float, bool]] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="orchestrator", daemon=True)
        self._thread.start()
        self._renewer = threading.Thread(target=self._renew_leases, name="lease-renewer", daemon=True)
        self._renewer.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in (self._thread, self._renewer):
            if thread:
                thread.join(timeout)
        self._drivers.shutdown(wait=False, cancel_futures=True)

    def _renew_leases(self) -> None:
        """Renew the lease of every experiment being driven, every third of the TTL, whatever the workers do."""
        period = self.settings.lease_ttl_s / 3
        while not self._stop.wait(period):
            with self._inflight_lock:
                held = list(self._inflight)
            for exp_id in held:
                try:
                    renewed = self.lease.renew(exp_id)
                except Exception:  # noqa: BLE001 - a lease store hiccup: try again next period
                    log.warning("lease_renew_failed", experiment=exp_id)
                    continue
                if not renewed:
                    log.warning("lease_lost", experiment=exp_id, owner=self.owner)
                    with self._inflight_lock:
                        self._lost.add(exp_id)

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
            ids = s.scalars(select(Experiment.id).where(Experiment.status.in_(ACTIVE)).order_by(Experiment.id)).all()
        started = False
        now = time.monotonic()
        for exp_id in ids:
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
                self._inflight.add(exp_id)
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
                self._inflight.discard(exp_id)
                self._lost.discard(exp_id)
            self._forget_if_ended(exp_id)

    def _forget_if_ended(self, exp_id: int) -> None:
        """An experiment that completed, failed or was cancelled leaves the fair-share accounts and the status cache."""
        with self.sessions() as s:
            ended = s.scalar(select(Experiment.status).where(Experiment.id == exp_id)) not in ACTIVE
        if ended:
            self.capacity.forget(exp_id)
            self._active_checked.pop(exp_id, None)

    def release_all(self) -> None:
        self.lease.release_all()

    # ---- the state machine -----------------------------------------------------------------
    def step(self, exp_id: int) -> bool:
        """Run the experiment's next stage (or close its round); True when progress was made."""
        with self.sessions() as s:
            exp = s.get(Experiment, exp_id)
            if exp is None or exp.status not in ACTIVE:
                return False
            if exp.status == "pending":
                exp.status, exp.started_at = "running", utcnow()
            rnd = self._current_round(s, exp)
            stage = next((st for st in rnd.stages if st.status not in ("succeeded", "skipped")), None)
            if stage is None:
                self._finish_round(s, exp, rnd)
                s.commit()
                if exp.status == "completed":
                    self.lease.release(exp_id)
                self._publish(exp_id, "round_finished", round=rnd.index, status=exp.status)
                return True
            stage.status, stage.attempts, stage.started_at = "running", stage.attempts + 1, utcnow()
            stage.error = None
            exp.current_stage = stage.name
            exp.status_detail = None  # a retry's "waiting for ..." described the attempt before this one
            ctx = StageContext(
                experiment_id=exp.id,
                config=dict(exp.config),
                round_index=rnd.index,
                checkpoint_in=rnd.checkpoint_in,
                round_id=rnd.id,
                stage_id=stage.id,
                previous={st.name: st.result or {} for st in rnd.stages if st.status == "succeeded"},
                priority=float(exp.config.get("priority", 1.0)),
            )
            stage_name, attempt = stage.name, stage.attempts
            s.commit()
        self._publish(exp_id, "stage_started", round=ctx.round_index, stage=stage_name, attempt=attempt)
        log.info("stage_started", experiment=exp_id, round=ctx.round_index, stage=stage_name, attempt=attempt)
        handler = getattr(self, f"_stage_{stage_name}")
        started = time.perf_counter()
        try:
            result, compute = handler(ctx)
        except SlotWaitCancelled:
            self._requeue(ctx, attempt)
            return False
        except WorkerUnavailable as exc:
            self._stage_unavailable(ctx, stage_name, attempt, exc)
            return True
        except (WorkerRejected, InvalidInputError) as exc:
            self._fail(ctx, stage_name, str(exc))
            return True
        except Exception as exc:  # noqa: BLE001 - a bug in one stage fails that experiment, not the scheduler
            log.exception("stage_crashed", experiment=exp_id, stage=stage_name)
            self._fail(ctx, stage_name, f"{type(exc).__name__}: {exc}")
            return True
        wall = time.perf_counter() - started
        STAGE_SECONDS.labels(stage_name).observe(wall)
        self._not_before.pop(exp_id, None)
        with self.sessions() as s:
            st = s.get(Stage, ctx.stage_id)
            st.status, st.finished_at, st.result, st.compute_seconds = "succeeded", utcnow(), result, compute
            st.queued_seconds = max(ctx.queued, default=0.0)
            exp = s.get(Experiment, exp_id)
            exp.status_detail = None
            s.commit()
        self._publish(exp_id, "stage_finished", round=ctx.round_index, stage=stage_name, seconds=round(wall, 3))
        return True

    def _current_round(self, s: Session, exp: Experiment) -> Round:
        rnd = s.scalar(select(Round).where(Round.experiment_id == exp.id, Round.index == exp.current_round))
        if rnd is None:
            rnd = Round(experiment_id=exp.id, index=exp.current_round, status="running", checkpoint_in=exp.checkpoint)
            rnd.stages = [Stage(name=name, status="pending") for name in STAGES]
            s.add(rnd)
            s.flush()
        return rnd

    def _finish_round(self, s: Session, exp: Experiment, rnd: Round) -> None:
        rnd.status, rnd.finished_at = "completed", utcnow()
        rnd.compute_seconds = sum(st.compute_seconds for st in rnd.stages)
        wall = (_aware(rnd.finished_at) - _aware(rnd.started_at)).total_seconds()
        rnd.overhead_seconds = max(0.0, wall - rnd.compute_seconds)
        ROUND_OVERHEAD.labels(str(exp.id)).set(rnd.overhead_seconds)
        exp.checkpoint = rnd.checkpoint_out or exp.checkpoint
        self._prune_checkpoints(s, exp)
        exp.current_round = rnd.index + 1
        exp.current_stage = None
        if exp.current_round >= exp.config["num_selections"]:
            exp.status, exp.finished_at = "completed", utcnow()

    def _prune_checkpoints(self, s: Session, exp: Experiment) -> None:
        """Apply the experiment's checkpoint retention; round r's checkpoint is judged by round r+1's validation reward."""
        keep_last = exp.config.get("keep_last_checkpoints")
        if not keep_last:
            return
        rewards = {
            r.index - 1: r.validation_reward
            for r in s.scalars(select(Round).where(Round.experiment_id == exp.id))
            if r.index > 0
        }
        deleted = prune_checkpoints(
            self.store.experiment_dir(exp.id) / "checkpoints",
            rewards,
            keep_last=keep_last,
            keep_best=exp.config.get("keep_best_checkpoints", 1),
            in_use=[exp.checkpoint],
        )
        if deleted:
            log.info("checkpoints_pruned", experiment=exp.id, deleted=[str(p) for p in deleted])

    def _requeue(self, ctx: StageContext, attempt: int) -> None:
        """A stage that stopped waiting for a worker slot (cancelled, stopping, lease lost) goes back to pending
        without counting as an attempt; nothing was sent."""
        with self.sessions() as s:
            st = s.get(Stage, ctx.stage_id)
            if st.status == "running" and st.attempts == attempt:
                st.status, st.attempts = "pending", attempt - 1
            s.commit()
        log.info("stage_requeued", experiment=ctx.experiment_id, stage_id=ctx.stage_id)

    def _call(self, ctx: StageContext, role: str, address: str, call: Callable[[], object]):
        """Run one worker call inside a slot of its replica (queued here when the replica is busy)."""
        with self.capacity.slot(
            role, address, ctx.experiment_id, ctx.priority, should_stop=lambda: self._should_stop(ctx.experiment_id)
        ) as waited:
            ctx.queued.append(waited)
            return call()

    def _should_stop(self, exp_id: int) -> bool:
        """Stop waiting for a slot: the scheduler stops, the lease was lost, or the experiment left the active states."""
        if self._stop.is_set() or exp_id in self._lost:
            return True
        now = time.monotonic()
        checked_at, active = self._active_checked.get(exp_id, (0.0, True))
        if now - checked_at >= 1.0:
            with self.sessions() as s:
                active = s.scalar(select(Experiment.status).where(Experiment.id == exp_id)) in ACTIVE
            self._active_checked[exp_id] = (now, active)
        return not active

    def _stage_unavailable(self, ctx: StageContext, stage_name: str, attempt: int, exc: WorkerUnavailable) -> None:
        STAGE_RETRIES.labels(stage_name, exc.service).inc()
        if attempt > self.settings.retry_limit:
            self._fail(ctx, stage_name, f"gave up after {attempt} attempts: {exc}")
            return
        backoff = min(self.settings.retry_backoff_max_s, self.settings.retry_backoff_s * 2 ** (attempt - 1))
        self._not_before[ctx.experiment_id] = time.monotonic() + backoff
        detail = f"waiting for the {exc.service} service at {exc.address} (attempt {attempt}, retry in {backoff:.1f}s): {exc.code.name}"
        with self.sessions() as s:
            st = s.get(Stage, ctx.stage_id)
            st.status, st.error = "pending", str(exc)
            s.get(Experiment, ctx.experiment_id).status_detail = detail
            s.commit()
        log.warning("worker_unavailable", experiment=ctx.experiment_id, stage=stage_name, service=exc.service, address=exc.address, attempt=attempt)
        self._publish(ctx.experiment_id, "stage_retry", stage=stage_name, detail=detail)

    def _fail(self, ctx: StageContext, stage_name: str, message: str) -> None:
        with self.sessions() as s:
            st = s.get(Stage, ctx.stage_id)
            st.status, st.error, st.finished_at = "failed", message, utcnow()
            exp = s.get(Experiment, ctx.experiment_id)
            if exp.status in ACTIVE:
                exp.status, exp.error, exp.finished_at = "failed", f"{stage_name}: {message}", utcnow()
            s.commit()
        self.lease.release(ctx.experiment_id)
        log.error("experiment_failed", experiment=ctx.experiment_id, stage=stage_name, error=message)
        self._publish(ctx.experiment_id, "experiment_failed", stage=stage_name, error=message)

    # ---- stages ----------------------------------------------------------------------------
    def _stage_rollout_train(self, ctx: StageContext) -> tuple[dict, float]:
        cfg = ctx.config
        problems = self._chunk_problems(ctx)
        paths, stats, compute = self._generate(
            ctx, "rollout_train", problems, n=cfg["n_samples_train"], seed=_stage_seed(cfg, ctx.round_index, 0)
        )
        with self.sessions() as s:
            s.execute(delete(Candidate).where(Candidate.round_id == ctx.round_id))
            insert_candidates(
                s,
                [
                    {
                        "round_id": ctx.round_id,
                        "problem_id": st.problem_id,
                        "n_responses": st.n_responses,
                        "accuracy": st.accuracy,
                        "mean_reward": st.mean_reward,
                        "mean_response_length": st.mean_response_length,
                        "selected": False,
                    }
                    for st in stats
                ],
            )
            s.get(Round, ctx.round_id).candidate_accuracy = _weighted_accuracy(stats)
            s.commit()
        return {"paths": paths, "n_problems": len(problems)}, compute

    def _stage_rollout_val(self, ctx: StageContext) -> tuple[dict, float]:
        cfg = ctx.config
        problems = list(self._dataset(cfg["val_dataset_path"]).values())
        paths, stats, compute = self._generate(
            ctx, "rollout_val", problems, n=cfg["n_samples_val"], seed=_stage_seed(cfg, ctx.round_index, 1)
        )
        total = sum(st.n_responses for st in stats)
        reward = sum(st.mean_reward * st.n_responses for st in stats) / total
        with self.sessions() as s:
            s.get(Round, ctx.round_id).validation_reward = reward
            s.commit()
        return {"paths": paths, "validation_reward": reward, "validation_accuracy": _weighted_accuracy(stats)}, compute

    def _stage_score(self, ctx: StageContext) -> tuple[dict, float]:
        cfg = ctx.config
        mode = get_mode(cfg["mode"])
        candidate_paths = ctx.previous["rollout_train"]["paths"]
        if mode.name == "align":  # LearnAlign: the validation set is all of the round's candidates
            validation_paths = candidate_paths
        else:
            validation_paths = ctx.previous["rollout_val"]["paths"] if mode.needs_validation else []
        addresses = self._addresses("scoring")
        shards = [candidate_paths[i :: len(addresses)] for i in range(len(addresses))]
        jobs = [(i, addresses[i], paths) for i, paths in enumerate(shards) if paths]
        tracker = _ProgressTracker(self, ctx, "score", len(jobs))
        method, dtype = scoring_options(cfg)

        def run(job):
            i, address, paths = job
            request = scoring_pb2.ScoreRequest(
                request_id=f"{ctx.experiment_id}/{ctx.round_index}/score/{i}",
                checkpoint=ctx.checkpoint_in,
                candidate_paths=paths,
                validation_paths=validation_paths,
                mode=mode.name,
                method=method,
                dtype=dtype,
                seed=_stage_seed(cfg, ctx.round_index, 2),
                output_path=str(self.store.scores_path(ctx.experiment_id, ctx.round_index, i)),
            )
            return self._call(
                ctx, "scoring", address, lambda: workers.score(address, self.settings.worker_deadline_s, request, tracker.callback(i))
            )

        results = _run_parallel(run, jobs)
        by_id = {sc.problem_id: sc for scores, _ in results for sc in scores}
        with self.sessions() as s:
            rows = s.execute(select(Candidate.id, Candidate.problem_id).where(Candidate.round_id == ctx.round_id)).all()
            missing = [pid for _, pid in rows if pid not in by_id]
            if missing:
                raise WorkerRejected("scoring", ",".join(addresses), grpc.StatusCode.INTERNAL, f"no score for {len(missing)} candidates, e.g. {missing[:3]}")
            update_candidates(
                s,
                [
                    {"id": cid, "score": by_id[pid].score, "zero_advantage": by_id[pid].zero_advantage, "selected": False, "rank": None}
                    for cid, pid in rows
                ],
            )
            s.commit()
        compute = max(summary.compute_seconds for _, summary in results)
        return {"paths": [summary.output_path for _, summary in results], "n_scored": len(by_id)}, compute

    def _stage_select(self, ctx: StageContext) -> tuple[dict, float]:
        cfg = ctx.config
        started = time.perf_counter()
        n_keep = cfg["chunk_size"] // cfg["k"]
        with self.sessions() as s:
            rows = s.scalars(select(Candidate).where(Candidate.round_id == ctx.round_id)).all()
            records = [
                ScoreRecord(c.problem_id, c.score, c.accuracy, c.n_responses, bool(c.zero_advantage)) for c in rows
            ]
            chosen = select_top(records, get_mode(cfg["mode"]), n_keep)
            rank = {pid: i for i, pid in enumerate(chosen)}
            for c in rows:
                c.selected, c.rank = c.problem_id in rank, rank.get(c.problem_id)
            pool = self._dataset(cfg["train_dataset_path"])
            path = self.store.round_dir(ctx.experiment_id, ctx.round_index) / "select" / "selected.parquet"
            write_problems(path, [pool[pid] for pid in chosen])
            s.commit()
        return {"path": str(path), "selected": chosen}, time.perf_counter() - started

    def _stage_train(self, ctx: StageContext) -> tuple[dict, float]:
        cfg = ctx.config
        out = self.store.checkpoint_dir(ctx.experiment_id, ctx.round_index)
        request = training_pb2.TrainRequest(
            request_id=f"{ctx.experiment_id}/{ctx.round_index}/train",
            checkpoint=ctx.checkpoint_in,
            problems_path=ctx.previous["select"]["path"],
            output_checkpoint=str(out),
            rollouts_paths=ctx.previous["rollout_train"]["paths"] if cfg.get("reuse_rollouts", True) else [],
            reference_checkpoint=cfg["model"],
            hyperparams=training_pb2.TrainHyperparams(
                steps=cfg["iters_per_select"],
                batch_size=cfg["train_batch_size"],
                learning_rate=cfg["learning_rate"],
                clip_eps=cfg["clip_eps"],
                kl_coef=cfg["kl_coef"],
                max_grad_norm=1.0,
                micro_batch_size=cfg["micro_batch_size"],
                weight_decay=cfg.get("weight_decay", 0.0),
                sampling=workers.sampling_params(
                    cfg["n_samples_train"], cfg["max_tokens"], cfg["temperature"], cfg["top_p"], _stage_seed(cfg, ctx.round_index, 3)
                ),
                seed=_stage_seed(cfg, ctx.round_index, 3),
            ),
        )
        with self.sessions() as s:
            s.execute(delete(TrainStep).where(TrainStep.round_id == ctx.round_id))
            s.commit()
        total = cfg["iters_per_select"]

        def on_step(m: training_pb2.StepMetrics) -> None:
            metrics = {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields if f.name != "step"}
            with self.sessions() as s:
                s.add(TrainStep(round_id=ctx.round_id, step=m.step, metrics=metrics))
                st = s.get(Stage, ctx.stage_id)
                st.progress_done, st.progress_total, st.progress_unit = m.step, total, "steps"
                s.commit()
            self._publish(ctx.experiment_id, "progress", round=ctx.round_index, stage="train", done=m.step, total=total, unit="steps", metrics=metrics)

        address = self._addresses("trainer")[0]
        result = self._call(ctx, "trainer", address, lambda: workers.train(address, self.settings.worker_deadline_s, request, on_step))
        with self.sessions() as s:
            s.get(Round, ctx.round_id).checkpoint_out = result.checkpoint
            s.commit()
        return {"checkpoint": result.checkpoint, "steps": result.steps}, result.compute_seconds

    # ---- helpers ---------------------------------------------------------------------------
    def _generate(self, ctx: StageContext, stage: str, problems: list[Problem], n: int, seed: int):
        """Fan a problem list out over the rollout replicas in shards; merge stats in order."""
        cfg = ctx.config
        rollout_addresses = self._addresses("rollout")
        n_shards = min(len(problems), max(len(rollout_addresses), len(self._addresses("scoring"))))
        size = -(-len(problems) // n_shards)
        jobs = []
        for i in range(n_shards):
            shard = problems[i * size : (i + 1) * size]
            if not shard:
                continue
            path = self.store.problems_path(ctx.experiment_id, ctx.round_index, stage, i)
            write_problems(path, shard)
            address = rollout_addresses[i % len(rollout_addresses)]
            jobs.append((i, address, path))
        tracker = _ProgressTracker(self, ctx, stage, len(jobs))

        def run(job):
            i, address, path = job
            request = rollout_pb2.GenerateRequest(
                request_id=f"{ctx.experiment_id}/{ctx.round_index}/{stage}/{i}",
                checkpoint=ctx.checkpoint_in,
                problems_path=str(path),
                sampling=workers.sampling_params(n, cfg["max_tokens"], cfg["temperature"], cfg["top_p"], seed + i),
                output_path=str(self.store.rollouts_path(ctx.experiment_id, ctx.round_index, stage, i)),
            )
            return self._call(
                ctx, "rollout", address, lambda: workers.generate(address, self.settings.worker_deadline_s, request, tracker.callback(i))
            )

        results = _run_parallel(run, jobs)
        stats = [st for r in results for st in r.stats]
        return [r.output_path for r in results], stats, max(r.compute_seconds for r in results)

    def _addresses(self, role: str) -> list[str]:
        """Ready replicas of a worker (static settings, or Kubernetes EndpointSlices); none: retry later."""
        addresses = self.discovery.addresses().get(role) or []
        if not addresses:
            raise WorkerUnavailable(role, "<no ready replica>", grpc.StatusCode.UNAVAILABLE, "discovery found no ready replica")
        return addresses

    def _chunk_problems(self, ctx: StageContext) -> list[Problem]:
        cfg = ctx.config
        m = cfg["chunk_size"]
        with self.sessions() as s:
            pool_size = s.get(Experiment, ctx.experiment_id).pool_size
            positions = sorted({(ctx.round_index * m + i) % pool_size for i in range(m)})
            rows = s.execute(
                select(PoolProblem.position, PoolProblem.problem_id).where(
                    PoolProblem.experiment_id == ctx.experiment_id, PoolProblem.position.in_(positions)
                )
            ).all()
        order = {pos: pid for pos, pid in rows}
        pool = self._dataset(cfg["train_dataset_path"])
        ids = [order[(ctx.round_index * m + i) % pool_size] for i in range(m)]
        return [pool[pid] for pid in dict.fromkeys(ids)]

    def _dataset(self, path: str) -> dict[str, Problem]:
        """The problems of a dataset file (resolved and checked when the experiment was created), by id."""
        if path not in self._dataset_cache:
            self._dataset_cache[path] = {p.problem_id: p for p in load_problems(path)}
        return self._dataset_cache[path]

    def record_progress(self, ctx: StageContext, stage: str, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if done < total and now - self._progress_written.get(ctx.stage_id, 0) < 1.0:
            self._publish(ctx.experiment_id, "progress", round=ctx.round_index, stage=stage, done=done, total=total, unit=unit)
            return
        self._progress_written[ctx.stage_id] = now
        with self.sessions() as s:
            st = s.get(Stage, ctx.stage_id)
            st.progress_done, st.progress_total, st.progress_unit = done, total, unit
            s.commit()
        self._publish(ctx.experiment_id, "progress", round=ctx.round_index, stage=stage, done=done, total=total, unit=unit)

    def _publish(self, exp_id: int, kind: str, **fields) -> None:
        try:
            self.bus.publish({"type": kind, "experiment_id": exp_id, "time": time.time(), **fields})
        except Exception:  # noqa: BLE001 - events are best effort; the database is the record
            log.warning("event_publish_failed", experiment=exp_id, type=kind)


class _ProgressTracker:
    """Sums the progress of a stage's parallel shards and reports it as one figure."""

    def __init__(self, orch: Orchestrator, ctx: StageContext, stage: str, n_jobs: int):
        self.orch, self.ctx, self.stage = orch, ctx, stage
        self.done = [0] * max(n_jobs, 1)
        self.total = [0] * max(n_jobs, 1)
        self.lock = threading.Lock()

    def callback(self, i: int) -> Callable[[int, int, str], None]:
        def report(done: int, total: int, unit: str) -> None:
            with self.lock:
                self.done[i], self.total[i] = done, total
                d, t = sum(self.done), sum(self.total)
            self.orch.record_progress(self.ctx, self.stage, d, t, unit)

        return report


def _run_parallel(fn, jobs: list) -> list:
    if len(jobs) == 1:
        return [fn(jobs[0])]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(fn, jobs))


def scoring_options(cfg: dict) -> tuple[str, str]:
    """(method, dtype) of an experiment's score requests. dtype "" leaves the choice to the scoring
    service's dtype setting (auto: bfloat16 on CUDA, float32 on CPU); experiments stored before these
    fields existed score exactly with the service's dtype."""
    dtype = cfg.get("scoring_dtype", "auto")
    return cfg.get("scoring_method", "exact"), "" if dtype == "auto" else dtype


def _stage_seed(cfg: dict, round_index: int, stage_offset: int) -> int:
    return (cfg["seed"] * 1_000_003 + round_index * 101 + stage_offset * 7) % (2**31 - 1)


def _weighted_accuracy(stats) -> float | None:
    total = sum(st.n_responses for st in stats)
    return sum(st.accuracy * st.n_responses for st in stats) / total if total else None


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


