"""Rewrapping under a root key's current version, inside the HSM: the data keys callers hold
(``rewrap_data_keys``) and the rows kmsq stores (``kmsq root-key rewrap``).

Each data key is unwrapped under the version that wrapped it into a sensitive session object, wrapped again
under the current version and destroyed (:meth:`KeyStore.rewrap`): its value never reaches this process.
A stored row keeps its ciphertext; its associated data goes on naming the version it was sealed under
(``sealed_version``, :func:`worker.storage.models.aad_version`).

The stored-row job works in batches, each its own short transaction that locks only its rows (``SKIP
LOCKED`` on Postgres), so workers keep serving ``get_key`` throughout and a job killed at any point loses
nothing: the rows still below the current version are the work left, and running it again finishes it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from schemas.envelope import EncryptedDataKey, FormatError, KeySpec, WrapAlgorithm
from schemas.limits import NAME
from worker import audit_log, policy
from worker.errors import IntegrityError, InvalidRequest, NotFound, PermanentError
from worker.keystore import KeyStore
from worker.service import (
    DIRECT,
    RootKeyAccess,
    VersionCache,
    hsm_handle,
    parse_data_key,
    unwrapping_version,
    wrapping_version,
)
from worker.storage.db import transaction
from worker.storage.models import FleetKey, Job, LegacyRootKey, PrivateKey, RootKeyVersion, aad_version
from worker.storage.repo import RootKeyRepository

SealedRow = PrivateKey | FleetKey | LegacyRootKey
# The tables whose rows hold a data key wrapped by a root key, with the column that identifies a row.
SEALED_TABLES: tuple[tuple[type[SealedRow], Any], ...] = (
    (PrivateKey, PrivateKey.id),
    (FleetKey, FleetKey.pool),
    (LegacyRootKey, LegacyRootKey.id),
)
DEFAULT_BATCH = 500


# -- caller-held data keys ---------------------------------------------------------------------------


def rewrap_data_keys(
    hsm: KeyStore,
    db: Session,
    encrypted_keys: list[str],
    pool: str,
    keys: RootKeyAccess = DIRECT,
) -> list[str | PermanentError]:
    """Returns each ``encryptedKey`` wrapped under its root key's current version (the same string when it
    is current already and unwraps: a tampered one fails even then), or the error of that item:
    IntegrityError (opaque) for anything wrong with the ciphertext or the root key version it names, what
    ``keys.check`` raises, InvalidRequest for a disabled root key. One HSM call per root key."""
    versions: VersionCache = {}
    targets: dict[str, RootKeyVersion | PermanentError] = {}
    outcomes: list[str | PermanentError] = list(encrypted_keys)
    groups: dict[str, list[tuple[int, EncryptedDataKey, RootKeyVersion]]] = {}
    for i, text in enumerate(encrypted_keys):
        try:
            parsed = parse_data_key(text)
            source = _unwrapping(db, parsed, keys, versions)
            if parsed.root_key_id not in targets:
                try:
                    targets[parsed.root_key_id] = wrapping_version(db, parsed.root_key_id, pool, keys.unchecked())
                except PermanentError as e:
                    targets[parsed.root_key_id] = e
            target = targets[parsed.root_key_id]
            if isinstance(target, PermanentError):
                raise target
        except PermanentError as e:  # a transient error (HSM, database) fails the whole request: retried
            outcomes[i] = e
            continue
        # A key under the current version already is checked in the HSM too, and comes back as it was.
        groups.setdefault(target.root_key_id, []).append((i, parsed, source))
    for root_key_id, items in groups.items():
        target = targets[root_key_id]
        assert isinstance(target, RootKeyVersion)
        wrapped = hsm.rewrap([(hsm_handle(source), parsed.wrapped) for _, parsed, source in items], hsm_handle(target))
        for (i, parsed, source), new in zip(items, wrapped, strict=True):
            current = source.version == target.version and new is not None
            outcomes[i] = encrypted_keys[i] if current else _rewrapped_text(parsed, target, new)
    return outcomes


def _unwrapping(db: Session, parsed: EncryptedDataKey, keys: RootKeyAccess, versions: VersionCache) -> RootKeyVersion:
    ref = (parsed.root_key_id, parsed.root_key_version, int(parsed.wrap_algorithm))
    found = versions.get(ref)
    if found is None:
        try:
            found = unwrapping_version(db, parsed.root_key_id, parsed.root_key_version, parsed.wrap_algorithm, keys)
        except PermanentError as e:
            found = e
        versions[ref] = found
    if isinstance(found, PermanentError):
        raise found
    return found


def _rewrapped_text(parsed: EncryptedDataKey, target: RootKeyVersion, new: bytes | None) -> str | PermanentError:
    if new is None:
        return IntegrityError()
    return EncryptedDataKey(
        parsed.key_spec, WrapAlgorithm(target.wrap_algorithm), target.root_key_id, target.version, new
    ).to_text()


# -- stored rows -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewrapFailure:
    """A stored row that could not be rewrapped, and why (never a secret)."""

    table: str
    row: str
    reason: str


@dataclass
class RewrapSummary:
    """What a rewrap job did (this run) and what is left."""

    job: str
    root_key_id: str
    target_version: int
    total: int  # rows below the current version when this run started
    rewrapped: int = 0
    done_before: int = 0  # rows this job rewrapped in earlier runs
    failures: list[RewrapFailure] = field(default_factory=list)
    remaining: int = 0
    elapsed_seconds: float = 0.0


def pending_rows(db: Session, root_key_id: str, below: int) -> int:
    """Returns how many stored rows of ``root_key_id`` are wrapped under a version older than ``below``."""
    total = 0
    for model, _ in SEALED_TABLES:
        stmt = select(func.count()).select_from(model).where(model.root_key == root_key_id)
        total += int(db.scalar(stmt.where(model.root_key_version < below)) or 0)
    return total


def rewrap_stored_batch(
    hsm: KeyStore, db: Session, root_key_id: str, limit: int, skip: set[tuple[str, str]]
) -> tuple[int, list[RewrapFailure], int]:
    """Rewraps up to ``limit`` stored rows of ``root_key_id`` that are below its current version (except those
    in ``skip``, rows that failed earlier in this run) in the open transaction ``db``.

    Returns (rows rewrapped, failures, the target version). Raises NotFound or InvalidRequest for an unknown
    or disabled root key, PolicyViolation for a root key row that fails its policy check.
    """
    key = RootKeyRepository(db).get(root_key_id)
    if key is None:
        raise NotFound(f"no root key {root_key_id!r}")
    policy.require(hsm, key)
    target = wrapping_version(db, root_key_id, key.pool)
    policy.require(hsm, target)
    rewrapped, failures = 0, []
    left = limit
    for model, ident in SEALED_TABLES:
        if left <= 0:
            break
        stmt = (
            select(model)
            .where(model.root_key == root_key_id, model.root_key_version < target.version)
            .order_by(ident)
            .limit(left + len(skip))
            .with_for_update(skip_locked=True)
        )
        found: list[SealedRow] = list(db.scalars(stmt))
        rows = [r for r in found if (r.__tablename__, _ident(r)) not in skip][:left]
        done, failed = _rewrap_rows(hsm, db, rows, target)
        rewrapped += done
        failures += failed
        left -= len(rows)
    if rewrapped or failures:
        audit_log.operator_action(hsm, db, key.pool, "root-key rewrap", root_key_id=root_key_id,
                                  root_key_version=target.version,
                                  detail=f"{rewrapped} rows rewrapped, {len(failures)} failed")  # fmt: skip
    return rewrapped, failures, target.version


def _ident(row: SealedRow) -> str:
    return row.pool if isinstance(row, FleetKey) else str(row.id)


def _source_of(repo: RootKeyRepository, row: SealedRow) -> tuple[EncryptedDataKey, RootKeyVersion] | str:
    """The row's wrapped data key and the version that wrapped it, or why it cannot be rewrapped."""
    try:
        parsed = EncryptedDataKey.from_text(row.encrypted_data_key)
    except FormatError:
        return "its encryptedDataKey is malformed"
    if (parsed.root_key_id, parsed.root_key_version) != (row.root_key, row.root_key_version):
        return "its encryptedDataKey names another root key version than the row"
    if parsed.key_spec is not KeySpec.AES_256:
        return "its encryptedDataKey is not an AES-256 data key"
    source = repo.get_version(row.root_key, row.root_key_version)
    if source is None or source.state != "enabled" or source.wrap_algorithm != int(parsed.wrap_algorithm):
        return f"root key version {row.root_key_version} is not enabled"
    return parsed, source


