"""What time does by itself (dual control's second control, docs/DUAL_CONTROL.md): a root key with a rotation
period is rotated that long after its last change, by a worker of its pool; a root key version whose destruction
a quorum approved is destroyed once its wait (``destroy_wait_days`` after the approval) has passed, in the
database by a worker of its pool and on every token by that token's workers.

:func:`run` is what a worker's first pool process does every ``KMSQ_SCHEDULE_INTERVAL_SECONDS``
(:class:`Scheduler`), and what ``kmsq root-key run-due`` does once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker import audit_log, policy
from worker.approvals import (
    ApprovalError,
    OperatorSets,
    TimeMade,
    Verified,
    due_at,
    load_operator_sets,
    verify_evidence,
)
from worker.keystore import KeyStore
from worker.lifecycle import rows_using
from worker.periodic import Periodic
from worker.policy_rows import policy_fields
from worker.service import hsm_handle, rotate_root_key
from worker.storage.db import transaction
from worker.storage.models import RootKey, RootKeyVersion
from worker.storage.repo import RootKeyRepository

log = logging.getLogger("kmsq.schedule")
ACTOR = "kmsq:schedule"


@dataclass
class ScheduleRun:
    """What one run did: the root keys it rotated (``root_key:version``, the new one), the versions it destroyed in
    the database (``root_key:version``), those whose HSM objects it destroyed on this token, and what was due but
    not done (the reason)."""

    rotated: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    removed_from_token: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def _verified(hsm: KeyStore, row: RootKey | RootKeyVersion, sets: OperatorSets) -> Verified | None:
    """What the row's evidence says, when its MAC verifies and the operators approved exactly its content."""
    if not policy.verifies(hsm, row):
        return None
    try:
        return verify_evidence(row, row.approval, sets)
    except ApprovalError:
        return None


def run(
    hsm: KeyStore, sessions: sessionmaker[Session], pinned: str, *, pool: str | None = None,
    now: datetime | None = None, removed: set[str] | None = None,
) -> ScheduleRun:  # fmt: skip
    """Rotates ``pool``'s root keys (every pool's when None) whose rotation period has passed since their last
    change, destroys the versions of its root keys whose wait has passed and that no stored row uses, then this
    token's objects of every destroyed version (those not in ``removed``, which it
    adds to: a worker remembers what it removed). Returns what it did."""
    moment = now or datetime.now(UTC)
    done = ScheduleRun()
    with sessions() as db:
        sets = load_operator_sets(db, pinned)
        rotating = select(RootKey.id).where(RootKey.rotation_period_days.is_not(None), RootKey.state == "enabled")
        rotating_ids = list(db.scalars(rotating if pool is None else rotating.where(RootKey.pool == pool)))
    for root_key_id in rotating_ids:
        try:
            with transaction(sessions) as db:
                _rotate_if_due(hsm, db, root_key_id, sets, moment, done)
        except Exception as e:  # one key's failure keeps none of the others from their rotation
            done.kept[root_key_id] = getattr(e, "message", None) or type(e).__name__
            log.error("root key %s was not rotated: %s", root_key_id, done.kept[root_key_id])
    with sessions() as db:
        stmt = select(RootKeyVersion.root_key_id, RootKeyVersion.version).where(
            RootKeyVersion.state == "pending_destroy"
        )
        pending = list(db.execute(stmt))
    for root_key_id, number in pending:
        name = f"{root_key_id}:{number}"
        try:
            with transaction(sessions) as db:
                _destroy_if_due(hsm, db, root_key_id, number, sets, pool, moment, done)
        except Exception as e:  # one version's failure keeps none of the others from their destruction
            done.kept[name] = getattr(e, "message", None) or type(e).__name__
            log.error("version %s was not destroyed: %s", name, done.kept[name])
    seen = removed if removed is not None else set()
    with sessions() as db:
        versions = list(db.scalars(select(RootKeyVersion).where(RootKeyVersion.state == "destroyed")))
        for version in versions:
            name = f"{version.root_key_id}:{version.version}"
            if name in seen or _verified(hsm, version, sets) is None:
                continue
            hsm.destroy_root_key(hsm_handle(version))  # idempotent: nothing to do on a token without it
            seen.add(name)
            done.removed_from_token.append(name)
    return done


