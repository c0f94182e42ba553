"""The token's signing keys (``generate_signing_key`` with ``in_hsm``) that no row names, and their removal:
``kmsq signing-key orphans``.

Only its ``private_keys`` row names a token key, and only inside the sealed ``prv`` (``pkcs11-ec:<label>``,
:func:`worker.signing.token_key_reference`): so every row that may hold one (a generated key, not exportable, of
an ETH-like coin) is opened in the HSM, in batches of its own transaction, to learn its label. The opened text is
compared with that prefix in its wiped buffer; a generated key's xprv is never decoded here.

A key a worker is making right now is not named by a committed row yet. So removal looks twice: the token's keys
first, then the rows, then, after ``grace`` seconds, the rows committed since (every row the first pass did not
see), and removes only a key neither pass found named. A worker holds its transaction open from making a key to
committing its row for one request (milliseconds; seconds under load): a grace of 30 seconds covers it. A row
that cannot be opened (a tampered row, a destroyed root key version, a disabled root key) might name any key:
nothing is removed then. Nor when the token serves another kmsq database too (it holds another database's policy
anchor, ``worker.policy_anchor``): that database's rows name keys this one cannot see. (A token shared with a
database that has no anchor, from before migration 0013, cannot be told apart.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from schemas.coins import signing_family
from schemas.envelope import FORMAT_VERSION
from worker import audit_log, policy_anchor, service, signing
from worker.errors import Conflict, IntegrityError, InvalidRequest, NotFound, VersionBelowMinimum
from worker.keystore import KeyStore
from worker.storage.db import transaction
from worker.storage.models import PrivateKey

LABEL_PREFIX = "kmsq-ec-"  # the labels signing.token_key_id makes; the token's other EC keys are not kmsq's
DEFAULT_GRACE_SECONDS = 30
DEFAULT_BATCH = 500
REMOVE_ACTION = "signing-key remove-orphan"
_REFERENCE = signing.IN_HSM_PREFIX.encode("ascii")


@dataclass(frozen=True)
class UnreadableRow:
    """A row that may name a token key but could not be opened."""

    row: int
    pub: str  # its first characters
    source: str
    reason: str


@dataclass
class Survey:
    """The token's signing keys against the rows that name them."""

    token_keys: list[str]  # the token's kmsq-ec-* labels
    other_databases: list[str]  # the scopes of the other kmsq databases whose policy anchors the token holds
    named: set[str] = field(default_factory=set)  # labels rows name (present in the token or not)
    seen: set[int] = field(default_factory=set)  # ids of the rows read
    unreadable: list[UnreadableRow] = field(default_factory=list)

    @property
    def orphans(self) -> list[str]:
        """The token's keys no row read names."""
        return [label for label in self.token_keys if label not in self.named]

    @property
    def missing(self) -> list[str]:
        """Labels a row names that the token does not have (that key cannot sign)."""
        return sorted(self.named - set(self.token_keys))


@dataclass(frozen=True)
class OrphanReport:
    """What ``kmsq signing-key orphans`` found, and with ``--remove`` removed."""

    token_keys: int
    named: int  # of the token's keys
    other_databases: int  # the token serves them too: their keys show as orphans here
    orphans: list[str]
    missing: list[str]
    unreadable: list[UnreadableRow]
    removed: list[str]


def survey(hsm: KeyStore, sessions: sessionmaker[Session], *, batch: int = DEFAULT_BATCH) -> Survey:
    """Returns the token's signing keys (read again first) and the labels the rows name."""
    with transaction(sessions) as db:
        mine = policy_anchor.deployment_id(db)
    others = [scope for scope in hsm.policy_anchor_scopes() if scope != mine]
    found = Survey(sorted(label for label in hsm.ec_signing_keys() if label.startswith(LABEL_PREFIX)), others)
    read_rows(hsm, sessions, found, batch=batch)
    return found