def _rewrap_rows(
    hsm: KeyStore, db: Session, rows: list[SealedRow], target: RootKeyVersion
) -> tuple[int, list[RewrapFailure]]:
    failures: list[RewrapFailure] = []
    todo: list[tuple[SealedRow, EncryptedDataKey, RootKeyVersion]] = []
    repo = RootKeyRepository(db)
    for row in rows:
        found = _source_of(repo, row)
        if isinstance(found, str):
            failures.append(RewrapFailure(row.__tablename__, _ident(row), found))
        else:
            todo.append((row, *found))
    if not todo:
        return 0, failures
    wrapped = hsm.rewrap([(hsm_handle(source), parsed.wrapped) for _, parsed, source in todo], hsm_handle(target))
    done = 0
    for (row, parsed, _), new in zip(todo, wrapped, strict=True):
        if new is None:
            failures.append(RewrapFailure(row.__tablename__, _ident(row), "its data key does not unwrap (tampered?)"))
            continue
        row.sealed_version = aad_version(row)  # before root_key_version changes
        row.root_key_version = target.version
        row.encrypted_data_key = EncryptedDataKey(
            parsed.key_spec, WrapAlgorithm(target.wrap_algorithm), target.root_key_id, target.version, new
        ).to_text()
        done += 1
    db.flush()
    return done, failures


