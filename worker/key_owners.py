"""Owners for signing keys generated before owners were kept (``kmsq signing-key adopt``).

Such a key (``private_keys.owner`` empty) signs for every caller allowed to ``sign``. Giving it an owner narrows
that to the owner and the callers its documents grant (worker.signing_policy.check_owner): a tightening, so one
operator's. The owner is part of the key's associated data, so the key is sealed again, in this operator process,
under its root key's current version, and the row updated in the same transaction as its audit record. A key that
has an owner keeps it: giving a key to another caller would let that caller sign, a loosening this command does
not make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker import audit_log, service
from worker.errors import InvalidRequest, NotFound
from worker.keystore import KeyStore
from worker.storage.db import transaction
from worker.storage.models import Caller, PrivateKey

ADOPT_ACTION = "signing key adopted"


@dataclass
class AdoptReport:
    """What :func:`adopt` did: the keys (``pub``, ``source``) it gave the owner, and those it left and why."""

    owner: str
    adopted: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)  # (pub, source, reason)


def ownerless(db: Session, pubs: Sequence[str] | None = None, limit: int = 500) -> list[PrivateKey]:
    """The generated keys without an owner (of ``pubs`` only, when given), at most ``limit``, oldest first."""
    query = select(PrivateKey).where(PrivateKey.exportable.is_(False), PrivateKey.owner.is_(None))
    if pubs is not None:
        query = query.where(PrivateKey.pub.in_(list(pubs)))
    return list(db.scalars(query.order_by(PrivateKey.id).limit(limit)))


def adopt(
    hsm: KeyStore, sessions: sessionmaker[Session], pool: str, owner: str, pubs: Sequence[str] | None = None,
    *, batch: int = 100,
) -> AdoptReport:  # fmt: skip
    """Gives every ownerless generated key (or those of ``pubs``) the registered caller ``owner``, ``batch`` keys
    per transaction, each audited in ``pool``'s chain. Returns the report: a named pub that is no ownerless
    generated key is left with the reason. Raises NotFound for an unknown caller; IntegrityError when a row does
    not open (tampered: nothing of its transaction is changed)."""
    report = AdoptReport(owner)
    with transaction(sessions) as db:
        if db.get(Caller, owner) is None:
            raise NotFound(f"no caller {owner!r} is registered")
        if pubs is not None:
            report.left.extend(_not_adoptable(db, pubs))
    while True:
        with transaction(sessions) as db:
            rows = ownerless(db, pubs, batch)
            for row in rows:
                _reseal(hsm, db, row, owner, pool)
                audit_log.operator_action(hsm, db, pool, ADOPT_ACTION, root_key_id=row.root_key,
                                          root_key_version=row.root_key_version,
                                          detail=f"key {row.pub[:32]} ({row.source}): owner {owner}")  # fmt: skip
        report.adopted.extend((row.pub, row.source) for row in rows)
        if len(rows) < batch:
            return report


def _not_adoptable(db: Session, pubs: Sequence[str]) -> list[tuple[str, str, str]]:
    left = []
    for pub in dict.fromkeys(pubs):
        rows = list(db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)))
        if not rows:
            left.append((pub, "", "no key is stored for this pub"))
        for row in rows:
            if row.exportable:
                left.append((pub, row.source, "a stored key (put_key), which does not sign"))
            elif row.owner is not None:
                left.append((pub, row.source, f"owned by {row.owner} already"))
    return left


def _reseal(hsm: KeyStore, db: Session, row: PrivateKey, owner: str, pool: str) -> None:
    """Seals ``row``'s key again with ``owner`` in its associated data, under its root key's current version."""
    record = service.open_private_key(hsm, db, row)
    try:
        version = service.wrapping_version(db, row.root_key, pool)
    except InvalidRequest as e:
        raise InvalidRequest(f"key {row.pub[:32]}: {e}") from None
    sealed = service.sealed_private_key_row(
        hsm, version, pub=row.pub, prv=record.prv, coin=row.coin, source=row.source, type=row.type,
        exportable=False, owner=owner,
    )  # fmt: skip
    del record
    row.encrypted_prv, row.encrypted_data_key = sealed.encrypted_prv, sealed.encrypted_data_key
    row.root_key_version, row.sealed_version, row.owner = sealed.root_key_version, None, owner
