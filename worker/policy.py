"""The rows that say who may do what, protected by a MAC under a key that never leaves the HSM.

A caller's row (its keys, operations, root keys, plaintext permission and state) and the security-relevant
columns of a root key (its pool, state and current version) and of each version (its HSM object, wrap
algorithm and state) decide what a request may do. With database access alone an attacker could widen a
caller, swap its keys or add one, and then get plaintext back through the workers with the broker access
every caller has: the replaced system's flaw again. So the operator commands, which reach the HSM, store
with each such row an HMAC-SHA256 (CKM_SHA256_HMAC, inside the token) of its canonical encoding under the
token's policy key, and workers check it on every load (:func:`enforce`): a row that fails is refused as if
absent, and logged.

The encoding is a domain label, then for each field its name and value, each length-prefixed (u16 name,
u32 value, UTF-8), in a fixed order.
"""

from __future__ import annotations

import hmac
import logging
import struct
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import audit_log
from worker.errors import InvalidRequest
from worker.keystore import KeyStore
from worker.storage.models import Caller, Pool, RootKey, RootKeyVersion

log = logging.getLogger("kmsq.policy")
PolicyRow = Caller | RootKey | RootKeyVersion | Pool
R = TypeVar("R", Caller, RootKey, RootKeyVersion, Pool)


class PolicyViolation(InvalidRequest):
    """A policy row's MAC is missing or does not verify: it was written outside the operator commands."""


def _encode(label: bytes, fields: tuple[tuple[str, object], ...]) -> bytes:
    out = bytearray(label)
    for name, value in fields:
        n, v = name.encode("ascii"), str(value).encode("utf-8")
        out += struct.pack(">H", len(n)) + n + struct.pack(">I", len(v)) + v
    return bytes(out)


def mac_input(row: PolicyRow) -> bytes:
    """Returns the canonical encoding of a row's policy fields (what its MAC covers)."""
    if isinstance(row, Caller):
        return _encode(b"kmsq/policy/caller/v1\x00", (
            ("name", row.name), ("signing_key", row.signing_key), ("signing_key_id", row.signing_key_id),
            ("reply_key", row.reply_key), ("allowed_ops", row.allowed_ops), ("root_keys", row.root_keys),
            ("plaintext", int(bool(row.plaintext))), ("state", row.state),
        ))  # fmt: skip
    if isinstance(row, RootKey):
        fields: tuple[tuple[str, object], ...] = (
            ("id", row.id), ("type", row.type), ("pool", row.pool), ("state", row.state),
            ("current_version", row.current_version),
        )  # fmt: skip
        # Covered once set: the rows sealed before it existed (all 1) keep their MACs.
        if row.min_decryption_version not in (None, 1):
            fields += (("min_decryption_version", row.min_decryption_version),)
        return _encode(b"kmsq/policy/root-key/v1\x00", fields)
    if isinstance(row, Pool):
        return _encode(b"kmsq/policy/pool/v1\x00", (("name", row.name), ("state", row.state)))
    return _encode(b"kmsq/policy/root-key-version/v1\x00", (
        ("root_key_id", row.root_key_id), ("version", row.version), ("hsm_id", row.hsm_id),
        ("hsm_label", row.hsm_label), ("wrap_algorithm", row.wrap_algorithm), ("state", row.state),
    ))  # fmt: skip


def seal(hsm: KeyStore, row: PolicyRow) -> None:
    """Sets ``row.policy_mac`` for its current values (operator commands, after every change of the row),
    creating the token's policy key on first use."""
    hsm.ensure_policy_key()
    row.policy_mac = hsm.policy_mac(mac_input(row)).hex()


def require(hsm: KeyStore, row: PolicyRow) -> None:
    """Raises PolicyViolation unless ``row`` verifies: an operator command changes only rows it can vouch for
    (re-sealing a row someone else changed would approve that change)."""
    if not verifies(hsm, row):
        raise PolicyViolation(
            f"{describe(row)} failed its policy check: review it, then run `kmsq policy seal` to approve it"
        )


def verifies(hsm: KeyStore, row: PolicyRow) -> bool:
    """True when ``row`` carries the MAC of its current values under this token's policy key."""
    stored = row.policy_mac
    return stored is not None and hmac.compare_digest(hsm.policy_mac(mac_input(row)).hex(), stored)


def describe(row: PolicyRow) -> str:
    """Names a row for operators (never a secret: these rows hold public keys and identifiers)."""
    if isinstance(row, Caller):
        return f"caller {row.name}"
    if isinstance(row, RootKey):
        return f"root key {row.id}"
    if isinstance(row, Pool):
        return f"pool {row.name}"
    return f"root key {row.root_key_id} version {row.version}"


# -- enforcement in worker processes -------------------------------------------------------------------

_enforcing: KeyStore | None = None


def enforce(hsm: KeyStore | None) -> None:
    """Makes this process check every policy row it loads against ``hsm``'s policy key (None: stop)."""
    global _enforcing
    _enforcing = hsm


def checked(row: R | None) -> R | None:
    """Returns ``row`` unless this process enforces the policy and the row's MAC fails; then None (logged).

    Raises HsmUnavailable (transient) when the HSM cannot be asked.
    """
    if row is None or _enforcing is None or verifies(_enforcing, row):
        return row
    log.error("refused %s: its policy MAC is missing or wrong (changed outside the operator commands?)", describe(row))
    return None


def check_caller(row: Caller | None) -> Caller | None:
    """Returns the caller row, None when absent. Raises PolicyViolation when it fails the check."""
    if row is not None and checked(row) is None:
        raise PolicyViolation(f"{describe(row)} failed its policy check")
    return row


# -- operator review --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowStatus:
    """One policy row and whether its MAC verifies."""

    row: str
    verifies: bool


def review(hsm: KeyStore, db: Session, *, seal_failing: bool = False) -> list[RowStatus]:
    """Checks every policy row; with ``seal_failing``, seals the ones that fail (the operator has reviewed
    them: ``kmsq caller list``, ``kmsq root-key list``). Returns each row's status before sealing."""
    rows: list[PolicyRow] = [
        *db.scalars(select(Caller).order_by(Caller.name)),
        *db.scalars(select(RootKey).order_by(RootKey.id)),
        *db.scalars(select(RootKeyVersion).order_by(RootKeyVersion.root_key_id, RootKeyVersion.version)),
        *db.scalars(select(Pool).order_by(Pool.name)),
    ]
    statuses = []
    for row in rows:
        ok = verifies(hsm, row)
        statuses.append(RowStatus(describe(row), ok))
        if not ok and seal_failing:
            seal(hsm, row)
    db.flush()
    sealed = [s.row for s in statuses if not s.verifies] if seal_failing else []
    if sealed:
        audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "policy seal", detail="; ".join(sealed))
    return statuses