def read_rows(hsm: KeyStore, sessions: sessionmaker[Session], into: Survey, *, batch: int = DEFAULT_BATCH) -> None:
    """Adds to ``into`` the labels named by the rows it has not seen: every generated key's row (``exportable``
    false) of an ETH-like coin, opened in the HSM, ``batch`` rows per transaction. Raises TransientError."""
    after = 0
    while True:
        with transaction(sessions) as db:
            query = select(PrivateKey).where(PrivateKey.exportable.is_(False), PrivateKey.id > after)
            rows = db.scalars(query.order_by(PrivateKey.id).limit(batch)).all()
            for row in rows:
                if row.id in into.seen:
                    continue
                into.seen.add(row.id)
                if signing_family(row.coin) != "eth":  # a token key is made for ETH-like coins only
                    continue
                try:
                    label = _reference(hsm, db, row)
                except (IntegrityError, InvalidRequest, NotFound, VersionBelowMinimum) as e:  # this row's
                    into.unreadable.append(UnreadableRow(row.id, row.pub[:24], row.source, e.message))
                    continue
                if label is not None:
                    into.named.add(label)
        if len(rows) < batch:
            return
        after = rows[-1].id


def _reference(hsm: KeyStore, db: Session, row: PrivateKey) -> str | None:
    """The label of the token key ``row`` refers to, or None when it holds an xprv. Raises IntegrityError (a row
    that does not authenticate) or what opening it under its root key raises (NotFound, VersionBelowMinimum)."""
    if row.format_version != FORMAT_VERSION:
        raise IntegrityError()
    context = service.context_of(row)
    with service.open_under_root_key(
        hsm, db, row.root_key, row.root_key_version, row.encrypted_prv, row.encrypted_data_key,
        context.associated_data,
    ) as plaintext:  # fmt: skip
        opened = plaintext.view()
        if opened[: len(_REFERENCE)] != _REFERENCE:
            return None
        try:
            return opened[len(_REFERENCE) :].decode("ascii")
        except UnicodeDecodeError:
            return None


def find_orphans(hsm: KeyStore, sessions: sessionmaker[Session], *, batch: int = DEFAULT_BATCH) -> OrphanReport:
    """Returns the token's signing keys no row names now (a key a worker is making right now among them)."""
    return _report(survey(hsm, sessions, batch=batch), [])


def remove_orphans(
    hsm: KeyStore,
    sessions: sessionmaker[Session],
    pool: str,
    *,
    grace: float = DEFAULT_GRACE_SECONDS,
    batch: int = DEFAULT_BATCH,
    sleep: Callable[[float], None] = time.sleep,
) -> OrphanReport:
    """Destroys the token's signing keys that no row names, twice looked for ``grace`` seconds apart (see the
    module docstring), each with an operator record in ``pool``'s audit chain.

    Returns what was found and removed. Raises Conflict, removing nothing, when the token serves another kmsq
    database too or a row that may name a token key cannot be opened; TransientError."""
    found = survey(hsm, sessions, batch=batch)
    if found.other_databases:
        raise Conflict(
            f"nothing removed: the token serves {len(found.other_databases)} other kmsq database(s) too (it holds "
            "their policy anchors), whose rows name token keys this database cannot see"
        )
    _refuse_unreadable(found)
    candidates = found.orphans
    if candidates:
        sleep(grace)
        read_rows(hsm, sessions, found, batch=batch)  # the rows committed meanwhile
        _refuse_unreadable(found)
    removed = [label for label in found.orphans if _remove(hsm, sessions, pool, label)]
    return _report(found, removed)


def _refuse_unreadable(found: Survey) -> None:
    if found.unreadable:
        rows = ", ".join(f"{r.row} ({r.reason})" for r in found.unreadable[:5])
        raise Conflict(
            f"nothing removed: {len(found.unreadable)} generated key rows could not be opened (private_keys id "
            f"{rows}), and any of them may name a token key"
        )


def _remove(hsm: KeyStore, sessions: sessionmaker[Session], pool: str, label: str) -> bool:
    """Destroys one token key, recorded in ``pool``'s audit chain in the same transaction (the record first: a
    key the token failed to destroy leaves no record). Returns False when it is gone already."""
    try:
        with transaction(sessions) as db:
            audit_log.operator_action(hsm, db, pool, REMOVE_ACTION, detail=label)
            hsm.destroy_ec_signing_key(label.encode("ascii"))
    except NotFound:
        return False
    return True


def _report(found: Survey, removed: list[str]) -> OrphanReport:
    orphans = found.orphans
    return OrphanReport(
        token_keys=len(found.token_keys),
        named=len(found.token_keys) - len(orphans),
        other_databases=len(found.other_databases),
        orphans=orphans,
        missing=found.missing,
        unreadable=list(found.unreadable),
        removed=removed,
    )
