"""`gradalign db upgrade` and `gradalign token create/list/revoke`."""

from typer.testing import CliRunner

from gradalign_tools.cli import app
from services.scheduler.auth import TokenStore
from services.scheduler.db import make_engine, make_session_factory
from services.scheduler.migrate import current_revision


def test_db_upgrade_and_tokens(tmp_path, database_url):
    runner = CliRunner()
    res = runner.invoke(app, ["db", "upgrade", "--database-url", database_url])
    assert res.exit_code == 0, res.output
    engine = make_engine(database_url)
    assert current_revision(engine) == "0004"  # the newest migration
    assert runner.invoke(app, ["db", "upgrade", "--database-url", database_url]).exit_code == 0  # idempotent

    res = runner.invoke(app, ["token", "create", "--name", "ci", "--database-url", database_url])
    assert res.exit_code == 0, res.output
    token = res.output.strip().splitlines()[-1]
    store = TokenStore(make_session_factory(engine))
    assert store.is_valid(token) and not store.is_valid(token + "x")
    dup = runner.invoke(app, ["token", "create", "--name", "ci", "--database-url", database_url])
    assert dup.exit_code == 2 and "already exists" in dup.output
    assert "ci\tactive" in runner.invoke(app, ["token", "list", "--database-url", database_url]).output
    assert runner.invoke(app, ["token", "revoke", "--name", "ci", "--database-url", database_url]).exit_code == 0
    assert not store.is_valid(token)
    assert runner.invoke(app, ["token", "revoke", "--name", "nobody", "--database-url", database_url]).exit_code == 2
    engine.dispose()


def test_migrations_match_the_models(tmp_path):
    """The migration chain builds exactly the schema the models declare (no autogenerate diff)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from services.scheduler.db import Base
    from services.scheduler.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
