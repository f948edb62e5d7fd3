"""Experiments: create, list, get, cancel, resume, delete."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from services.scheduler.deps import READ_ACCESS, WRITE_ACCESS, ExperimentsDep
from services.scheduler.errors import EXPERIMENT_NOT_FOUND, STATUS_CONFLICT
from services.scheduler.routes.params import MAX_INT32, ExperimentId
from services.scheduler.schemas import ExperimentList, ExperimentOut, ExperimentSpec
from services.scheduler.status import ExperimentStatus

router = APIRouter(prefix="/api/v1/experiments", tags=["experiments"])


@router.post("", status_code=201, response_model=ExperimentOut, dependencies=WRITE_ACCESS)
def create_experiment(body: ExperimentSpec, experiments: ExperimentsDep) -> ExperimentOut:
    return ExperimentOut.model_validate(experiments.create(body))


@router.get("", response_model=ExperimentList, dependencies=READ_ACCESS)
def list_experiments(
    experiments: ExperimentsDep,
    status: ExperimentStatus | None = Query(default=None),
    offset: int = Query(default=0, ge=0, le=MAX_INT32),
    limit: int = Query(default=50, ge=1, le=500),
) -> ExperimentList:
    items, total = experiments.list(status, offset, limit)
    return ExperimentList(items=[ExperimentOut.model_validate(e) for e in items], total=total, offset=offset, limit=limit)


@router.get("/{experiment_id}", response_model=ExperimentOut, dependencies=READ_ACCESS, responses=EXPERIMENT_NOT_FOUND)
def get_experiment(experiment_id: ExperimentId, experiments: ExperimentsDep) -> ExperimentOut:
    return ExperimentOut.model_validate(experiments.get(experiment_id))


@router.post(
    "/{experiment_id}/cancel", response_model=ExperimentOut, dependencies=WRITE_ACCESS,
    responses={**EXPERIMENT_NOT_FOUND, **STATUS_CONFLICT},
)
def cancel_experiment(experiment_id: ExperimentId, experiments: ExperimentsDep) -> ExperimentOut:
    return ExperimentOut.model_validate(experiments.cancel(experiment_id))


@router.post(
    "/{experiment_id}/resume", response_model=ExperimentOut, dependencies=WRITE_ACCESS,
    responses={**EXPERIMENT_NOT_FOUND, **STATUS_CONFLICT},
)
def resume_experiment(experiment_id: ExperimentId, experiments: ExperimentsDep) -> ExperimentOut:
    return ExperimentOut.model_validate(experiments.resume(experiment_id))


@router.delete("/{experiment_id}", status_code=204, dependencies=WRITE_ACCESS, responses=EXPERIMENT_NOT_FOUND)
def delete_experiment(experiment_id: ExperimentId, experiments: ExperimentsDep) -> Response:
    """Delete the experiment's rows and artifacts (a running one is cancelled first)."""
    experiments.delete(experiment_id)
    return Response(status_code=204)
