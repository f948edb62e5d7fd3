"""FastAPI dependencies of the API routes: who may call a route, and the services it works with.

`create_app` builds every service once and keeps it on `app.state`; the providers below hand
them to the routes that declare them (`experiments: ExperimentsDep`). Tests can swap one with
`app.dependency_overrides[get_experiments] = ...`.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import sessionmaker

from services.scheduler.auth import require_reader, require_writer
from services.scheduler.dataset_service import DatasetService
from services.scheduler.discovery import WorkerDiscovery
from services.scheduler.events import EventBus
from services.scheduler.experiments import ExperimentService
from services.scheduler.suspect_service import SuspectService

# route-level `dependencies=`: reads are open unless read_requires_token; writes always need a token
READ_ACCESS = [Depends(require_reader)]
WRITE_ACCESS = [Depends(require_writer)]


def get_experiments(request: Request) -> ExperimentService:
    return request.app.state.experiments


def get_suspects(request: Request) -> SuspectService:
    return request.app.state.suspects


def get_datasets(request: Request) -> DatasetService:
    return request.app.state.datasets


def get_event_bus(request: Request) -> EventBus:
    return request.app.state.bus


def get_shutdown(request: Request) -> threading.Event:
    """Set when the app shuts down: open event streams end."""
    return request.app.state.shutdown


def get_sessions(request: Request) -> sessionmaker:
    return request.app.state.sessions


def get_worker_discovery(request: Request) -> WorkerDiscovery:
    return request.app.state.orchestrator.discovery


ExperimentsDep = Annotated[ExperimentService, Depends(get_experiments)]
SuspectsDep = Annotated[SuspectService, Depends(get_suspects)]
DatasetsDep = Annotated[DatasetService, Depends(get_datasets)]
EventBusDep = Annotated[EventBus, Depends(get_event_bus)]
ShutdownDep = Annotated[threading.Event, Depends(get_shutdown)]
SessionsDep = Annotated[sessionmaker, Depends(get_sessions)]
WorkerDiscoveryDep = Annotated[WorkerDiscovery, Depends(get_worker_discovery)]
