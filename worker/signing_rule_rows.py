"""The operators' side of the signing rules: setting a scope's document (a policy row: MACed, and approved as
docs/DUAL_CONTROL.md says: loosening needs the quorum, tightening is one operator), listing them, and reading the
signing log. Functions take a caller-owned session and never commit."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.signing_rules import RulesError, SigningRules, check_scope, parse_rules
from worker import audit_log, policy
from worker.errors import InvalidRequest
from worker.keystore import KeyStore
from worker.signing_rules import wallet_id
from worker.storage.models import SigningLogEntry, SigningRulesRow

MAX_WALLET_KEYS = 3


@dataclass(frozen=True)
class RulesInfo:
    """One scope's signing rules as operators see them."""

    scope: str
    rules: dict[str, object]
    members: tuple[str, ...]


@dataclass(frozen=True)
class LogEntry:
    """One signed payload."""

    signed_at: datetime
    caller: str
    pub: str
    coin: str
    wallet: str | None
    payload_digest: str
    payment: int
    fee: int | None
    kind: str


def wallet_scope(xpubs: list[str]) -> tuple[str, str]:
    """Returns the scope of the wallet of ``xpubs`` (its root keys, 1 to 3) and its members column. Raises
    InvalidRequest for something that is not a depth-0 xpub."""
    from embit import bip32

    if not 1 <= len(xpubs) <= MAX_WALLET_KEYS or len(set(xpubs)) != len(xpubs):
        raise InvalidRequest(f"a wallet names 1 to {MAX_WALLET_KEYS} distinct xpubs")
    for xpub in xpubs:
        try:
            key = bip32.HDKey.from_string(xpub)
        except Exception:  # embit raises several types on a malformed string
            raise InvalidRequest(f"not an xpub: {xpub[:16]}...") from None
        if key.is_private or key.depth != 0 or not xpub.startswith("xpub"):
            raise InvalidRequest(f"a wallet's keys are depth-0 xpubs (mainnet version, as BitGo's): {xpub[:16]}...")
    return f"wallet:{wallet_id(xpubs)}", ",".join(sorted(xpubs))


def set_rules(hsm: KeyStore, db: Session, scope: str, rules: SigningRules, members: str = "") -> RulesInfo:
    """Sets ``scope``'s document (``members``: a wallet scope's keys, from :func:`wallet_scope`). The row is sealed
    with the operators' evidence: a change that allows more than before needs the quorum (QuorumRequired). Raises
    InvalidRequest for a bad scope, or members given for a scope other than a wallet."""
    try:
        check_scope(scope)
    except RulesError as e:
        raise InvalidRequest(str(e)) from None
    if scope.startswith("wallet:") != bool(members):
        raise InvalidRequest("a wallet scope, and only one, names its keys (--wallet XPUB,...)")
    if rules.grant_callers and not scope.startswith(("key:", "wallet:")):
        raise InvalidRequest("grant_callers is for a key's or a wallet's rules (--key, --wallet)")
    row = db.get(SigningRulesRow, scope)
    if row is None:
        row = SigningRulesRow(scope=scope, rules=rules.canonical(), members=members)
        policy.seal(hsm, db, row)  # before the row joins the session: the anchor check reads the rows as they were
        db.add(row)
    else:
        policy.require(hsm, row)
        if row.members != members:
            raise InvalidRequest(f"{scope} already lists other keys")
        row.rules = rules.canonical()
        policy.seal(hsm, db, row)
    db.flush()
    digest = hashlib.sha256(row.rules.encode()).hexdigest()[:16]
    audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "signing rules set",
                              detail=f"{scope[:120]}: {_summary(rules)} (document sha256:{digest})")  # fmt: skip
    return _info(row)


def _summary(rules: SigningRules) -> str:
    if rules.none:
        return "none"
    return ", ".join(sorted(rules.model_dump(exclude_defaults=True))) or "nothing"


def _info(row: SigningRulesRow) -> RulesInfo:
    try:
        document = parse_rules(row.rules).model_dump(mode="json", exclude_defaults=True)
    except RulesError:
        document = {"unreadable": row.rules[:80]}
    return RulesInfo(row.scope, document, tuple(m for m in (row.members or "").split(",") if m))


def list_rules(db: Session) -> list[RulesInfo]:
    """Returns every scope's rules, by scope."""
    return [_info(row) for row in db.scalars(select(SigningRulesRow).order_by(SigningRulesRow.scope))]


def signing_log(db: Session, *, pub: str | None = None, caller: str | None = None, limit: int = 100) -> list[LogEntry]:
    """Returns the newest ``limit`` signing log entries, newest first, of one key or caller when given."""
    query = select(SigningLogEntry).order_by(SigningLogEntry.signed_at.desc(), SigningLogEntry.id.desc())
    if pub is not None:
        query = query.where(SigningLogEntry.pub == pub)
    if caller is not None:
        query = query.where(SigningLogEntry.caller == caller)
    return [_entry(row) for row in db.scalars(query.limit(limit))]


def _entry(row: SigningLogEntry) -> LogEntry:
    signed_at = row.signed_at if row.signed_at.tzinfo else row.signed_at.replace(tzinfo=UTC)
    return LogEntry(
        signed_at=signed_at, caller=row.caller, pub=row.pub, coin=row.coin, wallet=row.wallet,
        payload_digest=row.payload_digest, payment=row.payment, fee=row.fee, kind=row.kind,
    )  # fmt: skip
