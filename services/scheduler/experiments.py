"""The service layer behind the API routes: creating, listing and controlling experiments."""

from __future__ import annotations

import random
import shutil

from sqlalchemy import delete, func, select
from sqlalchemy.orm import sessionmaker

from gradalign_common.artifacts import ArtifactStore
from gradalign_common.datasets import load_problems
from gradalign_common.errors import ConflictError, FieldError, InvalidInputError, NotFoundError
from gradalign_common.logging_setup import get_logger
from gradalign_common.records import read_rollouts
from services.scheduler.budget import check_budget, check_context
from services.scheduler.bulk import insert_pool
from services.scheduler.datasets import resolve_dataset, scrub_paths
from services.scheduler.db import Candidate, Dataset, Experiment, PoolProblem, Round, TrainStep, utcnow
from services.scheduler.events import EventBus
from services.scheduler.model_paths import resolve_model
from services.scheduler.settings import SchedulerSettings
from services.scheduler.spec import ExperimentSpec, StoredSpec
from services.scheduler.status import ACTIVE, TERMINAL, ExperimentStatus, StageStatus

log = get_logger("gradalign.experiments")


class ExperimentService:
    def __init__(self, settings: SchedulerSettings, sessions: sessionmaker, bus: EventBus):
        self.settings, self.sessions, self.bus = settings, sessions, bus
        self.store = ArtifactStore(settings.artifact_root)

    def create(self, body: ExperimentSpec) -> Experiment:
        """Validate what needs the file system (model, datasets, pool size), then store in one transaction."""
        try:
            model_dir = resolve_model(body.model, self.settings.models_root, self.settings.artifact_root)
        except InvalidInputError as exc:
            raise FieldError("model", str(exc)) from None
        train_path, pool = self._resolve(body.train_dataset, "train_dataset")
        val_path, validation = self._resolve(body.val_dataset, "val_dataset")
        if body.chunk_size > len(pool):
            raise FieldError("chunk_size", f"chunk_size={body.chunk_size} is larger than the {len(pool)} problems of train_dataset")
        check_budget(body, len(validation), self.settings.max_generated_tokens_per_experiment, self.settings.max_train_steps_per_experiment)
        check_context(body, model_dir, [*pool, *validation])
        order = [p.problem_id for p in pool]
        random.Random(body.seed).shuffle(order)
        stored = StoredSpec(
            **{**body.model_dump(), "model": str(model_dir)},
            train_dataset_path=str(train_path),
            val_dataset_path=str(val_path),
        )
        with self.sessions() as s:
            exp = Experiment(
                name=body.name, status=ExperimentStatus.PENDING, config=stored.model_dump(mode="json"),
                checkpoint=str(model_dir), pool_size=len(order),
            )
            s.add(exp)
            s.flush()
            insert_pool(s, exp.id, order)
            s.commit()
        self.bus.publish({"type": "experiment_created", "experiment_id": exp.id})
        return exp

    def _resolve(self, ref: str, field: str):
        """(file path, problems) of a dataset reference: built-in name, registered dataset or file."""
        with self.sessions() as s:
            registered = dict(s.execute(select(Dataset.name, Dataset.path).where(Dataset.name == ref)).all())
        try:
            path = resolve_dataset(ref, self.settings.artifact_root, self.settings.data_root, registered)
            return path, load_problems(path)
        except InvalidInputError as exc:  # a file's loader names it by its path: shown relative to the roots
            raise FieldError(field, scrub_paths(str(exc), self.settings.data_root, self.settings.artifact_root)) from None

    def list(self, status: ExperimentStatus | None, offset: int, limit: int) -> tuple[list[Experiment], int]:
        with self.sessions() as s:
            q = select(Experiment)
            if status:
                q = q.where(Experiment.status == status)
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            items = s.scalars(q.order_by(Experiment.id.desc()).offset(offset).limit(limit)).all()
            return list(items), total

    def get(self, exp_id: int) -> Experiment:
        with self.sessions() as s:
            return _experiment(s, exp_id)

    def cancel(self, exp_id: int) -> Experiment:
        with self.sessions() as s:
            exp = _experiment(s, exp_id)
            if exp.status in TERMINAL:
                raise ConflictError(f"experiment {exp_id} is already {exp.status}")
            exp.status, exp.finished_at, exp.current_stage, exp.status_detail = ExperimentStatus.CANCELLED, utcnow(), None, None
            s.commit()
        self.bus.publish({"type": "experiment_cancelled", "experiment_id": exp_id})
        return exp

    def resume(self, exp_id: int) -> Experiment:
        """Put a failed or cancelled experiment back in the queue; it continues at its current stage."""
        with self.sessions() as s:
            exp = _experiment(s, exp_id)
            if exp.status not in (ExperimentStatus.FAILED, ExperimentStatus.CANCELLED):
                raise ConflictError(f"experiment {exp_id} is {exp.status}; only failed or cancelled experiments resume")
            exp.status = ExperimentStatus.RUNNING if exp.started_at else ExperimentStatus.PENDING
            exp.error, exp.finished_at, exp.status_detail = None, None, None
            exp.lease_owner, exp.lease_expires_at = None, None
            rnd = s.scalar(select(Round).where(Round.experiment_id == exp_id, Round.index == exp.current_round))
            if rnd is not None:
                for st in rnd.stages:
                    if st.status in (StageStatus.FAILED, StageStatus.RUNNING):
                        st.status, st.attempts = StageStatus.PENDING, 0
            s.commit()
        self.bus.publish({"type": "experiment_resumed", "experiment_id": exp_id})
        return exp

    def delete(self, exp_id: int) -> None:
        """Delete an experiment: its rows and its artifacts. A running one is cancelled first (the orchestrator
        driving it cancels its in-flight worker calls when it sees the experiment gone)."""
        with self.sessions() as s:
            exp = _experiment(s, exp_id)
            if exp.status in ACTIVE:
                exp.status, exp.finished_at, exp.current_stage, exp.status_detail = ExperimentStatus.CANCELLED, utcnow(), None, None
                s.commit()
                self.bus.publish({"type": "experiment_cancelled", "experiment_id": exp_id})
            uid = exp.uid
            s.execute(delete(PoolProblem).where(PoolProblem.experiment_id == exp_id))
            s.delete(exp)
            s.commit()
        remove_experiment_artifacts(self.store, uid)
        self.bus.publish({"type": "experiment_deleted", "experiment_id": exp_id})

    def rounds(self, exp_id: int) -> list[Round]:
        self.get(exp_id)
        with self.sessions() as s:
            rounds = s.scalars(select(Round).where(Round.experiment_id == exp_id).order_by(Round.index)).all()
            for r in rounds:
                r.stages  # load while the session is open
            return list(rounds)

    def _round(self, s, exp_id: int, index: int) -> Round:
        rnd = s.scalar(select(Round).where(Round.experiment_id == exp_id, Round.index == index))
        if rnd is None:
            raise NotFoundError(f"experiment {exp_id} has no round {index}")
        return rnd

    def candidates(self, exp_id: int, index: int, selected: bool | None, offset: int, limit: int):
        self.get(exp_id)
        with self.sessions() as s:
            rnd = self._round(s, exp_id, index)
            q = select(Candidate).where(Candidate.round_id == rnd.id)
            if selected is not None:
                q = q.where(Candidate.selected == selected)
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            items = s.scalars(
                q.order_by(Candidate.rank.is_(None), Candidate.rank, Candidate.problem_id).offset(offset).limit(limit)
            ).all()
            return list(items), total

    def export_rows(self, exp_id: int, round_index: int | None = None):
        """Every candidate of the experiment (or of one round) as tuples in the order of
        exports.CANDIDATE_COLUMNS, by round and rank."""
        self.get(exp_id)
        q = (
            select(
                Round.index, Candidate.problem_id, Candidate.n_responses, Candidate.accuracy, Candidate.mean_reward,
                Candidate.mean_response_length, Candidate.score, Candidate.zero_advantage, Candidate.selected, Candidate.rank,
            )
            .join(Round, Candidate.round_id == Round.id)
            .where(Round.experiment_id == exp_id)
            .order_by(Round.index, Candidate.rank.is_(None), Candidate.rank, Candidate.problem_id)
        )
        if round_index is not None:
            q = q.where(Round.index == round_index)
        with self.sessions() as s:
            return [tuple(r) for r in s.execute(q)]

    def train_steps(self, exp_id: int, index: int) -> list[TrainStep]:
        self.get(exp_id)
        with self.sessions() as s:
            rnd = self._round(s, exp_id, index)
            return list(s.scalars(select(TrainStep).where(TrainStep.round_id == rnd.id).order_by(TrainStep.step)).all())

    def problem(self, exp_id: int, index: int, problem_id: str) -> dict:
        """A candidate's prompt, responses and rewards, read from the round's rollout shards."""
        exp = self.get(exp_id)
        with self.sessions() as s:
            rnd = self._round(s, exp_id, index)
            cand = s.scalar(select(Candidate).where(Candidate.round_id == rnd.id, Candidate.problem_id == problem_id))
            if cand is None:
                raise NotFoundError(f"problem {problem_id!r} is not a candidate of round {index}")
            stage = next((st for st in rnd.stages if st.name == "rollout_train"), None)
            paths = (stage.result or {}).get("paths", []) if stage else []
        pool = load_problems(StoredSpec.model_validate(exp.config).train_dataset_path)
        problem = next((p for p in pool if p.problem_id == problem_id), None)
        responses = [
            {"text": r.text, "reward": r.reward, "correct": r.correct, "n_tokens": len(r.response_ids), "finish_reason": r.finish_reason}
            for path in paths
            for r in read_rollouts(path)
            if r.problem_id == problem_id
        ]
        return {
            "problem_id": problem_id,
            "round": index,
            "prompt": problem.prompt if problem else None,
            "ground_truth": problem.ground_truth if problem else None,
            "data_source": problem.data_source if problem else None,
            "score": cand.score,
            "accuracy": cand.accuracy,
            "selected": cand.selected,
            "rank": cand.rank,
            "responses": responses,
        }


def remove_experiment_artifacts(store: ArtifactStore, uid: str) -> None:
    """Delete the artifact directory of experiment `uid`: renamed aside (atomic), then removed. Safe to repeat."""
    directory = store.experiment_dir(uid)
    if not directory.exists():
        return
    trash = store.root / "trash" / f"{uid}-{random.getrandbits(32):08x}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
    log.info("experiment_artifacts_removed", uid=uid, path=str(directory))


def _experiment(s, exp_id: int) -> Experiment:
    """The experiment row `exp_id` in session `s`; NotFoundError when there is none."""
    exp = s.get(Experiment, exp_id)
    if exp is None:
        raise NotFoundError(f"experiment {exp_id} not found")
    return exp
