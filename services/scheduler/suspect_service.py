"""The service behind /api/v1/experiments/{id}/suspects: suspect-reward flags from an experiment's stored candidates.

Nothing new is computed by a worker: every scored round's candidates (score, accuracy, zero
advantage) are read from the database and flagged by gradalign_common.suspects with the rule,
threshold and round count of the request or, by default, of the scheduler's settings
(suspect_rule, suspect_threshold, suspect_min_rounds). Rounds count once their score stage has
succeeded; a round that fell back to random scores (a zero validation gradient) carries no
cosines and is left out (listed in rounds_skipped).

An experiment whose mode scores without an external validation set has no flags: the list
answers 200 with available false and the reason, the export 409 with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from gradalign_common.dataset_records import RecordFormat, subset_records, write_subset
from gradalign_common.errors import ConflictError, FieldError, InvalidInputError, NotFoundError
from gradalign_common.suspects import SUSPECT, WATCH, CandidateSignal, ProblemFlags, alignment_of, flag_rounds, get_rule
from gradalign_common.suspects import unavailable_reason
from services.scheduler.datasets import scrub_paths
from services.scheduler.db import Candidate, Round, Stage
from services.scheduler.experiments import ExperimentService
from services.scheduler.exports import ExportFile
from services.scheduler.settings import SchedulerSettings
from services.scheduler.spec import StoredSpec
from services.scheduler.status import StageStatus

SuspectStatus = Literal["suspect", "watch"]
SuspectSort = Literal["flags", "alignment", "accuracy", "last_round", "problem_id"]
SortOrder = Literal["asc", "desc"]
# each sort key's natural direction: most flagged, most negative alignment, lowest accuracy, latest flag first
NATURAL_ORDER: dict[str, SortOrder] = {"flags": "desc", "alignment": "asc", "accuracy": "asc", "last_round": "desc", "problem_id": "asc"}
MEDIA_TYPES = {"jsonl": "application/jsonl", "parquet": "application/vnd.apache.parquet"}


@dataclass(frozen=True)
class FlagParams:
    """The rule, threshold and round count one request uses (the settings' where it names none)."""

    rule: str
    threshold: float
    min_rounds: int


@dataclass(frozen=True)
class SuspectReport:
    experiment_id: int
    mode: str
    train_dataset_path: str
    params: FlagParams
    reason: str | None  # why there are no flags for this experiment; None when there are
    rounds_used: list[int]
    rounds_skipped: list[int]
    problems: list[ProblemFlags]
    scores: dict[tuple[int, str], float | None]  # (round, problem id) -> the stored score


def _sort_value(p: ProblemFlags, key: str):
    if key == "flags":
        return len(p.flagged_rounds)
    if key == "alignment":
        return p.worst_alignment
    if key == "accuracy":
        return p.mean_accuracy
    if key == "last_round":
        return p.flagged_rounds[-1]
    return p.problem_id


def sort_problems(problems: list[ProblemFlags], sort: str, order: SortOrder | None) -> list[ProblemFlags]:
    """By `sort` in `order` (default: the key's natural direction); ties by problem id, a missing value last."""
    descending = (order or NATURAL_ORDER[sort]) == "desc"
    by_id = sorted(problems, key=lambda p: p.problem_id)
    known = [p for p in by_id if _sort_value(p, sort) is not None]
    missing = [p for p in by_id if _sort_value(p, sort) is None]
    return sorted(known, key=lambda p: _sort_value(p, sort), reverse=descending) + missing


class SuspectService:
    def __init__(self, settings: SchedulerSettings, sessions: sessionmaker, experiments: ExperimentService):
        self.settings, self.sessions, self.experiments = settings, sessions, experiments

    def params(self, rule: str | None, threshold: float | None, min_rounds: int | None) -> FlagParams:
        """The request's parameters over the settings' (a request naming another rule gets that rule's default
        threshold); FieldError naming the query field when the threshold does not fit the rule."""
        rule = rule or self.settings.suspect_rule
        try:
            flag_rule = get_rule(rule)
        except InvalidInputError as exc:
            raise FieldError("rule", str(exc), "query") from None
        if threshold is None and rule == self.settings.suspect_rule and self.settings.suspect_threshold is not None:
            threshold = self.settings.suspect_threshold
        try:
            t = flag_rule.default_threshold if threshold is None else flag_rule.check_threshold(threshold)
        except InvalidInputError as exc:
            raise FieldError("threshold", str(exc), "query") from None
        return FlagParams(flag_rule.name, t, min_rounds or self.settings.suspect_min_rounds)

    def report(self, exp_id: int, params: FlagParams) -> SuspectReport:
        """Every scored round's flags, accumulated per problem."""
        spec = StoredSpec.model_validate(self.experiments.get(exp_id).config)
        mode = spec.mode
        reason = unavailable_reason(mode, params.rule)
        if reason is not None:
            return SuspectReport(exp_id, mode, spec.train_dataset_path, params, reason, [], [], [], {})
        with self.sessions() as s:
            stages = s.execute(
                select(Round.index, Stage.status, Stage.result)
                .join(Stage, Stage.round_id == Round.id)
                .where(Round.experiment_id == exp_id, Stage.name == "score")
            ).all()
            rows = s.execute(
                select(Round.index, Candidate.problem_id, Candidate.score, Candidate.accuracy, Candidate.zero_advantage)
                .join(Round, Candidate.round_id == Round.id)
                .where(Round.experiment_id == exp_id)
            ).all()
        scored = {index for index, status, _ in stages if status == StageStatus.SUCCEEDED}
        skipped = sorted(index for index, status, result in stages if index in scored and (result or {}).get("fallback"))
        used = sorted(scored - set(skipped))
        by_round: dict[int, list[CandidateSignal]] = {index: [] for index in used}
        scores: dict[tuple[int, str], float | None] = {}
        for index, pid, score, accuracy, zero in rows:
            if index in by_round:
                by_round[index].append(CandidateSignal(pid, alignment_of(mode, score, accuracy, zero), accuracy, bool(zero)))
                scores[(index, pid)] = score
        problems = flag_rounds(sorted(by_round.items()), params.rule, params.threshold, params.min_rounds)
        return SuspectReport(exp_id, mode, spec.train_dataset_path, params, None, used, skipped, problems, scores)

    def listing(
        self, exp_id: int, params: FlagParams, status: SuspectStatus | None, sort: SuspectSort, order: SortOrder | None,
        offset: int, limit: int,
    ) -> dict:
        """The body of GET .../suspects (schemas.SuspectList)."""
        report = self.report(exp_id, params)
        counts = {SUSPECT: 0, WATCH: 0}
        for p in report.problems:
            counts[p.status] += 1
        chosen = sort_problems([p for p in report.problems if status is None or p.status == status], sort, order)
        return {
            "experiment_id": exp_id, "mode": report.mode, "available": report.reason is None, "reason": report.reason,
            "rule": params.rule, "threshold": params.threshold, "min_rounds": params.min_rounds,
            "rounds_used": report.rounds_used, "rounds_skipped": report.rounds_skipped, "counts": counts,
            "items": [self._problem_out(report, p) for p in chosen[offset : offset + limit]],
            "total": len(chosen), "offset": offset, "limit": limit,
        }

    def _problem_out(self, report: SuspectReport, p: ProblemFlags) -> dict:
        base = f"/api/v1/experiments/{report.experiment_id}/rounds"
        return {
            "problem_id": p.problem_id, "status": p.status, "rounds_flagged": p.flagged_rounds, "rounds_seen": len(p.evidence),
            "worst_alignment": p.worst_alignment, "mean_accuracy": p.mean_accuracy,
            "evidence": [
                {
                    "round": e.round, "flagged": e.flagged, "score": report.scores.get((e.round, p.problem_id)),
                    "alignment": e.alignment, "z": e.z, "accuracy": e.accuracy, "zero_advantage": e.zero_advantage,
                    "problem_path": f"{base}/{e.round}/problems/{quote(p.problem_id, safe='')}",
                }
                for e in p.evidence
            ],
        }

    def export(self, exp_id: int, params: FlagParams, status: SuspectStatus | None, fmt: RecordFormat) -> ExportFile:
        """The flagged problems' records from the experiment's train dataset file, in that file's own format."""
        report = self.report(exp_id, params)
        if report.reason is not None:
            raise ConflictError(f"no suspect-reward flags for experiment {exp_id}: {report.reason}")
        ids = [p.problem_id for p in report.problems if status is None or p.status == status]
        try:
            content = write_subset(subset_records(report.train_dataset_path, ids), fmt)
        except NotFoundError:
            raise ConflictError(f"experiment {exp_id}'s train dataset file is no longer there") from None
        except InvalidInputError as exc:
            raise ConflictError(scrub_paths(str(exc), self.settings.data_root, self.settings.artifact_root)) from None
        return ExportFile(f"experiment-{exp_id}-suspects.{fmt}", MEDIA_TYPES[fmt], content)
