"""Probes and metrics: liveness and readiness, open without a token; Prometheus, open unless `metrics_requires_token`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.scheduler.auth import require_metrics_reader
from services.scheduler.deps import SessionsDep, WorkerDiscoveryDep
from services.scheduler.readiness import readiness_checks
from services.scheduler.schemas import ReadinessOut

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def liveness() -> dict:
    """Async: answered on the event loop, never waiting for a thread of the request pool."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={200: {"model": ReadinessOut}, 503: {"model": ReadinessOut, "description": "the database is not reachable"}},
)
def readiness(sessions: SessionsDep, discovery: WorkerDiscoveryDep) -> JSONResponse:
    """Ready means "can serve the API": the database answers. Each worker's health is reported in `checks`, not
    gated on, so a pending GPU pod or a restarting trainer does not take the API and the dashboard out of service."""
    checks = readiness_checks(sessions, discovery)
    ready = checks["database"]
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_metrics_reader)])
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)
