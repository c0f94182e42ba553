"""Repositories: data access that takes a caller-owned ``Session`` and never commits."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Insert, Table, bindparam, exc, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.errors import Conflict
from worker.storage.models import PrivateKey, RequestRecord, RootKey, RootKeyVersion, utcnow


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
        """Returns the root key or None (locked for the transaction with ``for_update``)."""
        stmt = select(RootKey).where(RootKey.id == root_key_id)
        return self._db.scalars(stmt.with_for_update() if for_update else stmt).one_or_none()

    def get_version(self, root_key_id: str, version: int) -> RootKeyVersion | None:
        """Returns the version or None."""
        return self._db.get(RootKeyVersion, (root_key_id, version))

    def versions(self, root_key_id: str) -> list[RootKeyVersion]:
        """Returns every version of the root key, oldest first."""
        stmt = select(RootKeyVersion).where(RootKeyVersion.root_key_id == root_key_id).order_by(RootKeyVersion.version)
        return list(self._db.scalars(stmt))

    def enabled_in_pool(self, pool: str) -> list[RootKey]:
        """Returns the enabled root keys of ``pool``, oldest first (the first is the pool's default)."""
        stmt = select(RootKey).where(RootKey.pool == pool, RootKey.state == "enabled")
        stmt = stmt.order_by(RootKey.created_at, RootKey.id)
        return list(self._db.scalars(stmt))

    def list(self) -> list[RootKey]:
        """Returns every root key, oldest first."""
        return list(self._db.scalars(select(RootKey).order_by(RootKey.created_at, RootKey.id)))


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
    "keep_until", "keep_key_id", "keep_mac",
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
        stamp: tuple[datetime, str, str] | None,
    ) -> dict[str, Any]:
        now = utcnow()
        keep_until, keep_key_id, keep_mac = stamp if stamp is not None else (None, None, None)
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
            "keep_until": keep_until,
            "keep_key_id": keep_key_id,
            "keep_mac": keep_mac,
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
        stamp: tuple[datetime, str, str] | None = None,
    ) -> bool:
        """Inserts the request's outcome unless a record exists (``ON CONFLICT DO NOTHING``).

        ``expires_at`` is when the request expires (:func:`worker.retention.record_expiry`; default: now);
        ``stamp`` is (keep_until, fleet key id, MAC) from :mod:`worker.record_stamps`, which decides when
        the record is pruned (a record without one is pruned by its signed reply's time). Returns False when
        another delivery recorded it first; the caller must then roll back its effects.
        On Postgres a concurrent, uncommitted insert of the same key makes this wait for that transaction.
        """
        values = self._values(caller, request_id, request_hash, op, reply, error_code, expires_at, stamp)
        stmt = _record_statement(self._db.get_bind().dialect.name)
        return self._db.connection().execute(stmt, values).first() is not None

    def get(self, caller: str, request_id: str) -> RequestRecord | None:
        """Returns the record of a request, or None."""
        return self._db.get(RequestRecord, (caller, request_id))
