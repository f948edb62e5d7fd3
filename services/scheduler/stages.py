"""The stages of a round, as a table of functions.

round -> rollout_train -> rollout_val -> score -> select -> train -> next round.

Each stage is a function of a `StageRuntime` (who and where: the experiment's identity and
typed spec, the round, the results of the stages already done) that returns a `StageOutcome`
(its typed result and the seconds the workers computed). The orchestrator owns the state
machine around them (attempts, retries, leases, cancellation); the stages only build worker
requests from the spec, call the workers through the runtime's `StagePlatform`, and write
their rows. Results are stored as JSON on the stage row and parsed back into their type.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

import grpc
from sqlalchemy import delete
from sqlalchemy import select as sql_select  # `select` is the name of a stage here
from sqlalchemy.orm import sessionmaker

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.pb import rollout_pb2, scoring_pb2, training_pb2
from gradalign_common.logging_setup import get_logger
from gradalign_common.records import Problem, ScoreRecord, write_problems
from gradalign_common.round_policy import FALLBACK_MODE, ChunkDraw, scoring_mode, select_round, stage_seed
from gradalign_common.selection import ValidationSource, get_mode
from services.scheduler import workers
from services.scheduler.bulk import insert_candidates, update_candidates
from services.scheduler.db import Candidate, Round, Stage, TrainStep
from services.scheduler.round_chunks import draw_round_chunk
from services.scheduler.spec import StoredSpec
from services.scheduler.workers import WorkerRejected

log = get_logger("gradalign.stages")


# ---- typed results ------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutResult:
    """rollout_train: the candidates' rollout shards, and the round's walk over the pool (round_policy.draw_chunk)."""

    paths: list[str]
    n_problems: int
    chunk_start: int | None = None  # pool cursor (modulo the pool size) where the walk began
    chunk_end: int | None = None  # where the next round's walk begins
    skipped: list[str] = dataclasses.field(default_factory=list)  # dead problems left out of the chunk


@dataclass(frozen=True)
class ValidationResult:
    """rollout_val: the validation set's rollout shards and how well the round's checkpoint does on it."""

    paths: list[str]
    validation_reward: float
    validation_accuracy: float | None


@dataclass(frozen=True)
class ScoreResult:
    paths: list[str]
    n_scored: int
    mode: str = ""  # the mode the scores follow: the experiment's, or the round policy's fallback
    fallback: str | None = None  # why the round fell back to FALLBACK_MODE (a zero validation gradient), if it did


@dataclass(frozen=True)
class SelectResult:
    path: str  # the selected problems, in rank order
    selected: list[str]


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    steps: int


StageResult = RolloutResult | ValidationResult | ScoreResult | SelectResult | TrainResult
R = TypeVar("R", bound=StageResult)


@dataclass(frozen=True)
class StageOutcome:
    result: StageResult
    compute_seconds: float


def result_to_json(result: StageResult) -> dict[str, Any]:
    return dataclasses.asdict(result)


@dataclass
class RoundResults:
    """The results of the stages of one round that have succeeded, by stage name."""

    by_stage: dict[str, StageResult]

    @classmethod
    def from_rows(cls, rows: dict[str, dict[str, Any]]) -> "RoundResults":
        return cls({name: STAGES[name].result_type(**row) for name, row in rows.items() if name in STAGES})

    def get(self, name: str, kind: type[R]) -> R:
        result = self.by_stage.get(name)
        if not isinstance(result, kind):
            raise RuntimeError(f"stage {name!r} has no {kind.__name__} in this round (got {result!r})")
        return result


# ---- what a stage runs against -------------------------------------------------------------
class StagePlatform(Protocol):
    """What the orchestrator lends a stage: worker addresses, slotted and cancellable calls, progress, datasets."""

    sessions: sessionmaker
    store: ArtifactStore
    worker_deadline_s: float

    def addresses(self, role: str) -> list[str]: ...

    def call(self, rt: "StageRuntime", role: str, address: str, fn: Callable[[workers.CallScope], Any]) -> Any: ...

    def progress(self, rt: "StageRuntime", stage: str, n_jobs: int) -> Callable[[int], workers.ProgressFn]: ...

    def publish(self, exp_id: int, kind: str, **fields) -> None: ...

    def dataset(self, path: str) -> dict[str, Problem]: ...


@dataclass
class StageRuntime:
    experiment_id: int
    uid: str  # the experiment's never-reused identity: keys artifacts and request ids
    spec: StoredSpec
    round_index: int
    round_id: int
    stage_id: int
    checkpoint_in: str
    previous: RoundResults
    platform: StagePlatform
    queued: list[float] = dataclasses.field(default_factory=list)  # seconds each request waited for a slot

    def request_id(self, stage: str, shard: int | None = None, n_shards: int = 1) -> str:
        """`<uid>/<round>/<stage>[/<shard>-of-<n>]`: the shard count is part of the key, because a retry after
        the number of ready replicas changed splits the work differently (another body, so another key)."""
        base = f"{self.uid}/{self.round_index}/{stage}"
        return base if shard is None else f"{base}/{shard}-of-{n_shards}"

    def seed(self, stage: str) -> int:
        return stage_seed(self.spec.seed, self.round_index, stage)


# ---- the stages -----------------------------------------------------------------------------
def rollout_train(rt: StageRuntime) -> StageOutcome:
    spec = rt.spec
    problems, draw = _chunk_problems(rt)
    paths, stats, compute = _generate(rt, "rollout_train", problems, n=spec.n_samples_train, seed=rt.seed("rollout_train"))
    with rt.platform.sessions() as s:
        s.execute(delete(Candidate).where(Candidate.round_id == rt.round_id))
        insert_candidates(
            s,
            [
                {
                    "round_id": rt.round_id,
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
        s.get(Round, rt.round_id).candidate_accuracy = weighted_accuracy(stats)
        s.commit()
    result = RolloutResult(paths=paths, n_problems=len(problems), chunk_start=draw.start, chunk_end=draw.end, skipped=draw.skipped)
    return StageOutcome(result, compute)


def rollout_val(rt: StageRuntime) -> StageOutcome:
    spec = rt.spec
    problems = list(rt.platform.dataset(spec.val_dataset_path).values())
    paths, stats, compute = _generate(rt, "rollout_val", problems, n=spec.n_samples_val, seed=rt.seed("rollout_val"))
    total = sum(st.n_responses for st in stats)
    reward = sum(st.mean_reward * st.n_responses for st in stats) / total
    with rt.platform.sessions() as s:
        s.get(Round, rt.round_id).validation_reward = reward
        s.commit()
    return StageOutcome(ValidationResult(paths=paths, validation_reward=reward, validation_accuracy=weighted_accuracy(stats)), compute)


def validation_paths(rt: StageRuntime, mode_name: str) -> list[str]:
    """The rollouts the mode's validation gradient comes from, as the mode says."""
    source = get_mode(mode_name).validation
    if source is ValidationSource.CANDIDATES:  # LearnAlign-style: the round's candidates themselves
        return rt.previous.get("rollout_train", RolloutResult).paths
    if source is ValidationSource.EXTERNAL:
        return rt.previous.get("rollout_val", ValidationResult).paths
    return []


