"""How the service layer's errors become HTTP responses, and how those responses are documented.

- `FieldError` and every other `InvalidInputError`: 422, in FastAPI's validation-error shape
  (`{"detail": [{"loc", "msg", "type"}]}`), `loc` ending with the field where there is one
- `NotFoundError`: 404; `ConflictError` (the resource's state does not allow the request): 409;
  `UploadTooLarge`: 413 -- each `{"detail": message}`
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gradalign_common.errors import ConflictError, FieldError, InvalidInputError, NotFoundError
from services.scheduler.dataset_service import UploadTooLarge
from services.scheduler.schemas import ErrorOut

# OpenAPI `responses=` entries, merged per route (FastAPI documents the 422 of every route with parameters; the
# 401/403 of the operations that need a token are documented by services.scheduler.openapi)
EXPERIMENT_NOT_FOUND = {404: {"model": ErrorOut, "description": "no such experiment, round or problem"}}
DATASET_NOT_FOUND = {404: {"model": ErrorOut, "description": "no such dataset"}}
STATUS_CONFLICT = {409: {"model": ErrorOut, "description": "not allowed in the experiment's current status"}}
NAME_CONFLICT = {409: {"model": ErrorOut, "description": "a dataset of that name already exists"}}
UPLOAD_TOO_LARGE = {413: {"model": ErrorOut, "description": "larger than max_upload_bytes"}}


async def _unprocessable(_request: Request, exc: InvalidInputError) -> JSONResponse:
    loc, message = ([exc.location, exc.field], exc.message) if isinstance(exc, FieldError) else ([], str(exc))
    return JSONResponse({"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}, status_code=422)


async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing the input: a NaN, an infinity or a lone surrogate that was refused cannot be
    written back as JSON (the default handler answered 500 for them)."""
    detail = [
        {"loc": list(e.get("loc", ())), "msg": _printable(str(e.get("msg", ""))), "type": str(e.get("type", "value_error"))}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _message_with_status(status_code: int):
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_code)

    return handler


def install_error_handlers(app: FastAPI) -> None:
    """Starlette picks the handler of the most specific class, so the subclasses below win over InvalidInputError."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(InvalidInputError, _unprocessable)
    app.add_exception_handler(NotFoundError, _message_with_status(404))
    app.add_exception_handler(ConflictError, _message_with_status(409))
    app.add_exception_handler(UploadTooLarge, _message_with_status(413))
