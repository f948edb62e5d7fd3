"""The API's description of itself: /openapi.json (and, when `docs_enabled`, Swagger UI at /docs and ReDoc at
/redoc), served under the same rule as every read, and declaring tokens as the running app asks for them.

Writes always need a bearer token. Reads need one only with `read_requires_token`, /metrics only with
`metrics_requires_token`: their dependencies declare schemes of their own (services.scheduler.auth
CONDITIONAL_TOKEN_SCHEMES), which the schema turns into the bearer scheme or drops, so that it declares a
token, and documents 401/403, exactly on the operations that need one under this app's settings.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from services.scheduler.auth import CONDITIONAL_TOKEN_SCHEMES, bearer, require_reader
from services.scheduler.settings import SchedulerSettings

SCHEMA_URL = "/openapi.json"
BEARER_SCHEME = bearer.scheme_name  # "HTTPBearer"
AUTH_RESPONSES = {"401": "missing bearer token", "403": "invalid or revoked token"}
# FastAPI answers 400 "There was an error parsing the body" to a body that is not text (e.g. not UTF-8)
UNREADABLE_BODY = "the request body cannot be read (e.g. bytes that are not UTF-8)"


def _security(operation: dict, settings: SchedulerSettings) -> list[dict]:
    """The operation's security under these settings: conditional schemes become the bearer scheme or nothing."""
    schemes = set()
    for requirement in operation.get("security", []):
        for name in requirement:
            if name not in CONDITIONAL_TOKEN_SCHEMES or getattr(settings, CONDITIONAL_TOKEN_SCHEMES[name]):
                schemes.add(BEARER_SCHEME)
    return [{BEARER_SCHEME: []}] if schemes and settings.auth_enabled else []


def build_schema(app: FastAPI, settings: SchedulerSettings) -> dict:
    """FastAPI's schema of the app, with bearer security (and its 401/403) on exactly the operations that
    need a token under these settings."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    schemes = components.setdefault("securitySchemes", {})
    for name in CONDITIONAL_TOKEN_SCHEMES:
        schemes.pop(name, None)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    secured = False
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if "requestBody" in operation:
                operation["responses"].setdefault("400", {"description": UNREADABLE_BODY, "content": error})
            security = _security(operation, settings)
            operation.pop("security", None)
            if security:
                secured = True
                operation["security"] = security
                for code, description in AUTH_RESPONSES.items():
                    operation["responses"].setdefault(code, {"description": description, "content": error})
    if not secured:  # auth_enabled is off
        components.pop("securitySchemes")
    return schema


def install_openapi(app: FastAPI, settings: SchedulerSettings) -> None:
    """app.openapi() builds (once) the schema above; /openapi.json and the docs pages are reads. The app must be
    made with openapi_url, docs_url and redoc_url None (FastAPI's own routes for them are open to anyone)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, settings)
        return app.openapi_schema

    app.openapi = openapi
    router = APIRouter(include_in_schema=False, dependencies=[Depends(require_reader)])

    @router.get(SCHEMA_URL)
    def openapi_document(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    if settings.docs_enabled:  # their scripts come from a CDN: off by default

        @router.get("/docs")
        def swagger_ui() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url=SCHEMA_URL, title=f"{app.title} - Swagger UI")

        @router.get("/redoc")
        def redoc() -> HTMLResponse:
            return get_redoc_html(openapi_url=SCHEMA_URL, title=f"{app.title} - ReDoc")

    app.include_router(router)
