"""The policy rows' canonical encoding: the fields of a caller, root key, root key version, pool or signing rules
row that its HSM MAC (worker.policy) and its operators' approval (worker.approvals) cover.

The encoding is a domain label, then for each field its name and value, each length-prefixed (u16 name, u32
value, UTF-8), in a fixed order.
"""

from __future__ import annotations

import hmac
import struct
from typing import Protocol

from schemas.limits import DEFAULT_LANE
from worker.storage.models import Caller, Pool, RootKey, RootKeyVersion, SigningRulesRow

PolicyRow = Caller | RootKey | RootKeyVersion | Pool | SigningRulesRow


def _encode(label: bytes, fields: tuple[tuple[str, str], ...]) -> bytes:
    out = bytearray(label)
    for name, value in fields:
        n, v = name.encode("ascii"), value.encode("utf-8")
        out += struct.pack(">H", len(n)) + n + struct.pack(">I", len(v)) + v
    return bytes(out)


LABELS = {
    "caller": b"kmsq/policy/caller/v1\x00",
    "root_key": b"kmsq/policy/root-key/v1\x00",
    "pool": b"kmsq/policy/pool/v1\x00",
    "root_key_version": b"kmsq/policy/root-key-version/v1\x00",
    "signing_rules": b"kmsq/policy/signing-rules/v1\x00",
}
Fields = tuple[tuple[str, str], ...]


def policy_fields(row: PolicyRow) -> tuple[str, Fields]:
    """Returns the row's kind (a key of :data:`LABELS`) and its policy fields as text, in their fixed order:
    what its MAC, and the operators' approvals, cover."""
    kind: str
    fields: tuple[tuple[str, object], ...]
    if isinstance(row, Caller):
        kind, fields = "caller", (
            ("name", row.name), ("signing_key", row.signing_key), ("signing_key_id", row.signing_key_id),
            ("reply_key", row.reply_key), ("allowed_ops", row.allowed_ops), ("root_keys", row.root_keys),
            ("plaintext", int(bool(row.plaintext))), ("state", row.state),
        )  # fmt: skip
        fields += _caller_limits(row)
    elif isinstance(row, RootKey):
        kind, fields = "root_key", (
            ("id", row.id), ("type", row.type), ("pool", row.pool), ("state", row.state),
            ("current_version", row.current_version),
        )  # fmt: skip
        # Covered once set: the rows sealed before it existed (all 1) keep their MACs.
        if row.min_decryption_version not in (None, 1):
            fields += (("min_decryption_version", row.min_decryption_version),)
        if row.rotation_period_days is not None:
            fields += (("rotation_period_days", row.rotation_period_days),)
    elif isinstance(row, Pool):
        kind, fields = "pool", (("name", row.name), ("state", row.state))
    elif isinstance(row, SigningRulesRow):
        kind, fields = "signing_rules", (("scope", row.scope), ("rules", row.rules), ("members", row.members or ""))
    else:
        kind, fields = "root_key_version", (
            ("root_key_id", row.root_key_id), ("version", row.version), ("hsm_id", row.hsm_id),
            ("hsm_label", row.hsm_label), ("wrap_algorithm", row.wrap_algorithm), ("state", row.state),
        )  # fmt: skip
        if row.destroy_wait_days is not None:
            fields += (("destroy_wait_days", row.destroy_wait_days),)
    return kind, tuple((name, str(value)) for name, value in fields)


def _caller_limits(row: Caller) -> tuple[tuple[str, object], ...]:
    """A caller's lane and quotas, covered once set: the rows sealed before they existed keep their MACs."""
    fields: tuple[tuple[str, object], ...] = ()
    if row.lane not in (None, DEFAULT_LANE):
        fields += (("lane", row.lane),)
    if row.rate_requests is not None:
        fields += (("rate_requests", repr(float(row.rate_requests))),)
    if row.rate_items is not None:
        fields += (("rate_items", repr(float(row.rate_items))),)
    return fields


def encode_fields(kind: str, fields: Fields) -> bytes:
    """Returns the canonical encoding of a row of ``kind`` with ``fields`` (KeyError for an unknown kind)."""
    return _encode(LABELS[kind], fields)


def mac_input(row: PolicyRow) -> bytes:
    """Returns the canonical encoding of a row's policy fields (what its MAC covers)."""
    return encode_fields(*policy_fields(row))


class _Macs(Protocol):
    def policy_mac(self, data: bytes) -> bytes: ...


def verifies(hsm: _Macs, row: PolicyRow) -> bool:
    """True when ``row`` carries the MAC of its current values under ``hsm``'s policy key (worker.policy). Raises
    what ``hsm.policy_mac`` raises (ConfigError when the token has no policy key)."""
    stored = row.policy_mac
    return stored is not None and hmac.compare_digest(hsm.policy_mac(mac_input(row)).hex(), stored)
