"""The service layer behind the API routes: creating, listing and controlling experiments."""

from __future__ import annotations

import random

from sqlalchemy import delete, func, select
from sqlalchemy.orm import sessionmaker

from gradalign_common.datasets import load_problems
from gradalign_common.errors import FieldError, InvalidInputError, NotFoundError
from gradalign_common.modeling import check_model_dir
from gradalign_common.records import read_rollouts
from services.scheduler.bulk import insert_pool
from services.scheduler.datasets import resolve_dataset
from services.scheduler.db import Candidate, Dataset, Experiment, PoolProblem, Round, TrainStep, utcnow
from services.scheduler.events import EventBus
from services.scheduler.schemas import ExperimentCreate
from services.scheduler.settings import SchedulerSettings

TERMINAL = ("completed", "failed", "cancelled")


class ExperimentService:
    def __init__(self, settings: SchedulerSettings, sessions: sessionmaker, bus: EventBus):
        self.settings, self.sessions, self.bus = settings, sessions, bus

    def create(self, body: ExperimentCreate) -> Experiment:
        """Validate what needs the file system (model, datasets, pool size), then store in one transaction."""
        try:
            model_dir = check_model_dir(body.model)
        except InvalidInputError as exc:
            raise FieldError("model", str(exc)) from None
        train_path, pool = self._resolve(body.train_dataset, "train_dataset")
        val_path, _ = self._resolve(body.val_dataset, "val_dataset")
        if body.chunk_size > len(pool):
            raise FieldError("chunk_size", f"chunk_size={body.chunk_size} is larger than the {len(pool)} problems of train_dataset")
        order = [p.problem_id for p in pool]
        random.Random(body.seed).shuffle(order)
        config = body.model_dump()
        config["model"] = str(model_dir)
        config["train_dataset_path"], config["val_dataset_path"] = str(train_path), str(val_path)
        with self.sessions() as s:
            exp = Experiment(
                name=body.name, status="pending", config=config, checkpoint=str(model_dir), pool_size=len(order)
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
        except InvalidInputError as exc:
            raise FieldError(field, str(exc)) from None

    def list(self, status: str | None, offset: int, limit: int) -> tuple[list[Experiment], int]:
        with self.sessions() as s:
            q = select(Experiment)
            if status:
                q = q.where(Experiment.status == status)
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            items = s.scalars(q.order_by(Experiment.id.desc()).offset(offset).limit(limit)).all()
            return list(items), total

    def get(self, exp_id: int) -> Experiment:
        with self.sessions() as s:
            exp = s.get(Experiment, exp_id)
            if exp is None:
                raise NotFoundError(f"experiment {exp_id} not found")
            return exp

    def cancel(self, exp_id: int) -> Experiment:
        with self.sessions() as s:
            exp = s.get(Experiment, exp_id)
            if exp is None:
                raise NotFoundError(f"experiment {exp_id} not found")
            if exp.status in TERMINAL:
                raise InvalidInputError(f"experiment {exp_id} is already {exp.status}")
            exp.status, exp.finished_at, exp.current_stage, exp.status_detail = "cancelled", utcnow(), None, None
            s.commit()
        self.bus.publish({"type": "experiment_cancelled", "experiment_id": exp_id})
        return exp

    def resume(self, exp_id: int) -> Experiment:
        """Put a failed or cancelled experiment back in the queue; it continues at its current stage."""
        with self.sessions() as s:
            exp = s.get(Experiment, exp_id)
            if exp is None:
                raise NotFoundError(f"experiment {exp_id} not found")
            if exp.status not in ("failed", "cancelled"):
                raise InvalidInputError(f"experiment {exp_id} is {exp.status}; only failed or cancelled experiments resume")
            exp.status, exp.error, exp.finished_at, exp.status_detail = "running" if exp.started_at else "pending", None, None, None
            exp.lease_owner, exp.lease_expires_at = None, None
            rnd = s.scalar(select(Round).where(Round.experiment_id == exp_id, Round.index == exp.current_round))
            if rnd is not None:
                for st in rnd.stages:
                    if st.status in ("failed", "running"):
                        st.status, st.attempts = "pending", 0
            s.commit()
        self.bus.publish({"type": "experiment_resumed", "experiment_id": exp_id})
        return exp

    def delete(self, exp_id: int) -> None:
        """Delete an ended experiment's rows (its artifacts stay in the store)."""
        with self.sessions() as s:
            exp = s.get(Experiment, exp_id)
            if exp is None:
                raise NotFoundError(f"experiment {exp_id} not found")
            if exp.status not in TERMINAL:
                raise InvalidInputError(f"experiment {exp_id} is {exp.status}; cancel it before deleting")
            s.execute(delete(PoolProblem).where(PoolProblem.experiment_id == exp_id))
            s.delete(exp)
            s.commit()
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

    EXPORT_COLUMNS = (
        "round", "problem_id", "n_responses", "accuracy", "mean_reward", "mean_response_length",
        "score", "zero_advantage", "selected", "rank",
    )

    def export_rows(self, exp_id: int, round_index: int | None = None):
        """Every candidate of the experiment (or of one round) as tuples of EXPORT_COLUMNS, by round and rank."""
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
        pool = load_problems(exp.config["train_dataset_path"])
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
