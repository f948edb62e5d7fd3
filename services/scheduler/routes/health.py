"""Probes and metrics, open without a token: liveness, readiness, Prometheus."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.scheduler.deps import SessionsDep, WorkerDiscoveryDep
from services.scheduler.readiness import readiness_checks
from services.scheduler.schemas import ReadinessOut

router = APIRouter(tags=["health"])


@router.get("/healthz")
def liveness() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={200: {"model": ReadinessOut}, 503: {"model": ReadinessOut, "description": "the database or a worker is not reachable"}},
)
def readiness(sessions: SessionsDep, discovery: WorkerDiscoveryDep) -> JSONResponse:
    checks = readiness_checks(sessions, discovery)
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)
