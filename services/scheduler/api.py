"""REST routes of the scheduler: thin wrappers over ExperimentService."""

from __future__ import annotations

import csv
import io
import json
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from gradalign_common.errors import FieldError, InvalidInputError, NotFoundError
from gradalign_common.grpc_utils import check_health
from services.scheduler.auth import require_reader, require_writer
from services.scheduler.dataset_service import DatasetService, UploadTooLarge
from services.scheduler.events import iter_events
from services.scheduler.experiments import ExperimentService
from services.scheduler.status import ExperimentStatus
from services.scheduler.schemas import (
    CandidateList,
    CandidateOut,
    DatasetMix,
    DatasetOut,
    DatasetRegister,
    ExperimentSpec,
    ExperimentList,
    ErrorOut,
    ExperimentOut,
    ProblemDetail,
    ReadinessOut,
    RoundOut,
    TrainStepOut,
)

ExperimentId = Annotated[int, Path(ge=1, le=2**31 - 1)]
RoundIndex = Annotated[int, Path(ge=0, le=2**31 - 1)]
ERRORS = {
    401: {"model": ErrorOut, "description": "missing bearer token"},
    403: {"model": ErrorOut, "description": "invalid or revoked token"},
    404: {"model": ErrorOut, "description": "no such experiment, round or problem"},
}
router = APIRouter()
read = APIRouter(dependencies=[Depends(require_reader)], responses=ERRORS)
write = APIRouter(
    dependencies=[Depends(require_writer)],
    responses={**ERRORS, 409: {"model": ErrorOut, "description": "not allowed in the experiment's current status"}},
)


def _service(request: Request) -> ExperimentService:
    return request.app.state.experiments


@write.post("/api/v1/experiments", status_code=201, response_model=ExperimentOut, tags=["experiments"])
def create_experiment(body: ExperimentSpec, request: Request) -> ExperimentOut:
    return ExperimentOut.model_validate(_service(request).create(body))


@read.get("/api/v1/experiments", response_model=ExperimentList, tags=["experiments"])
def list_experiments(
    request: Request,
    status: ExperimentStatus | None = Query(default=None),
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    limit: int = Query(default=50, ge=1, le=500),
) -> ExperimentList:
    items, total = _service(request).list(status, offset, limit)
    return ExperimentList(items=[ExperimentOut.model_validate(e) for e in items], total=total, offset=offset, limit=limit)


@read.get("/api/v1/experiments/{experiment_id}", response_model=ExperimentOut, tags=["experiments"])
def get_experiment(experiment_id: ExperimentId, request: Request) -> ExperimentOut:
    return ExperimentOut.model_validate(_service(request).get(experiment_id))


@write.post("/api/v1/experiments/{experiment_id}/cancel", response_model=ExperimentOut, tags=["experiments"])
def cancel_experiment(experiment_id: ExperimentId, request: Request) -> ExperimentOut:
    return ExperimentOut.model_validate(_service(request).cancel(experiment_id))


@write.post("/api/v1/experiments/{experiment_id}/resume", response_model=ExperimentOut, tags=["experiments"])
def resume_experiment(experiment_id: ExperimentId, request: Request) -> ExperimentOut:
    return ExperimentOut.model_validate(_service(request).resume(experiment_id))


@write.delete("/api/v1/experiments/{experiment_id}", status_code=204, tags=["experiments"])
def delete_experiment(experiment_id: ExperimentId, request: Request) -> Response:
    _service(request).delete(experiment_id)
    return Response(status_code=204)


@read.get("/api/v1/experiments/{experiment_id}/rounds", response_model=list[RoundOut], tags=["results"])
def list_rounds(experiment_id: ExperimentId, request: Request) -> list[RoundOut]:
    return [RoundOut.model_validate(r) for r in _service(request).rounds(experiment_id)]


@read.get("/api/v1/experiments/{experiment_id}/rounds/{round_index}/candidates", response_model=CandidateList, tags=["results"])
def list_candidates(
    experiment_id: ExperimentId,
    round_index: RoundIndex,
    request: Request,
    selected: bool | None = None,
    offset: int = Query(default=0, ge=0, le=2**31 - 1),
    limit: int = Query(default=100, ge=1, le=10_000),
) -> CandidateList:
    items, total = _service(request).candidates(experiment_id, round_index, selected, offset, limit)
    return CandidateList(
        round=round_index, items=[CandidateOut.model_validate(c) for c in items], total=total, offset=offset, limit=limit
    )


