"""Repositories: data access that takes a caller-owned ``Session`` and never commits."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Dialect, Engine, Insert, Table, bindparam, event, exc, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, SessionTransaction

from worker import policy
from worker.errors import Conflict, DatabaseUnavailable
from worker.storage.cache import ROWS, detached_copy
from worker.storage.models import PrivateKey, RequestRecord, RootKey, RootKeyVersion, utcnow

R = TypeVar("R")


def _copy(row: R | None) -> R | None:
    """Caching on: a detached copy (safe to keep across sessions). Off: the session's own object."""
    if row is None or ROWS.ttl <= 0:
        return row
    return detached_copy(row)


class RootKeyRepository:
    """Root keys and their versions."""

    def __init__(self, session: Session) -> None:
        self._db = session

    def add(self, root_key: RootKey, version: RootKeyVersion) -> None:
        """Adds a root key with its first version and flushes."""
        self._db.add(root_key)
        self._db.flush()
        self._db.add(version)
        self._db.flush()

    def add_version(self, root_key: RootKey, version: RootKeyVersion) -> None:
        """Adds a new version, makes it current, and flushes."""
        self._db.add(version)
        root_key.current_version = version.version
        self._db.flush()

    def get(self, root_key_id: str, *, for_update: bool = False) -> RootKey | None:
        """Returns the root key or None (a cached copy in workers, unless ``for_update``)."""

        # The statement is built only on a cache miss: building it costs more than the cache lookup.
        def load() -> RootKey | None:
            stmt = select(RootKey).where(RootKey.id == root_key_id)
            return self._db.scalars(stmt.with_for_update() if for_update else stmt).one_or_none()

        if for_update:
            return load()
        return ROWS.get(("root_key", root_key_id), lambda: _copy(policy.checked(load())))

    def get_version(self, root_key_id: str, version: int) -> RootKeyVersion | None:
        """Returns the version or None (a cached copy in workers)."""
        key = ("root_key_version", root_key_id, version)
        return ROWS.get(key, lambda: _copy(policy.checked(self._db.get(RootKeyVersion, (root_key_id, version)))))

    def versions(self, root_key_id: str) -> list[RootKeyVersion]:
        """Returns every version of the root key, oldest first."""
        stmt = select(RootKeyVersion).where(RootKeyVersion.root_key_id == root_key_id).order_by(RootKeyVersion.version)
        return list(self._db.scalars(stmt))

    def list(self) -> list[RootKey]:
        """Returns every root key, oldest first."""
        return list(self._db.scalars(select(RootKey).order_by(RootKey.created_at, RootKey.id)))

    def default_for_pool(self, pool: str) -> RootKey | None:
        """Returns the oldest enabled root key of ``pool`` that passes the policy check, or None (a cached copy
        in workers): a row slipped in by someone else cannot make itself, or nothing, the pool's default."""

        def load() -> RootKey | None:
            stmt = (
                select(RootKey)
                .where(RootKey.pool == pool, RootKey.state == "enabled")
                .order_by(RootKey.created_at, RootKey.id)
            )
            return next((row for row in self._db.scalars(stmt) if policy.checked(row) is not None), None)

        return ROWS.get(("default_root_key", pool), lambda: _copy(load()))


class PrivateKeyRepository:
    """Stored private keys, unique by (pub, source)."""

    def __init__(self, session: Session) -> None:
        self._db = session

    def get(self, pub: str, source: str) -> PrivateKey | None:
        """Returns the row for (pub, source) or None."""
        stmt = select(PrivateKey).where(PrivateKey.pub == pub, PrivateKey.source == source)
        return self._db.scalars(stmt).one_or_none()

    def exists(self, pub: str, source: str) -> bool:
        """Returns True when a row for (pub, source) exists."""
        stmt = select(PrivateKey.id).where(PrivateKey.pub == pub, PrivateKey.source == source)
        return self._db.scalars(stmt).first() is not None

    @staticmethod
    def conflict() -> Conflict:
        """Returns the error for an existing (pub, source)."""
        return Conflict("a private key for this pub and source already exists")

    def add_many(self, rows: list[tuple[int, PrivateKey]]) -> list[tuple[int, Conflict]]:
        """Inserts ``(index, row)`` pairs in one flush inside a savepoint. If a (pub, source) was taken
        meanwhile, falls back to one savepoint per row. Returns the indexes that conflicted."""
        try:
            with self._db.begin_nested():
                self._db.add_all([row for _, row in rows])
            return []
        except exc.IntegrityError:
            conflicts = []
            for index, row in rows:
                try:
                    with self._db.begin_nested():
                        self._db.add(row)
                except exc.IntegrityError:
                    conflicts.append((index, self.conflict()))
            return conflicts

    def add(self, row: PrivateKey) -> None:
        """Inserts ``row`` inside a savepoint. Raises Conflict if (pub, source) exists; the enclosing
        transaction stays usable."""
        try:
            with self._db.begin_nested():
                self._db.add(row)
        except exc.IntegrityError:
            raise self.conflict() from None


_RECORD_COLUMNS = (
    "caller", "request_id", "request_hash", "op", "status", "error_code", "reply", "created_at", "expires_at",
)  # fmt: skip