def _rotate_if_due(hsm: KeyStore, db: Session, root_key_id: str, sets: OperatorSets, now: datetime,
                   done: ScheduleRun) -> None:  # fmt: skip
    key = RootKeyRepository(db).get(root_key_id, for_update=True)
    if key is None or key.state != "enabled" or key.rotation_period_days is None:
        return
    verified = _verified(hsm, key, sets)
    if verified is None or verified.approved_at is None:
        done.kept[root_key_id] = "its row does not verify (MAC or operators' approval)"
        log.error("root key %s has a rotation period but %s", root_key_id, done.kept[root_key_id])
        return
    if verified.approved_at + timedelta(days=key.rotation_period_days) > now:
        return
    with _time_made(db, sets, now):
        info = rotate_root_key(hsm, db, root_key_id, actor=ACTOR)
    done.rotated.append(f"{root_key_id}:{info.version}")


@contextmanager
def _time_made(db: Session, sets: OperatorSets, now: datetime) -> Iterator[None]:
    """Within it, the rows ``db`` seals get a ``due`` step as evidence (approvals.TimeMade)."""
    previous = db.info.get(policy.AUTHORIZER)
    db.info[policy.AUTHORIZER] = TimeMade(sets, now)
    try:
        yield
    finally:
        db.info[policy.AUTHORIZER] = previous


def _destroy_if_due(
    hsm: KeyStore, db: Session, root_key_id: str, number: int, sets: OperatorSets, pool: str | None,
    now: datetime, done: ScheduleRun,
) -> None:  # fmt: skip
    name = f"{root_key_id}:{number}"
    key = db.get(RootKey, root_key_id)
    version = db.get(RootKeyVersion, (root_key_id, number), with_for_update=True)
    if key is None or version is None or version.state != "pending_destroy" or (pool and key.pool != pool):
        return
    verified = _verified(hsm, version, sets)
    kind, fields = policy_fields(version)
    destroyed = tuple((k, "destroyed" if k == "state" else v) for k, v in fields)
    due = due_at(kind, verified.fields, destroyed, verified.approved_at) if verified is not None else None
    if due is None:
        done.kept[name] = "its row does not verify (MAC or operators' approval)"
        log.error("version %s waits for destruction but %s", name, done.kept[name])
        return
    if due > now:
        return
    used = rows_using(db, root_key_id, number)
    if used:
        done.kept[name] = f"{used} stored row(s) still use it: run `kmsq root-key rewrap {root_key_id}`"
        log.error("version %s is due for destruction but %s", name, done.kept[name])
        return
    version.state = "destroyed"
    with _time_made(db, sets, now):
        policy.seal(hsm, db, version)
    db.flush()
    audit_log.append(hsm, db, key.pool, actor=ACTOR, action="root-key version destroyed", outcome="ok",
                     root_key_id=root_key_id, root_key_version=number,
                     detail=f"its wait of {version.destroy_wait_days} days ended {due.isoformat()}")  # fmt: skip
    hsm.destroy_root_key(hsm_handle(version))  # last: if it fails, the transaction rolls the row and record back
    done.destroyed.append(name)


class Scheduler(Periodic[ScheduleRun]):
    """Runs :func:`run` every ``interval`` seconds (with jitter) in the background of a worker process, until
    :meth:`stop`. A failed run is logged and retried at the next interval."""

    def __init__(self, run_once: Callable[[], ScheduleRun], interval: float) -> None:
        super().__init__("kmsq-schedule", run_once, interval, log, "the schedule's run", _report)


def _report(done: ScheduleRun) -> None:
    if done.rotated or done.destroyed or done.removed_from_token:
        log.info("schedule: rotated %s; versions destroyed %s; removed from this token %s",
                 ", ".join(done.rotated) or "-", ", ".join(done.destroyed) or "-",
                 ", ".join(done.removed_from_token) or "-")  # fmt: skip
