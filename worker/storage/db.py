"""Engine and session factory, and schema migration through Alembic.

An engine belongs to one process: a worker child creates its own after the fork (tasks.worker), so that
parent and child never share a connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.config import redact_url
from worker.errors import ConfigError, DatabaseUnavailable

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling breaks SAVEPOINT; let SQLAlchemy emit BEGIN itself
    # (the recipe in SQLAlchemy's SQLite dialect documentation).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_db_engine(url: str) -> Engine:
    """Returns an engine for ``url``. Raises ConfigError for a malformed URL or a missing driver."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"malformed database URL: {redact_url(url)}") from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": 10}, hide_parameters=True)
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        # No pool_pre_ping: it costs a round trip per transaction (14% of a worker's time on a single
        # request, measured with py-spy). A connection that died since its last use fails its first
        # statement instead; that is DatabaseUnavailable, the task is retried, and SQLAlchemy has by then
        # dropped the pool's dead connections.
        # hide_parameters: a database error's text (logged) never carries a request's values.
        return create_engine(parsed, pool_recycle=1800, connect_args={"connect_timeout": 5}, hide_parameters=True)
    except (NoSuchModuleError, ImportError) as e:
        raise ConfigError(f"no driver for database URL {redact_url(url)}: {e}") from None


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """Yields a session in a transaction that commits on success and rolls back on error.

    Connection-level database failures become DatabaseUnavailable.
    """
    try:
        with sessions.begin() as db:
            yield db
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
        raise DatabaseUnavailable(f"database unavailable ({type(e.orig).__name__})") from None


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Returns a session factory; sessions do not expire objects on commit."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> str | None:
    """Creates or upgrades the schema to the newest migration.

    Returns the revision the database was at before (None for an empty database). Raises
    DatabaseUnavailable when the database cannot be reached.
    """
    try:
        with engine.connect() as conn:
            before = None
            if inspect(conn).has_table("alembic_version"):
                before = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        command.upgrade(_alembic_config(engine), "head")
    except OperationalError as e:
        where = engine.url.render_as_string(hide_password=True)
        raise DatabaseUnavailable(f"database unreachable: {where} ({type(e.orig).__name__})") from None
    return before
