"""The scheduler process: FastAPI app + orchestrator thread over one database and event bus."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gradalign_common.logging_setup import configure_logging, get_logger
from services.scheduler.dashboard import router as dashboard_router
from services.scheduler.auth import TokenStore
from services.scheduler.dataset_service import DatasetService
from services.scheduler.db import make_engine, make_session_factory
from services.scheduler.errors import install_error_handlers
from services.scheduler.migrate import upgrade
from services.scheduler.events import make_event_bus
from services.scheduler.experiments import ExperimentService
from services.scheduler.openapi import install_openapi
from services.scheduler.orchestrator import Orchestrator
from services.scheduler.routes import api_router
from services.scheduler.settings import SchedulerSettings
from services.scheduler.suspect_service import SuspectService

log = get_logger("gradalign.scheduler")


def create_app(settings: SchedulerSettings | None = None) -> FastAPI:
    settings = settings or SchedulerSettings()
    engine = make_engine(settings.database_url)
    upgrade(engine)  # idempotent: a database already at head is left as it is
    sessions = make_session_factory(engine)
    bus = make_event_bus(settings.redis_url)
    orchestrator = Orchestrator(settings, sessions, bus)
    shutdown = threading.Event()  # ends open event streams on shutdown

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.run_orchestrator:
            orchestrator.start()
        yield
        shutdown.set()
        orchestrator.stop()
        orchestrator.release_all()
        bus.close()
        engine.dispose()

    # /openapi.json, /docs and /redoc come from services.scheduler.openapi (reads, like the API's GETs)
    app = FastAPI(
        title="GradAlign scheduler", version="0.1.0", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )

    app.add_middleware(NoSniff)
    # built once, kept on app.state; routes receive them through services.scheduler.deps
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.bus = bus
    app.state.orchestrator = orchestrator
    app.state.shutdown = shutdown
    app.state.experiments = ExperimentService(settings, sessions, bus)
    app.state.suspects = SuspectService(settings, sessions, app.state.experiments)
    app.state.tokens = TokenStore(sessions)
    app.state.datasets = DatasetService(settings, sessions)
    if settings.bootstrap_token and not app.state.tokens.ensure("bootstrap", settings.bootstrap_token):
        log.warning("bootstrap_token_revoked", detail="the configured bootstrap token was revoked; it stays revoked")
    app.include_router(api_router)
    app.include_router(dashboard_router)
    install_openapi(app, settings)
    install_error_handlers(app)
    return app


class NoSniff:
    """ASGI middleware: every response says `X-Content-Type-Options: nosniff` (a response is only ever its declared
    type). Pure ASGI, so streamed responses (the event stream) pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def serve(settings: SchedulerSettings) -> None:
    import uvicorn

    configure_logging("scheduler", settings.log_level)
    app = create_app(settings)
    log.info("serving", url=f"http://{settings.host}:{settings.port}")
    uvicorn.run(app, host=settings.host, port=settings.port, **server_options(settings))


def server_options(settings: SchedulerSettings) -> dict:
    """uvicorn's options for the scheduler (also used by tests that serve the app for real)."""
    return dict(
        log_level=settings.log_level.lower(),
        access_log=False,
        # open event streams end on shutdown only once the lifespan's shutdown runs: bound the wait for connections
        timeout_graceful_shutdown=10,
        # the client address (per-client limits, logs) from X-Forwarded-For, when a trusted proxy sent it
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


def main() -> None:
    serve(SchedulerSettings())


if __name__ == "__main__":
    main()