def score(rt: StageRuntime) -> StageOutcome:
    """Score the candidates with the experiment's mode; when the validation gradient is zero (the scoring
    service answers FAILED_PRECONDITION), score them again by the round policy's fallback mode and say why."""
    fallback = None
    try:
        results = _score_shards(rt, rt.spec.mode, "score")
    except WorkerRejected as exc:
        if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        fallback = exc.detail
        log.warning("score_fallback", experiment=rt.experiment_id, round=rt.round_index, mode=FALLBACK_MODE, reason=fallback)
        rt.platform.publish(rt.experiment_id, "score_fallback", round=rt.round_index, mode=FALLBACK_MODE, reason=fallback)
        results = _score_shards(rt, FALLBACK_MODE, f"score-{FALLBACK_MODE}")
    by_id = {sc.problem_id: sc for scores, _ in results for sc in scores}
    with rt.platform.sessions() as s:
        rows = s.execute(sql_select(Candidate.id, Candidate.problem_id).where(Candidate.round_id == rt.round_id)).all()
        missing = [pid for _, pid in rows if pid not in by_id]
        if missing:
            raise WorkerRejected(
                "scoring", "", grpc.StatusCode.INTERNAL, f"no score for {len(missing)} candidates, e.g. {missing[:3]}"
            )
        update_candidates(
            s,
            [
                {"id": cid, "score": by_id[pid].score, "zero_advantage": by_id[pid].zero_advantage, "selected": False, "rank": None}
                for cid, pid in rows
            ],
        )
        s.commit()
    compute = max(summary.compute_seconds for _, summary in results)
    result = ScoreResult(
        paths=[summary.output_path for _, summary in results], n_scored=len(by_id),
        mode=scoring_mode(rt.spec.mode, fallback).name, fallback=fallback,
    )
    return StageOutcome(result, compute)


