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
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
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
    """Returns an engine for ``url``. Raises ConfigError for a malformed URL or a missing driver (its text
    never shows the URL's password)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(
            f"malformed database URL in KMSQ_DATABASE_URL: {redact_url(url)} (expected "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE or sqlite:///PATH)"
        ) from None
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


def _server(url: URL) -> str:
    """Where the database of ``url`` is: HOST:PORT (libpq's defaults filled in), or the SQLite file."""
    if url.get_backend_name() == "sqlite":
        return f"the SQLite file {url.database or ':memory:'}"
    host = url.host or str(url.query.get("host") or "localhost")
    return f"{host}:{url.port or 5432}"


def _unreachable(url: URL, error: BaseException | None) -> str | None:
    """What a driver's connection error means, said with where, or None when it is none kmsq tells apart.

    psycopg's connection errors carry no SQLSTATE: the text libpq wrote is matched (none of it is quoted:
    the names come from the URL, which the operator wrote)."""
    reason = str(error)
    where = _server(url)
    if url.get_backend_name() == "sqlite":
        if "no such table" in reason:
            return f"{where} has no kmsq schema (run `kmsq init`)"
        if "unable to open database file" in reason:
            return f"cannot open {where}"
        return None
    if "does not exist" in reason and f'database "{url.database}"' in reason:
        return (
            f'database "{url.database}" does not exist on the server at {where} (create it, or correct the '
            "database name in KMSQ_DATABASE_URL)"
        )
    if "does not exist" in reason and "role" in reason:
        return f'the server at {where} has no role "{url.username}" (correct the user in KMSQ_DATABASE_URL)'
    if "authentication failed" in reason:
        return f'the server at {where} refused user "{url.username}" (wrong password in KMSQ_DATABASE_URL?)'
    for needle, why in (
        ("Connection refused", "connection refused: is Postgres running there?"),
        ("timeout expired", "no answer within the connect timeout"),
        ("failed to resolve host", "the host name does not resolve"),
        ("No route to host", "no route to host"),
        ("No such file or directory", "no Unix socket there: is Postgres running?"),
    ):
        if needle in reason:
            return f"cannot reach the database server at {where} ({why})"
    return None


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """Yields a session in a transaction that commits on success and rolls back on error.

    Connection-level database failures become DatabaseUnavailable.
    """
    try:
        with sessions.begin() as db:
            yield db
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
        raise _unavailable(sessions.kw.get("bind"), e) from None


@contextmanager
def autocommit(sessions: sessionmaker[Session]) -> Iterator[Connection]:
    """Yields a connection of ``sessions``' engine in autocommit mode: each statement is its own transaction, one
    round trip (for a statement that must not wait for, or hold its rows during, another transaction).

    Connection-level database failures become DatabaseUnavailable."""
    bind = sessions.kw.get("bind")
    assert isinstance(bind, Engine)
    try:
        with bind.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            yield connection
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
        raise _unavailable(bind, e) from None


def _unavailable(bind: object, error: sa_exc.DBAPIError) -> DatabaseUnavailable:
    """The DatabaseUnavailable of a connection-level failure (its text says why, when the driver's does)."""
    said = _unreachable(bind.url, error.orig) if isinstance(bind, Engine) else None
    return DatabaseUnavailable(f"database unavailable: {said}" if said else
                               f"database unavailable ({type(error.orig).__name__})")  # fmt: skip


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
    DatabaseUnavailable when the database cannot be reached or used, saying which (the server does not
    answer, the database does not exist, the user is refused) and where.
    """
    try:
        with engine.connect() as conn:
            before = None
            if inspect(conn).has_table("alembic_version"):
                before = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        command.upgrade(_alembic_config(engine), "head")
    except OperationalError as e:
        said = _unreachable(engine.url, e.orig)
        if said is None:
            where = redact_url(engine.url.render_as_string(hide_password=True))  # a password in the query too
            said = f"database unreachable: {where} ({type(e.orig).__name__})"
        elif said.startswith("cannot reach"):
            said = f"database unreachable: {said}"
        raise DatabaseUnavailable(said) from None
    return before