@read.get("/api/v1/experiments/{experiment_id}/candidates.{fmt}", tags=["results"], response_class=Response)
def export_candidates(
    experiment_id: ExperimentId,
    fmt: Literal["csv", "parquet"],
    request: Request,
    round: int | None = Query(default=None, ge=0, le=2**31 - 1, description="one round only"),
) -> Response:
    """Every round's candidates (scores, accuracies, selection) as CSV or parquet."""
    service = _service(request)
    rows = service.export_rows(experiment_id, round)
    columns = service.EXPORT_COLUMNS
    name = f"experiment-{experiment_id}-candidates.{fmt}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows(rows)
        return Response(buf.getvalue(), media_type="text/csv", headers=headers)
    table = pa.Table.from_pylist([dict(zip(columns, r)) for r in rows], schema=EXPORT_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return Response(sink.getvalue(), media_type="application/vnd.apache.parquet", headers=headers)


EXPORT_SCHEMA = pa.schema(
    [
        ("round", pa.int32()), ("problem_id", pa.string()), ("n_responses", pa.int32()), ("accuracy", pa.float64()),
        ("mean_reward", pa.float64()), ("mean_response_length", pa.float64()), ("score", pa.float64()),
        ("zero_advantage", pa.bool_()), ("selected", pa.bool_()), ("rank", pa.int32()),
    ]
)


@read.get("/api/v1/experiments/{experiment_id}/rounds/{round_index}/train-steps", response_model=list[TrainStepOut], tags=["results"])
def list_train_steps(experiment_id: ExperimentId, round_index: RoundIndex, request: Request) -> list[TrainStepOut]:
    return [TrainStepOut.model_validate(t) for t in _service(request).train_steps(experiment_id, round_index)]


@read.get(
    "/api/v1/experiments/{experiment_id}/rounds/{round_index}/problems/{problem_id}", response_model=ProblemDetail, tags=["results"]
)
def get_problem(experiment_id: ExperimentId, round_index: RoundIndex, problem_id: str, request: Request) -> ProblemDetail:
    return ProblemDetail.model_validate(_service(request).problem(experiment_id, round_index, problem_id))


@read.get("/api/v1/events", tags=["events"], response_class=StreamingResponse)
def stream_events(request: Request, experiment_id: int | None = None) -> StreamingResponse:
    """Server-sent events: stage transitions and progress (all experiments, or one)."""
    bus = request.app.state.bus
    stop = request.app.state.shutdown

    def generate():
        sub = bus.subscribe()
        try:
            yield ": connected\n\n"
            for event in iter_events(sub, stop, timeout=1.0):
                if event is None:
                    yield ": keep-alive\n\n"
                elif experiment_id is None or event.get("experiment_id") == experiment_id:
                    yield f"event: {event.get('type', 'message')}\ndata: {json.dumps(event, default=str)}\n\n"
        finally:
            sub.close()

    return StreamingResponse(generate(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _datasets(request: Request) -> DatasetService:
    return request.app.state.datasets


@write.post("/api/v1/datasets/upload", status_code=201, response_model=DatasetOut, tags=["datasets"],
            responses={413: {"model": ErrorOut, "description": "larger than max_upload_bytes"}})
async def upload_dataset(
    request: Request,
    name: str = Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$"),
    format: Literal["jsonl", "parquet"] = Query(description="format of the request body"),
) -> DatasetOut:
    """Upload a dataset file as the raw request body (streamed; VERL-style records)."""
    return DatasetOut.model_validate(await _datasets(request).upload(name, format, request.stream()))


@write.post("/api/v1/datasets/register", status_code=201, response_model=DatasetOut, tags=["datasets"])
def register_dataset(body: DatasetRegister, request: Request) -> DatasetOut:
    """Import a file that lies under the scheduler's data root."""
    return DatasetOut.model_validate(_datasets(request).register(body.name, body.path))


@write.post("/api/v1/datasets/mix", status_code=201, response_model=DatasetOut, tags=["datasets"])
def mix_datasets(body: DatasetMix, request: Request) -> DatasetOut:
    """A new dataset of `count` problems from each registered dataset (0: all), shuffled with `seed`."""
    return DatasetOut.model_validate(_datasets(request).mix(body.name, [(s.dataset, s.count) for s in body.sources], body.seed))


@read.get("/api/v1/datasets", response_model=list[DatasetOut], tags=["datasets"])
def list_datasets(request: Request) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in _datasets(request).list()]


@read.get("/api/v1/datasets/{name}", response_model=DatasetOut, tags=["datasets"])
def get_dataset(name: str, request: Request) -> DatasetOut:
    return DatasetOut.model_validate(_datasets(request).get(name))


@router.get("/healthz", tags=["health"])
def liveness() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    responses={200: {"model": ReadinessOut}, 503: {"model": ReadinessOut, "description": "the database or a worker is not reachable"}},
)
def readiness(request: Request) -> JSONResponse:
    checks: dict[str, bool] = {}
    try:
        with request.app.state.sessions() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = True
    except Exception:  # noqa: BLE001 - reported as not ready
        checks["database"] = False
    discovered = request.app.state.orchestrator.discovery.addresses()
    for name in ("rollout", "scoring", "trainer"):
        addresses = discovered.get(name) or []
        if not addresses:
            checks[f"{name}@<none ready>"] = False
        for address in addresses:
            checks[f"{name}@{address}"] = check_health(address, timeout=1.0)
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", tags=["health"], response_class=PlainTextResponse)
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


router.include_router(read)
router.include_router(write)


def install_error_handlers(app) -> None:
    @app.exception_handler(FieldError)
    async def _field_error(_request, exc: FieldError):
        detail = [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(UploadTooLarge)
    async def _too_large(_request, exc: UploadTooLarge):
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(NotFoundError)
    async def _not_found(_request, exc: NotFoundError):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidInputError)
    async def _conflict(_request, exc: InvalidInputError):
        return JSONResponse({"detail": str(exc)}, status_code=409)
