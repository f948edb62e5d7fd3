"""The scheduler's REST API, one router an area; `api_router` is what the app includes."""

from __future__ import annotations

from fastapi import APIRouter

from services.scheduler.routes import datasets, events, experiments, health, results, suspects

api_router = APIRouter()
for area in (experiments, results, suspects, datasets, events, health):
    api_router.include_router(area.router)