def _score_shards(rt: StageRuntime, mode_name: str, key: str) -> list:
    """Score the candidate shards over the ready scoring replicas with `mode_name`; (scores, summary) per shard."""
    spec, platform = rt.spec, rt.platform
    candidate_paths = rt.previous.get("rollout_train", RolloutResult).paths
    val_paths = validation_paths(rt, mode_name)
    addresses = platform.addresses("scoring")
    shards = [candidate_paths[i :: len(addresses)] for i in range(len(addresses))]
    jobs = [(i, addresses[i], paths) for i, paths in enumerate(shards) if paths]
    progress = platform.progress(rt, "score", len(jobs))

    def run(job):
        i, address, paths = job
        request = scoring_pb2.ScoreRequest(
            request_id=rt.request_id(key, i, len(addresses)),
            checkpoint=rt.checkpoint_in,
            candidate_paths=paths,
            validation_paths=val_paths,
            mode=mode_name,
            method=spec.scoring_method,
            dtype=spec.scoring_dtype_request(),
            memory_budget=spec.scoring_memory_budget or "",
            seed=rt.seed("score"),
            output_path=str(platform.store.scores_path(rt.uid, rt.round_index, i)),
        )
        return platform.call(
            rt, "scoring", address,
            lambda scope: workers.score(address, platform.worker_deadline_s, request, progress(i), scope),
        )

    return run_parallel(run, jobs)


def select(rt: StageRuntime) -> StageOutcome:
    spec = rt.spec
    started = time.perf_counter()
    fallback = rt.previous.get("score", ScoreResult).fallback
    with rt.platform.sessions() as s:
        rows = s.scalars(sql_select(Candidate).where(Candidate.round_id == rt.round_id)).all()
        records = [ScoreRecord(c.problem_id, c.score, c.accuracy, c.n_responses, bool(c.zero_advantage)) for c in rows]
        chosen = select_round(records, spec.mode, spec.chunk_size, spec.k, fallback)
        rank = {pid: i for i, pid in enumerate(chosen)}
        for c in rows:
            c.selected, c.rank = c.problem_id in rank, rank.get(c.problem_id)
        pool = rt.platform.dataset(spec.train_dataset_path)
        path = rt.platform.store.round_dir(rt.uid, rt.round_index) / "select" / "selected.parquet"
        write_problems(path, [pool[pid] for pid in chosen])
        s.commit()
    return StageOutcome(SelectResult(path=str(path), selected=chosen), time.perf_counter() - started)


