"""The caller registry and authorization: who may ask for what, on which root keys.

Callers are registered by an operator with their public identity (an Ed25519 signing key and an X25519
reply key). Functions take a caller-owned session and never commit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.files import PUBLIC_IDENTITY_KIND
from schemas.limits import CALLER_LANES, DEFAULT_LANE, MAX_RATE_PER_SECOND, MIN_RATE_PER_SECOND, NAME
from schemas.operations import ALLOWABLE_OPS
from schemas.wire import WireError, key_id, sealing_public, signing_public
from worker import audit_log, policy
from worker.errors import Conflict, Forbidden, InvalidRequest, NotFound
from worker.keystore import KeyStore
from worker.storage.models import Caller, RootKey

ALL_ROOT_KEYS = "*"


@dataclass(frozen=True)
class CallerInfo:
    """A registered caller as operators see it."""

    name: str
    key_id: str
    allowed_ops: tuple[str, ...]
    root_keys: tuple[str, ...] | None  # None: every root key
    plaintext: bool
    state: str
    created_at: datetime
    lane: str = DEFAULT_LANE
    rate_requests: float | None = None  # per second; None: no quota
    rate_items: float | None = None


@dataclass(frozen=True)
class PublicIdentity:
    """A caller's public keys, as written by ``kmsq caller keygen`` to ``NAME.pub.json``."""

    caller: str
    signing_key: str
    reply_key: str


def read_public_identity(path: Path) -> PublicIdentity:
    """Reads a caller's public identity file. Raises InvalidRequest when it is unreadable or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("kind") != PUBLIC_IDENTITY_KIND:
            raise ValueError("not a kmsq caller public identity")
        identity = PublicIdentity(str(data["caller"]), str(data["signing_key"]), str(data["reply_key"]))
        signing_public(identity.signing_key)
        sealing_public(identity.reply_key)
    except (OSError, ValueError, KeyError, AttributeError, WireError) as e:
        raise InvalidRequest(f"cannot read caller public identity {path}: {e}") from None
    return identity


def _info(row: Caller) -> CallerInfo:
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    return CallerInfo(
        name=row.name,
        key_id=row.signing_key_id,
        allowed_ops=tuple(op for op in row.allowed_ops.split(",") if op),
        root_keys=None if row.root_keys == ALL_ROOT_KEYS else tuple(k for k in row.root_keys.split(",") if k),
        plaintext=row.plaintext,
        state=row.state,
        created_at=created,
        lane=row.lane or DEFAULT_LANE,
        rate_requests=row.rate_requests,
        rate_items=row.rate_items,
    )


def add_caller(
    hsm: KeyStore,
    db: Session,
    name: str,
    identity: PublicIdentity,
    allowed_ops: list[str],
    root_keys: list[str] | None,
    plaintext: bool,
) -> CallerInfo:
    """Registers a caller (its row sealed with the HSM's policy key, see worker.policy). ``root_keys`` None
    allows every root key.

    Returns its description. Raises InvalidRequest (bad name, unknown op or root key) or Conflict (exists).
    """
    if not NAME.fullmatch(name):
        raise InvalidRequest("caller names are 1-64 characters of a-z, 0-9, '-' and '_'")
    unknown = sorted(set(allowed_ops) - set(ALLOWABLE_OPS))
    if unknown or not allowed_ops:
        got = ", ".join(unknown) or "none"
        raise InvalidRequest(f"operations must be among {', '.join(ALLOWABLE_OPS)} (got {got})")
    if root_keys is not None:
        missing = [k for k in root_keys if db.get(RootKey, k) is None]
        if missing or not root_keys:
            raise InvalidRequest(f"unknown root keys: {', '.join(missing) or 'none given'}")
    if db.get(Caller, name) is not None:
        raise Conflict(f"caller {name!r} already exists")
    row = Caller(
        name=name,
        signing_key=identity.signing_key,
        signing_key_id=key_id(signing_public(identity.signing_key).public_bytes_raw()),
        reply_key=identity.reply_key,
        allowed_ops=",".join(sorted(set(allowed_ops))),
        root_keys=ALL_ROOT_KEYS if root_keys is None else ",".join(sorted(set(root_keys))),
        plaintext=plaintext,
        state="enabled",
    )
    policy.seal(hsm, db, row)
    db.add(row)
    db.flush()
    detail = f"{name}: {row.allowed_ops}; root keys {row.root_keys}; plaintext {plaintext}"
    audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "caller add", detail=detail)
    return _info(row)


def caller_info(db: Session, name: str) -> CallerInfo:
    """Returns the caller ``name``'s description. Raises NotFound."""
    row = db.get(Caller, name)
    if row is None:
        raise NotFound(f"no caller {name!r}")
    return _info(row)


def list_callers(db: Session) -> list[CallerInfo]:
    """Returns every caller, by name."""
    return [_info(row) for row in db.scalars(select(Caller).order_by(Caller.name))]


def set_caller_state(hsm: KeyStore, db: Session, name: str, state: str) -> CallerInfo:
    """Enables or disables a caller and seals its row again. Raises NotFound, or PolicyViolation when the row
    was changed outside the operator commands."""
    row = db.get(Caller, name)
    if row is None:
        raise NotFound(f"no caller {name!r}")
    policy.require(hsm, row)
    row.state = state
    policy.seal(hsm, db, row)
    db.flush()
    audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, f"caller {state[:-1]}", detail=name)
    return _info(row)