@functools.cache
def _record_statement(dialect: str) -> Insert:
    """The request record's ``INSERT … ON CONFLICT DO NOTHING RETURNING``, built once per dialect (building
    it per request was a tenth of a worker's CPU time for single requests)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = cast(Table, RequestRecord.__table__)
    return (
        insert(table)
        .values({name: bindparam(name) for name in _RECORD_COLUMNS})
        .on_conflict_do_nothing(index_elements=["caller", "request_id"])
        .returning(table.c.request_id)
    )


@functools.cache
def _record_sql(dialect: Dialect) -> str:
    """The same statement as SQL text for the driver itself (see RequestRepository.record_alone)."""
    return str(_record_statement(dialect.name).compile(dialect=dialect))


_USED_CONNECTION = "kmsq.used_connection"


@event.listens_for(Session, "after_begin")
def _mark_used(session: Session, _transaction: SessionTransaction, _connection: Any) -> None:
    # Set when the session first runs anything on a connection; never cleared, so a session that ever
    # touched the database always takes the ordinary path in RequestRepository.record_alone.
    session.info[_USED_CONNECTION] = True


class RequestRepository:
    """The request records that make each request's effect happen once."""

    def __init__(self, session: Session) -> None:
        self._db = session

    @staticmethod
    def _values(
        caller: str,
        request_id: str,
        request_hash: str,
        op: str,
        reply: str,
        error_code: str | None,
        expires_at: datetime | None,
    ) -> dict[str, Any]:
        now = utcnow()
        return {
            "caller": caller,
            "request_id": request_id,
            "request_hash": request_hash,
            "op": op,
            "status": "error" if error_code else "ok",
            "error_code": error_code,
            "reply": reply,
            "created_at": now,
            "expires_at": expires_at or now,
        }

    def record(
        self,
        caller: str,
        request_id: str,
        request_hash: str,
        op: str,
        reply: str,
        error_code: str | None = None,
        *,
        expires_at: datetime | None = None,
    ) -> bool:
        """Inserts the request's outcome unless a record exists (``ON CONFLICT DO NOTHING``).

        ``expires_at`` is when the request expires (:func:`worker.retention.record_expiry`; default: now), which
        decides when the record is pruned. Returns False when another delivery recorded it first; the caller
        must then roll back its effects.
        On Postgres a concurrent, uncommitted insert of the same key makes this wait for that transaction.
        """
        values = self._values(caller, request_id, request_hash, op, reply, error_code, expires_at)
        stmt = _record_statement(self._db.get_bind().dialect.name)
        return self._db.connection().execute(stmt, values).first() is not None

    def record_alone(
        self,
        caller: str,
        request_id: str,
        request_hash: str,
        op: str,
        reply: str,
        error_code: str | None = None,
        *,
        expires_at: datetime | None = None,
    ) -> bool:
        """:meth:`record`, committed at once when it is the session transaction's only statement.

        When this session has not run anything on the database yet (no statement, no pending object), the
        record is the transaction's only effect: on Postgres with psycopg it is inserted as one autocommitted
        statement on a pooled connection, one round trip instead of three (``BEGIN``, ``INSERT``, ``COMMIT``)
        and without SQLAlchemy's execution layers (about a quarter of a millisecond of CPU per request).
        The record then stays even if the session later rolls back, so call this only as the transaction's
        last statement. Otherwise it is exactly :meth:`record`.

        Returns False when another delivery recorded it first. Raises DatabaseUnavailable when the database
        connection fails.
        """
        bind = self._db.get_bind()
        untouched = not (self._db.info.get(_USED_CONNECTION) or self._db.new or self._db.dirty or self._db.deleted)
        if not (untouched and isinstance(bind, Engine) and bind.dialect.driver == "psycopg"):
            return self.record(caller, request_id, request_hash, op, reply, error_code, expires_at=expires_at)
        values = self._values(caller, request_id, request_hash, op, reply, error_code, expires_at)
        return _insert_autocommit(bind, values)

    def get(self, caller: str, request_id: str) -> RequestRecord | None:
        """Returns the record of a request, or None."""
        return self._db.get(RequestRecord, (caller, request_id))


def _insert_autocommit(engine: Engine, values: dict[str, Any]) -> bool:
    """Runs the record's insert alone, autocommitted, on a connection of ``engine``'s pool (psycopg).

    Returns True when a row was inserted. Raises DatabaseUnavailable when the connection fails; after any error
    the pool's connection is discarded.
    """
    import psycopg  # only this path needs the driver itself

    try:
        pooled = engine.raw_connection()
    except (exc.OperationalError, exc.InterfaceError, psycopg.OperationalError, psycopg.InterfaceError) as e:
        # Found by kmsq chaos: Postgres restarting refused the new connection, which used to reach the
        # caller as `internal` instead of being retried.
        raise DatabaseUnavailable(f"database unavailable ({type(e).__name__})") from None
    connection = cast(psycopg.Connection[Any], pooled.driver_connection)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(_record_sql(engine.dialect), values)
            inserted = cursor.fetchone() is not None
        connection.autocommit = False
    except BaseException as e:
        pooled.invalidate(e)  # never return a connection in an unknown state (autocommit) to the pool
        if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError):
            raise DatabaseUnavailable(f"database unavailable ({type(e).__name__})") from None
        raise
    finally:
        pooled.close()
    return inserted
