"""Bearer API tokens: stored as SHA-256 hashes, created by `gradalign token create`.

Every mutating request needs a valid token (401 without one, 403 with an unknown or
revoked one); reads need one only when `read_requires_token` is set.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from gradalign_common.errors import InvalidInputError, NotFoundError
from services.scheduler.db import ApiToken, utcnow

bearer = HTTPBearer(auto_error=False, description="API token from `gradalign token create`")
# The same header, read under scheme names of their own: whether these ask for a token is a setting, so
# services.scheduler.openapi turns them into `bearer` or into nothing (CONDITIONAL_TOKEN_SCHEMES).
read_bearer = HTTPBearer(auto_error=False, scheme_name="ReadToken")
metrics_bearer = HTTPBearer(auto_error=False, scheme_name="MetricsToken")
CONDITIONAL_TOKEN_SCHEMES = {"ReadToken": "read_requires_token", "MetricsToken": "metrics_requires_token"}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions

    def create(self, name: str) -> str:
        """Store a new token under `name` and return it (the only time it is shown)."""
        if not name:
            raise InvalidInputError("a token needs a name")
        token = secrets.token_urlsafe(32)
        with self.sessions() as s:
            if s.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
                raise InvalidInputError(f"a token named {name!r} already exists")
            s.add(ApiToken(name=name, token_hash=hash_token(token)))
            s.commit()
        return token

    def ensure(self, name: str, token: str) -> bool:
        """Make `token` valid under `name` (the bootstrap token from settings) unless that very token was revoked:
        a revocation survives restarts; a new token under the name replaces the revoked one. True when valid."""
        digest = hash_token(token)
        with self.sessions() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.name == name))
            if row is None:
                s.add(ApiToken(name=name, token_hash=digest))
            elif row.token_hash != digest:
                row.token_hash, row.revoked_at = digest, None
            elif row.revoked_at is not None:
                return False
            s.commit()
            return True

    def revoke(self, name: str) -> None:
        with self.sessions() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.name == name))
            if row is None:
                raise NotFoundError(f"no token named {name!r}")
            row.revoked_at = utcnow()
            s.commit()

    def names(self) -> list[tuple[str, bool]]:
        with self.sessions() as s:
            return [(t.name, t.revoked_at is None) for t in s.scalars(select(ApiToken).order_by(ApiToken.name))]

    def is_valid(self, token: str) -> bool:
        with self.sessions() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
            return row is not None and row.revoked_at is None


def _check(request: Request, token: str | None) -> None:
    if not request.app.state.settings.auth_enabled:
        return
    if not token:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not request.app.state.tokens.is_valid(token):
        raise HTTPException(403, "invalid or revoked token")


def require_writer(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    _check(request, credentials.credentials if credentials else None)


def require_reader(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(read_bearer)) -> None:
    """Reads (the API's GETs, /openapi.json and the docs) need a token only when `read_requires_token` is set."""
    if request.app.state.settings.read_requires_token:
        _check(request, credentials.credentials if credentials else None)


def require_metrics_reader(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(metrics_bearer)
) -> None:
    """/metrics needs a token only when `metrics_requires_token` is set (Prometheus sends one with `authorization`)."""
    if request.app.state.settings.metrics_requires_token:
        _check(request, credentials.credentials if credentials else None)
