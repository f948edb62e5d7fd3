"""REST routes of the scheduler: thin wrappers over ExperimentService."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from gradalign_common.errors import FieldError, InvalidInputError, NotFoundError
from gradalign_common.grpc_utils import check_health
from services.scheduler.experiments import ExperimentService
from services.scheduler.schemas import (
    CandidateList,
    CandidateOut,
    ExperimentCreate,
    ExperimentList,
    ExperimentOut,
    RoundOut,
    TrainStepOut,
)

router = APIRouter()


def _service(request: Request) -> ExperimentService:
    return request.app.state.experiments


@router.post("/api/v1/experiments", status_code=201, response_model=ExperimentOut, tags=["experiments"])
def create_experiment(body: ExperimentCreate, request: Request) -> ExperimentOut:
    return ExperimentOut.model_validate(_service(request).create(body))


@router.get("/api/v1/experiments", response_model=ExperimentList, tags=["experiments"])
def list_experiments(
    request: Request,
    status: str | None = Query(default=None, pattern="^(pending|running|completed|failed|cancelled)$"),
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=50, ge=1, le=500),
) -> ExperimentList:
    items, total = _service(request).list(status, offset, limit)
    return ExperimentList(items=[ExperimentOut.model_validate(e) for e in items], total=total, offset=offset, limit=limit)


@router.get("/api/v1/experiments/{experiment_id}", response_model=ExperimentOut, tags=["experiments"])
def get_experiment(experiment_id: int, request: Request) -> ExperimentOut:
    return ExperimentOut.model_validate(_service(request).get(experiment_id))


@router.post("/api/v1/experiments/{experiment_id}/cancel", response_model=ExperimentOut, tags=["experiments"])
def cancel_experiment(experiment_id: int, request: Request) -> ExperimentOut:
    return ExperimentOut.model_validate(_service(request).cancel(experiment_id))


@router.get("/api/v1/experiments/{experiment_id}/rounds", response_model=list[RoundOut], tags=["results"])
def list_rounds(experiment_id: int, request: Request) -> list[RoundOut]:
    return [RoundOut.model_validate(r) for r in _service(request).rounds(experiment_id)]


@router.get("/api/v1/experiments/{experiment_id}/rounds/{round_index}/candidates", response_model=CandidateList, tags=["results"])
def list_candidates(
    experiment_id: int,
    round_index: int,
    request: Request,
    selected: bool | None = None,
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=100, ge=1, le=10_000),
) -> CandidateList:
    items, total = _service(request).candidates(experiment_id, round_index, selected, offset, limit)
    return CandidateList(
        round=round_index, items=[CandidateOut.model_validate(c) for c in items], total=total, offset=offset, limit=limit
    )


@router.get("/api/v1/experiments/{experiment_id}/rounds/{round_index}/train-steps", response_model=list[TrainStepOut], tags=["results"])
def list_train_steps(experiment_id: int, round_index: int, request: Request) -> list[TrainStepOut]:
    return [TrainStepOut.model_validate(t) for t in _service(request).train_steps(experiment_id, round_index)]


@router.get("/healthz", tags=["health"])
def liveness() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
def readiness(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    checks: dict[str, bool] = {}
    try:
        with request.app.state.sessions() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = True
    except Exception:  # noqa: BLE001 - reported as not ready
        checks["database"] = False
    for name, addresses in (
        ("rollout", settings.rollout_addresses),
        ("scoring", settings.scoring_addresses),
        ("trainer", [settings.trainer_address]),
    ):
        for address in addresses:
            checks[f"{name}@{address}"] = check_health(address, timeout=1.0)
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", tags=["health"])
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def install_error_handlers(app) -> None:
    @app.exception_handler(FieldError)
    async def _field_error(_request, exc: FieldError):
        detail = [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(NotFoundError)
    async def _not_found(_request, exc: NotFoundError):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidInputError)
    async def _conflict(_request, exc: InvalidInputError):
        return JSONResponse({"detail": str(exc)}, status_code=409)
