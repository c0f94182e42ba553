"""A root key's life after it is created and rotated: disable and enable it, raise (or lower) its minimum
decryption version, destroy an old version in the HSM; and a pool's state.

Every change is an operator command: it refuses a row that fails its policy check and seals the row again
after the change (worker.policy), so workers trust it. Workers see a change within ``KMSQ_CACHE_SECONDS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas.limits import NAME
from worker import audit_log, policy
from worker.errors import Conflict, InvalidRequest, NotFound
from worker.keystore import KeyStore
from worker.rewrap import SEALED_TABLES
from worker.service import RootKeyInfo, root_key_info
from worker.storage.models import Pool, RootKey, RootKeyVersion
from worker.storage.repo import RootKeyRepository

STATES = ("enabled", "disabled")


def _root_key_for_update(hsm: KeyStore, db: Session, root_key_id: str) -> RootKey:
    key = RootKeyRepository(db).get(root_key_id, for_update=True)
    if key is None:
        raise NotFound(f"no root key {root_key_id!r}")
    policy.require(hsm, key)
    return key


def set_root_key_state(hsm: KeyStore, db: Session, root_key_id: str, state: str) -> RootKeyInfo:
    """Enables or disables a root key. A disabled one wraps nothing and unwraps nothing (callers get
    ``invalid: root key … is disabled``). Returns its description. Raises NotFound, InvalidRequest,
    PolicyViolation."""
    if state not in STATES:
        raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
    key = _root_key_for_update(hsm, db, root_key_id)
    key.state = state
    policy.seal(hsm, db, key)
    db.flush()
    audit_log.operator_action(hsm, db, key.pool, f"root-key {state[:-1]}", root_key_id=key.id)
    return root_key_info(db, key)


def set_min_decryption_version(hsm: KeyStore, db: Session, root_key_id: str, minimum: int) -> RootKeyInfo:
    """Sets the oldest version whose ciphertexts still decrypt (1 to the current version; not below a
    destroyed version). Returns the description. Raises NotFound, InvalidRequest, PolicyViolation."""
    key = _root_key_for_update(hsm, db, root_key_id)
    if not 1 <= minimum <= key.current_version:
        raise InvalidRequest(f"the minimum decryption version must be 1-{key.current_version} (the current version)")
    retired = [v for v in RootKeyRepository(db).versions(key.id) if v.state != "enabled"]
    if retired and minimum <= max(v.version for v in retired):
        last = max(retired, key=lambda v: v.version)
        said = (
            "is destroyed"
            if last.state == "destroyed"
            else (f"waits for destruction (cancel it first: kmsq root-key cancel-destroy {key.id} {last.version})")
        )
        raise InvalidRequest(f"version {last.version} {said}: the minimum must stay above it")
    key.min_decryption_version = minimum
    policy.seal(hsm, db, key)
    db.flush()
    audit_log.operator_action(hsm, db, key.pool, "root-key set", root_key_id=key.id, root_key_version=minimum,
                              detail=f"min decryption version {minimum}")  # fmt: skip
    return root_key_info(db, key)


MAX_ROTATION_PERIOD_DAYS = 3650


def set_rotation_period(hsm: KeyStore, db: Session, root_key_id: str, days: int | None) -> RootKeyInfo:
    """Gives a root key a rotation period (1-3650 days; None: none): its pool's workers rotate it that long after
    its last change (worker.schedule). One operator may (a rotation grants nobody anything). Returns the
    description. Raises NotFound, InvalidRequest, PolicyViolation."""
    if days is not None and not 1 <= days <= MAX_ROTATION_PERIOD_DAYS:
        raise InvalidRequest(f"a rotation period is 1 to {MAX_ROTATION_PERIOD_DAYS} days")
    key = _root_key_for_update(hsm, db, root_key_id)
    key.rotation_period_days = days
    policy.seal(hsm, db, key)
    db.flush()
    audit_log.operator_action(hsm, db, key.pool, "root-key set", root_key_id=key.id,
                              detail=f"rotation period {days} days" if days else "no rotation period")  # fmt: skip
    return root_key_info(db, key)


def rows_using(db: Session, root_key_id: str, version: int) -> int:
    """Returns how many stored rows (private keys, fleet keys, kept legacy names) are wrapped by the version."""
    total = 0
    for model, _ in SEALED_TABLES:
        stmt = select(func.count()).select_from(model)
        total += int(db.scalar(stmt.where(model.root_key == root_key_id, model.root_key_version == version)) or 0)
    return total


DEFAULT_DESTROY_WAIT_DAYS = 7
MAX_DESTROY_WAIT_DAYS = 90


def destroy_root_key_version(
    hsm: KeyStore, db: Session, root_key_id: str, version: int, wait_days: int = DEFAULT_DESTROY_WAIT_DAYS
) -> RootKeyInfo:
    """Schedules the destruction of a version's HSM objects, for good: only a version below the minimum
    decryption version that no stored row uses. It waits ``wait_days`` (1-90) after the operators' approval in
    state ``pending_destroy``, when any one operator can cancel it (:func:`cancel_destroy`); then the workers
    destroy it (worker.schedule). Its row stays, marked ``destroyed``. Returns the description.

    Raises NotFound, InvalidRequest (not below the minimum, already destroyed or waiting, a wait out of range;
    the message says what to do), Conflict (still used), PolicyViolation, QuorumRequired.
    """
    if not 1 <= wait_days <= MAX_DESTROY_WAIT_DAYS:
        raise InvalidRequest(f"the wait before a destruction is 1 to {MAX_DESTROY_WAIT_DAYS} days")
    key, row = _version_for_update(hsm, db, root_key_id, version)
    if row.state != "enabled":
        raise InvalidRequest(f"version {version} of {root_key_id} is {row.state.replace('_', ' ')} already")
    if version >= key.min_decryption_version:
        raise InvalidRequest(
            f"version {version} is not below the minimum decryption version {key.min_decryption_version}: "
            f"run `kmsq root-key set {root_key_id} --min-decryption-version {version + 1}` first"
        )
    used = rows_using(db, root_key_id, version)
    if used:
        raise Conflict(
            f"{used} stored row(s) still use version {version}: run `kmsq root-key rewrap {root_key_id}` first"
        )
    row.state, row.destroy_wait_days = "pending_destroy", wait_days
    policy.seal(hsm, db, row)
    db.flush()
    audit_log.operator_action(hsm, db, key.pool, "root-key destroy-version", root_key_id=key.id,
                              root_key_version=version,
                              detail=f"scheduled: after a wait of {wait_days} days")  # fmt: skip
    return root_key_info(db, key)


def cancel_destroy(hsm: KeyStore, db: Session, root_key_id: str, version: int) -> RootKeyInfo:
    """Cancels a version's pending destruction (one operator may, alone): the version is as it was. Returns the
    description. Raises NotFound, InvalidRequest (not waiting for destruction), PolicyViolation."""
    key, row = _version_for_update(hsm, db, root_key_id, version)
    if row.state != "pending_destroy":
        raise InvalidRequest(f"version {version} of {root_key_id} is not waiting for destruction ({row.state})")
    row.state, row.destroy_wait_days = "enabled", None
    policy.seal(hsm, db, row)
    db.flush()
    audit_log.operator_action(hsm, db, key.pool, "root-key cancel-destroy", root_key_id=key.id,
                              root_key_version=version)  # fmt: skip
    return root_key_info(db, key)


def _version_for_update(hsm: KeyStore, db: Session, root_key_id: str, version: int) -> tuple[RootKey, RootKeyVersion]:
    key = _root_key_for_update(hsm, db, root_key_id)
    row = RootKeyRepository(db).get_version(root_key_id, version)
    if row is None:
        raise NotFound(f"root key {root_key_id} has no version {version}")
    policy.require(hsm, row)
    return key, row


# -- pools ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolInfo:
    """A pool as operators see it."""

    name: str
    state: str
    root_keys: int
    updated_at: datetime | None


def set_pool_state(hsm: KeyStore, db: Session, name: str, state: str) -> PoolInfo:
    """Enables or disables a pool: the workers of a disabled pool refuse its requests (``invalid: pool …
    is disabled``, stored like any refusal). Returns the pool. Raises InvalidRequest, PolicyViolation."""
    if state not in STATES:
        raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
    if not NAME.fullmatch(name):
        raise InvalidRequest("pool names are 1-64 characters of a-z, 0-9, '-' and '_'")
    row = db.get(Pool, name, with_for_update=True)
    if row is None:
        row = Pool(name=name, state=state)
        db.add(row)
    else:
        policy.require(hsm, row)
        row.state = state
    row.updated_at = datetime.now(UTC)
    policy.seal(hsm, db, row)
    db.flush()
    audit_log.operator_action(hsm, db, name, f"pool {state[:-1]}")
    return _pool_info(db, row.name, row)


def list_pools(db: Session) -> list[PoolInfo]:
    """Returns every pool that has a root key or a row of its own, by name."""
    names = set(db.scalars(select(RootKey.pool))) | set(db.scalars(select(Pool.name)))
    return [_pool_info(db, name, db.get(Pool, name)) for name in sorted(names)]


def _pool_info(db: Session, name: str, row: Pool | None) -> PoolInfo:
    count = int(db.scalar(select(func.count()).select_from(RootKey).where(RootKey.pool == name)) or 0)
    return PoolInfo(name, row.state if row is not None else "enabled", count, row.updated_at if row else None)
