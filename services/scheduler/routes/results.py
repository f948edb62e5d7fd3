"""An experiment's results: rounds, candidates (and their export), train steps, one problem's responses."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from services.scheduler.deps import READ_ACCESS, ExperimentsDep
from services.scheduler.errors import EXPERIMENT_NOT_FOUND
from services.scheduler.exports import ExportFormat, candidates_file
from services.scheduler.routes.params import MAX_INT32, ExperimentId, RoundIndex
from services.scheduler.schemas import CandidateList, CandidateOut, ProblemDetail, RoundOut, TrainStepOut

router = APIRouter(
    prefix="/api/v1/experiments/{experiment_id}", tags=["results"], dependencies=READ_ACCESS,
    responses=EXPERIMENT_NOT_FOUND,
)


@router.get("/rounds", response_model=list[RoundOut])
def list_rounds(experiment_id: ExperimentId, experiments: ExperimentsDep) -> list[RoundOut]:
    return [RoundOut.model_validate(r) for r in experiments.rounds(experiment_id)]


@router.get("/rounds/{round_index}/candidates", response_model=CandidateList)
def list_candidates(
    experiment_id: ExperimentId,
    round_index: RoundIndex,
    experiments: ExperimentsDep,
    selected: bool | None = None,
    offset: int = Query(default=0, ge=0, le=MAX_INT32),
    limit: int = Query(default=100, ge=1, le=10_000),
) -> CandidateList:
    items, total = experiments.candidates(experiment_id, round_index, selected, offset, limit)
    return CandidateList(
        round=round_index, items=[CandidateOut.model_validate(c) for c in items], total=total, offset=offset, limit=limit
    )


@router.get("/candidates.{fmt}", response_class=Response)
def export_candidates(
    experiment_id: ExperimentId,
    fmt: ExportFormat,
    experiments: ExperimentsDep,
    round: int | None = Query(default=None, ge=0, le=MAX_INT32, description="one round only"),
) -> Response:
    """Every round's candidates (scores, accuracies, selection) as CSV or parquet."""
    export = candidates_file(experiment_id, experiments.export_rows(experiment_id, round), fmt)
    headers = {"Content-Disposition": f'attachment; filename="{export.filename}"'}
    return Response(export.content, media_type=export.media_type, headers=headers)


@router.get("/rounds/{round_index}/train-steps", response_model=list[TrainStepOut])
def list_train_steps(experiment_id: ExperimentId, round_index: RoundIndex, experiments: ExperimentsDep) -> list[TrainStepOut]:
    return [TrainStepOut.model_validate(t) for t in experiments.train_steps(experiment_id, round_index)]


@router.get("/rounds/{round_index}/problems/{problem_id:path}", response_model=ProblemDetail)
def get_problem(experiment_id: ExperimentId, round_index: RoundIndex, problem_id: str, experiments: ExperimentsDep) -> ProblemDetail:
    return ProblemDetail.model_validate(experiments.problem(experiment_id, round_index, problem_id))