def new_job_name() -> str:
    """Returns a fresh job name."""
    return "rewrap-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def run_rewrap(
    hsm: KeyStore,
    sessions: sessionmaker[Session],
    root_key_id: str,
    *,
    job: str | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> RewrapSummary:
    """Rewraps every stored row of ``root_key_id`` under its current version, ``batch`` rows per
    transaction, recording the counts under the job's name (``job``, or a new one).

    ``progress(total, handled)`` is called after every batch. Returns the summary. Raises NotFound,
    InvalidRequest (a disabled root key, a bad job name, a job of another root key), PolicyViolation, or
    DatabaseUnavailable / HsmUnavailable (run it again: it continues).
    """
    name = job or new_job_name()
    if not NAME.fullmatch(name):
        raise InvalidRequest("job names are 1-64 characters of a-z, 0-9, '-' and '_'")
    started = datetime.now(UTC)
    with transaction(sessions) as db:
        key = RootKeyRepository(db).get(root_key_id)
        if key is None:
            raise NotFound(f"no root key {root_key_id!r}")
        row = db.get(Job, name, with_for_update=True)
        if row is None:
            row = Job(name=name, kind="rewrap", subject=root_key_id, state="running", done=0, failed=0)
            db.add(row)
        elif (row.kind, row.subject) != ("rewrap", root_key_id):
            raise InvalidRequest(f"job {name!r} is a {row.kind} of {row.subject}, not a rewrap of {root_key_id}")
        row.state, row.updated_at = "running", started
        summary = RewrapSummary(
            name, root_key_id, key.current_version, pending_rows(db, root_key_id, key.current_version),
            done_before=row.done,
        )  # fmt: skip
    skip: set[tuple[str, str]] = set()
    while True:
        with transaction(sessions) as db:
            done, failed, summary.target_version = rewrap_stored_batch(hsm, db, root_key_id, batch, skip)
            skip.update((f.table, f.row) for f in failed)
            summary.rewrapped += done
            summary.failures += failed
            _count(db, name, done, len(summary.failures))
        if progress is not None:
            progress(summary.total, summary.rewrapped + len(summary.failures))
        if done == 0 and not failed:
            break
    with transaction(sessions) as db:
        summary.remaining = pending_rows(db, root_key_id, summary.target_version)
        finished = summary.remaining == 0
        job_row = db.get(Job, name, with_for_update=True)
        assert job_row is not None
        job_row.state = "finished" if finished else "running"
        job_row.finished_at = datetime.now(UTC) if finished else None
    summary.elapsed_seconds = (datetime.now(UTC) - started).total_seconds()
    return summary


def _count(db: Session, name: str, done: int, failed: int) -> None:
    row = db.get(Job, name, with_for_update=True)
    assert row is not None
    row.done += done
    row.failed = failed
    row.updated_at = datetime.now(UTC)