def set_caller_limits(
    hsm: KeyStore, db: Session, name: str, lane: str, rate_requests: float | None, rate_items: float | None
) -> CallerInfo:
    """Sets a caller's lane (``auto`` or ``bulk``) and quotas (requests and items per second, None for none) and
    seals its row again (setting or lowering a quota, or moving to the bulk lane, is a restriction one operator
    makes alone; the rest needs the quorum: worker.approvals). Returns its description. Raises NotFound,
    InvalidRequest (an unknown lane, a rate out of bounds) or PolicyViolation (the row was changed outside the
    operator commands)."""
    if lane not in CALLER_LANES:
        raise InvalidRequest(f"lane must be one of {', '.join(CALLER_LANES)}")
    for rate in (rate_requests, rate_items):
        if rate is not None and not MIN_RATE_PER_SECOND <= rate <= MAX_RATE_PER_SECOND:
            raise InvalidRequest(f"a quota is {MIN_RATE_PER_SECOND}-{MAX_RATE_PER_SECOND:.0f} per second")
    row = db.get(Caller, name)
    if row is None:
        raise NotFound(f"no caller {name!r}")
    policy.require(hsm, row)
    row.lane, row.rate_requests, row.rate_items = lane, rate_requests, rate_items
    policy.seal(hsm, db, row)
    db.flush()
    detail = f"{name}: lane {lane}; requests/s {_rate(rate_requests)}; items/s {_rate(rate_items)}"
    audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "caller limits", detail=detail)
    return _info(row)


def _rate(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate:g}"


def authorize(caller: Caller, permission: str | None, plaintext: bool) -> None:
    """Raises Forbidden unless ``caller`` holds ``permission`` (None: the operation needs none) and, when the
    operation returns plaintext, the plaintext permission."""
    if permission is None:
        return
    if permission not in caller.allowed_ops.split(","):
        raise Forbidden(f"operation {permission} is not allowed for this caller")
    if plaintext and not caller.plaintext:
        raise Forbidden(f"operation {permission} returns plaintext, which this caller may not receive")


def authorize_root_key(caller: Caller, root_key: RootKey) -> None:
    """Raises Forbidden unless ``caller`` may use ``root_key``."""
    if caller.root_keys != ALL_ROOT_KEYS and root_key.id not in caller.root_keys.split(","):
        raise Forbidden(f"root key {root_key.id} is not allowed for this caller")
