"""`gradalign db ...` and `gradalign token ...`: administering the scheduler's database."""

from __future__ import annotations

import typer

from gradalign_common.errors import InvalidInputError

db_app = typer.Typer(help="The scheduler's database.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (stored hashed).", no_args_is_help=True)

DATABASE_URL = typer.Option(None, "--database-url", help="default: GRADALIGN_SCHEDULER_DATABASE_URL or SQLite under ~/.gradalign")


def _engine(database_url: str | None):
    from services.scheduler.db import make_engine
    from services.scheduler.settings import SchedulerSettings

    return make_engine(database_url or SchedulerSettings().database_url)


def _tokens(database_url: str | None):
    from services.scheduler.auth import TokenStore
    from services.scheduler.db import make_session_factory
    from services.scheduler.migrate import upgrade

    engine = _engine(database_url)
    upgrade(engine)
    return TokenStore(make_session_factory(engine))


@db_app.command("upgrade")
def db_upgrade(database_url: str = DATABASE_URL, revision: str = typer.Option("head")) -> None:
    """Apply the migrations (idempotent)."""
    from services.scheduler.migrate import current_revision, upgrade

    engine = _engine(database_url)
    upgrade(engine, revision)
    typer.echo(f"database at revision {current_revision(engine)}")


@token_app.command("create")
def token_create(name: str = typer.Option(..., "--name"), database_url: str = DATABASE_URL) -> None:
    """Create a token and print it (it is shown only once)."""
    try:
        typer.echo(_tokens(database_url).create(name))
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


@token_app.command("revoke")
def token_revoke(name: str = typer.Option(..., "--name"), database_url: str = DATABASE_URL) -> None:
    try:
        _tokens(database_url).revoke(name)
    except InvalidInputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {name}")


@token_app.command("list")
def token_list(database_url: str = DATABASE_URL) -> None:
    for name, active in _tokens(database_url).names():
        typer.echo(f"{name}\t{'active' if active else 'revoked'}")
