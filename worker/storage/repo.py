"""Repositories: data access that takes a caller-owned ``Session`` and never commits."""

from __future__ import annotations

from sqlalchemy import exc, select
from sqlalchemy.orm import Session

from worker.errors import Conflict
from worker.storage.models import PrivateKey, RootKey, RootKeyVersion


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
        """Returns the root key or None."""
        stmt = select(RootKey).where(RootKey.id == root_key_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self._db.scalars(stmt).one_or_none()

    def get_version(self, root_key_id: str, version: int) -> RootKeyVersion | None:
        """Returns the version or None."""
        return self._db.get(RootKeyVersion, (root_key_id, version))

    def versions(self, root_key_id: str) -> list[RootKeyVersion]:
        """Returns every version of the root key, oldest first."""
        stmt = select(RootKeyVersion).where(RootKeyVersion.root_key_id == root_key_id).order_by(RootKeyVersion.version)
        return list(self._db.scalars(stmt))

    def list(self) -> list[RootKey]:
        """Returns every root key, oldest first."""
        return list(self._db.scalars(select(RootKey).order_by(RootKey.created_at, RootKey.id)))

    def default_for_pool(self, pool: str) -> RootKey | None:
        """Returns the oldest enabled root key of ``pool``, or None."""
        stmt = (
            select(RootKey)
            .where(RootKey.pool == pool, RootKey.state == "enabled")
            .order_by(RootKey.created_at, RootKey.id)
            .limit(1)
        )
        return self._db.scalars(stmt).first()


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
