"""The key service built from settings, and :class:`KeyService`: each key operation of ``worker.service`` in
a transaction of its own, for the operator commands, the demo, the benchmark and tests.

The worker pipeline does not use the facade: it calls ``worker.service`` inside the one transaction that
also records the request and its reply.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker import audit_log, fleet, lifecycle, rewrap, service
from worker.config import Settings
from worker.hsm import Hsm
from worker.keystore import KeyStore
from worker.storage.db import create_db_engine, session_factory, transaction

T = TypeVar("T")


def hsm_from_settings(settings: Settings) -> Hsm:
    """Returns an (unopened) HSM adapter for the configured token. Raises ConfigError for a missing library."""
    return Hsm(
        module_path=settings.module_path(),
        token_label=settings.pkcs11_token_label,
        pin=settings.read_pin,
        softhsm2_conf=settings.softhsm2_conf if settings.embedded_hsm else None,
    )


class KeyService:
    """The operations of :mod:`worker.service`, each in its own transaction."""

    def __init__(self, hsm: KeyStore, sessions: sessionmaker[Session], default_pool: str = "default") -> None:
        self.hsm = hsm
        self.sessions = sessions
        self.default_pool = default_pool

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyService:
        """Returns a service on the configured token and database (nothing is opened yet)."""
        return cls(
            hsm_from_settings(settings), session_factory(create_db_engine(settings.database_url)), settings.default_pool
        )

    @property
    def engine(self) -> Engine:
        """The database engine behind the session factory."""
        bind = self.sessions.kw["bind"]
        assert isinstance(bind, Engine)
        return bind

    def _run(self, op: Callable[[Session], T]) -> T:
        with transaction(self.sessions) as db:
            return op(db)

    def create_root_key(self, key_type: str = "aes-256", pool: str | None = None) -> service.RootKeyInfo:
        """See :func:`worker.service.create_root_key`."""
        return self._run(lambda db: service.create_root_key(self.hsm, db, key_type, pool or self.default_pool))

    def rotate_root_key(self, root_key_id: str) -> service.RootKeyInfo:
        """See :func:`worker.service.rotate_root_key`."""
        return self._run(lambda db: service.rotate_root_key(self.hsm, db, root_key_id))

    def rewrap_stored(
        self,
        root_key_id: str,
        *,
        job: str | None = None,
        batch: int = rewrap.DEFAULT_BATCH,
        progress: Callable[[int, int], None] | None = None,
    ) -> rewrap.RewrapSummary:
        """See :func:`worker.rewrap.run_rewrap` (its own transactions, one per batch)."""
        return rewrap.run_rewrap(self.hsm, self.sessions, root_key_id, job=job, batch=batch, progress=progress)

    def set_root_key_state(self, root_key_id: str, state: str) -> service.RootKeyInfo:
        """See :func:`worker.lifecycle.set_root_key_state`."""
        return self._run(lambda db: lifecycle.set_root_key_state(self.hsm, db, root_key_id, state))

    def set_min_decryption_version(self, root_key_id: str, minimum: int) -> service.RootKeyInfo:
        """See :func:`worker.lifecycle.set_min_decryption_version`."""
        return self._run(lambda db: lifecycle.set_min_decryption_version(self.hsm, db, root_key_id, minimum))

    def destroy_root_key_version(
        self, root_key_id: str, version: int, wait_days: int = lifecycle.DEFAULT_DESTROY_WAIT_DAYS
    ) -> service.RootKeyInfo:
        """See :func:`worker.lifecycle.destroy_root_key_version` (it schedules the destruction)."""
        return self._run(lambda db: lifecycle.destroy_root_key_version(self.hsm, db, root_key_id, version, wait_days))

    def set_rotation_period(self, root_key_id: str, days: int | None) -> service.RootKeyInfo:
        """See :func:`worker.lifecycle.set_rotation_period`."""
        return self._run(lambda db: lifecycle.set_rotation_period(self.hsm, db, root_key_id, days))

    def cancel_destroy(self, root_key_id: str, version: int) -> service.RootKeyInfo:
        """See :func:`worker.lifecycle.cancel_destroy`."""
        return self._run(lambda db: lifecycle.cancel_destroy(self.hsm, db, root_key_id, version))

    def set_pool_state(self, pool: str, state: str) -> lifecycle.PoolInfo:
        """See :func:`worker.lifecycle.set_pool_state`."""
        return self._run(lambda db: lifecycle.set_pool_state(self.hsm, db, pool, state))

    def list_pools(self) -> list[lifecycle.PoolInfo]:
        """See :func:`worker.lifecycle.list_pools`."""
        return self._run(lifecycle.list_pools)

    def verify_audit(
        self, pool: str | None = None, since: datetime | None = None, expect: tuple[int, str] | None = None
    ) -> list[audit_log.ChainReport]:
        """Verifies one chain (``pool``) or every chain. See :func:`worker.audit_log.verify`."""

        def run(db: Session) -> list[audit_log.ChainReport]:
            names = [pool] if pool is not None else audit_log.chains(db)
            return [audit_log.verify(self.hsm, db, name, since, expect) for name in names]

        return self._run(run)

    def list_root_keys(self) -> list[service.RootKeyInfo]:
        """See :func:`worker.service.list_root_keys`."""
        return self._run(service.list_root_keys)

    def ensure_fleet_key(self, pool: str | None = None) -> tuple[fleet.FleetPublic, bool]:
        """See :func:`worker.fleet.ensure_fleet_key` (default: the default pool)."""
        return self._run(lambda db: fleet.ensure_fleet_key(self.hsm, db, pool or self.default_pool))

    def fleet_document(self, pools: list[str] | None = None) -> dict[str, Any]:
        """See :func:`worker.fleet.fleet_document`."""
        return self._run(lambda db: fleet.fleet_document(self.hsm, db, self.default_pool, pools))

    def generate_data_key(
        self, root_key_id: str | None = None, key_spec: str = "AES-256", with_plaintext: bool = True
    ) -> service.DataKey:
        """See :func:`worker.service.generate_data_key`."""
        return self._run(
            lambda db: service.generate_data_key(self.hsm, db, root_key_id, key_spec, with_plaintext, self.default_pool)
        )

    def decrypt_data_key(self, encrypted_key: str) -> str:
        """See :func:`worker.service.decrypt_data_key`."""
        return self._run(lambda db: service.decrypt_data_key(self.hsm, db, encrypted_key))

    def store_private_key(
        self,
        *,
        pub: str,
        prv: str,
        coin: str,
        source: str,
        type: str,
        root_key_id: str | None = None,
    ) -> service.StoredPrivateKey:
        """See :func:`worker.service.store_private_key`."""
        return self._run(
            lambda db: service.store_private_key(
                self.hsm,
                db,
                pub=pub,
                prv=prv,
                coin=coin,
                source=source,
                type=type,
                root_key_id=root_key_id,
                pool=self.default_pool,
            )
        )

    def get_private_key(self, pub: str, source: str) -> service.PrivateKeyRecord:
        """See :func:`worker.service.get_private_key`."""
        return self._run(lambda db: service.get_private_key(self.hsm, db, pub, source))