def train(rt: StageRuntime) -> StageOutcome:
    spec, platform = rt.spec, rt.platform
    request = training_pb2.TrainRequest(
        request_id=rt.request_id("train"),
        checkpoint=rt.checkpoint_in,
        problems_path=rt.previous.get("select", SelectResult).path,
        output_checkpoint=str(platform.store.checkpoint_dir(rt.uid, rt.round_index)),
        rollouts_paths=rt.previous.get("rollout_train", RolloutResult).paths if spec.reuse_rollouts else [],
        reference_checkpoint=spec.model,
        hyperparams=training_pb2.TrainHyperparams(
            steps=spec.iters_per_select, batch_size=spec.train_batch_size, micro_batch_size=spec.micro_batch_size,
            learning_rate=spec.learning_rate, weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm,
            clip_eps=spec.clip_eps, kl_coef=spec.kl_coef,
            sampling=workers.sampling_params(spec.n_samples_train, spec.max_tokens, spec.temperature, spec.top_p, rt.seed("train")),
            seed=rt.seed("train"),
        ),
    )
    with platform.sessions() as s:
        s.execute(delete(TrainStep).where(TrainStep.round_id == rt.round_id))
        s.commit()
    total = spec.iters_per_select

    def on_step(m: training_pb2.StepMetrics) -> None:
        metrics = {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields if f.name != "step"}
        with platform.sessions() as s:
            s.add(TrainStep(round_id=rt.round_id, step=m.step, metrics=metrics))
            st = s.get(Stage, rt.stage_id)
            st.progress_done, st.progress_total, st.progress_unit = m.step, total, "steps"
            s.commit()
        platform.publish(rt.experiment_id, "progress", round=rt.round_index, stage="train", done=m.step, total=total, unit="steps", metrics=metrics)

    address = platform.addresses("trainer")[0]
    result = platform.call(
        rt, "trainer", address, lambda scope: workers.train(address, platform.worker_deadline_s, request, on_step, scope)
    )
    with platform.sessions() as s:
        s.get(Round, rt.round_id).checkpoint_out = result.checkpoint
        s.commit()
    return StageOutcome(TrainResult(checkpoint=result.checkpoint, steps=result.steps), result.compute_seconds)


@dataclass(frozen=True)
class StageDef:
    run: Callable[[StageRuntime], StageOutcome]
    result_type: type


# the round, in order
STAGES: dict[str, StageDef] = {
    "rollout_train": StageDef(rollout_train, RolloutResult),
    "rollout_val": StageDef(rollout_val, ValidationResult),
    "score": StageDef(score, ScoreResult),
    "select": StageDef(select, SelectResult),
    "train": StageDef(train, TrainResult),
}


# ---- helpers -------------------------------------------------------------------------------
def _generate(rt: StageRuntime, stage: str, problems: list[Problem], n: int, seed: int):
    """Fan a problem list out over the rollout replicas in shards; merge stats in order."""
    spec, platform = rt.spec, rt.platform
    rollout_addresses = platform.addresses("rollout")
    n_shards = min(len(problems), max(len(rollout_addresses), len(platform.addresses("scoring"))))
    size = -(-len(problems) // n_shards)
    jobs = []
    for i in range(n_shards):
        shard = problems[i * size : (i + 1) * size]
        if not shard:
            continue
        path = platform.store.problems_path(rt.uid, rt.round_index, stage, i)
        write_problems(path, shard)
        jobs.append((i, rollout_addresses[i % len(rollout_addresses)], path))
    progress = platform.progress(rt, stage, len(jobs))

    def run(job):
        i, address, path = job
        request = rollout_pb2.GenerateRequest(
            request_id=rt.request_id(stage, i, n_shards),
            checkpoint=rt.checkpoint_in,
            problems_path=str(path),
            sampling=workers.sampling_params(n, spec.max_tokens, spec.temperature, spec.top_p, seed + i),
            output_path=str(platform.store.rollouts_path(rt.uid, rt.round_index, stage, i)),
        )
        return platform.call(
            rt, "rollout", address, lambda scope: workers.generate(address, platform.worker_deadline_s, request, progress(i), scope)
        )

    results = run_parallel(run, jobs)
    stats = [st for r in results for st in r.stats]
    return [r.output_path for r in results], stats, max(r.compute_seconds for r in results)


def _chunk_problems(rt: StageRuntime) -> tuple[list[Problem], ChunkDraw]:
    """Round r's candidates by the round policy (services.scheduler.round_chunks.draw_round_chunk)."""
    with rt.platform.sessions() as s:
        draw = draw_round_chunk(s, rt.experiment_id, rt.round_id, rt.round_index, rt.spec, rt.seed("skip_dead"))
    pool = rt.platform.dataset(rt.spec.train_dataset_path)
    return [pool[pid] for pid in draw.ids], draw


def run_parallel(fn, jobs: list) -> list:
    if len(jobs) == 1:
        return [fn(jobs[0])]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(fn, jobs))


def weighted_accuracy(stats) -> float | None:
    total = sum(st.n_responses for st in stats)
    return sum(st.accuracy * st.n_responses for st in stats) / total if total else None
