"""Dual control: operators' identities, change documents, their approvals, and the quorum count.

No single operator decides who may do what. A sensitive change is a *change document* (canonical JSON: what it
changes, the content it leaves, who proposed it, until when it may be approved, and the operator set it was
proposed under); its digest is the SHA-256 of that JSON. An operator approves it with an Ed25519 signature over
the digest and the approval's own time. M distinct operators of the set, each with a valid signature made before
the document's expiry, make a quorum. The workers count the approvals again before they honour a row, so the
functions here are shared by the operator commands and the workers, and import neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.limits import NAME
from schemas.wire import WireError, b64u, canonical_json, from_b64u, key_id, sign, signing_public, verify

OPERATOR_IDENTITY_KIND = "kmsq-operator-identity"
OPERATOR_PUBLIC_KIND = "kmsq-operator-public"
CHANGE_KIND = "kmsq-change"
_APPROVAL_DOMAIN = b"kmsq/approval/v1\x00"
_OPERATOR_SET_DOMAIN = b"kmsq/operator-set/v1\x00"
MAX_OPERATORS = 32


class QuorumError(ValueError):
    """An operator file, operator set, change document or approval is malformed."""


# -- operators ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Operator:
    """A member of the operator set: a name and an Ed25519 public key (base64url)."""

    name: str
    signing_key: str

    @property
    def key_id(self) -> str:
        """The key's id, as approvals and audit records name it."""
        return key_id(signing_public(self.signing_key).public_bytes_raw())

    def public_document(self) -> dict[str, Any]:
        """The operator's ``NAME.operator.pub.json``."""
        return {"kind": OPERATOR_PUBLIC_KIND, "v": 1, "operator": self.name, "key_id": self.key_id,
                "signing_key": self.signing_key}  # fmt: skip


@dataclass(frozen=True)
class OperatorIdentity:
    """An operator's private signing key, kept by the operator (never on the HSM hosts). The repr shows only the
    name."""

    name: str
    signing: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, name: str) -> OperatorIdentity:
        """A new identity. Raises QuorumError for a bad name."""
        _check_name(name)
        return cls(name, Ed25519PrivateKey.generate())

    @property
    def public(self) -> Operator:
        """The public half, as the operator set holds it."""
        return Operator(self.name, b64u(self.signing.public_key().public_bytes_raw()))

    def write(self, directory: Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
        """Writes ``NAME.operator.json`` (0600, created exclusively; the key encrypted under ``passphrase`` when
        one is given: PKCS#8 with the best encryption the cryptography library has) and ``NAME.operator.pub.json``.
        Returns both paths. Raises QuorumError when the private file exists."""
        directory.mkdir(parents=True, exist_ok=True)
        private_path = directory / f"{self.name}.operator.json"
        public_path = directory / f"{self.name}.operator.pub.json"
        document: dict[str, Any] = {"kind": OPERATOR_IDENTITY_KIND, "v": 1, "operator": self.name}
        if passphrase:
            document["encrypted"] = True
            document["private_key"] = self.signing.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase),
            ).decode()  # fmt: skip
        else:
            document["signing_key"] = b64u(self.signing.private_bytes_raw())
        try:
            fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise QuorumError(f"{private_path} already exists; not overwriting an operator identity") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(document, indent=2) + "\n")
        public_path.write_text(json.dumps(self.public.public_document(), indent=2) + "\n", encoding="utf-8")
        return private_path, public_path

    @classmethod
    def load(cls, path: Path, passphrase: Callable[[Path], bytes] | None = None) -> OperatorIdentity:
        """Reads ``NAME.operator.json``; an encrypted one asks ``passphrase`` for its passphrase. Raises
        QuorumError (malformed, encrypted without a way to ask, or a wrong passphrase)."""
        data = _read(path, OPERATOR_IDENTITY_KIND)
        try:
            name = str(data["operator"])
            _check_name(name)
            if not data.get("encrypted"):
                return cls(name, Ed25519PrivateKey.from_private_bytes(from_b64u(data["signing_key"], max_len=32)))
            pem = str(data["private_key"]).encode()
        except (KeyError, ValueError, WireError) as e:
            raise QuorumError(f"{path}: malformed operator identity ({type(e).__name__})") from None
        if passphrase is None:
            raise QuorumError(f"{path} is encrypted: give its passphrase (KMSQ_OPERATOR_PASSPHRASE_FILE, or on a "
                              "terminal when asked)")  # fmt: skip
        secret = passphrase(path)  # (its QuorumError is not a wrong passphrase)
        try:
            key = serialization.load_pem_private_key(pem, secret)
        except (ValueError, TypeError):
            raise QuorumError(f"{path}: wrong passphrase, or not a key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise QuorumError(f"{path}: an operator key is Ed25519")
        return cls(name, key)


PASSPHRASE_FILE_VARIABLE = "KMSQ_OPERATOR_PASSPHRASE_FILE"  # noqa: S105 - the variable's name, not a secret


def passphrase_from_environment(path: Path) -> bytes:
    """The passphrase of the encrypted operator key ``path``, from the file ``KMSQ_OPERATOR_PASSPHRASE_FILE``
    names. Raises QuorumError when it names none or cannot be read."""
    named = os.environ.get(PASSPHRASE_FILE_VARIABLE)
    if not named:
        raise QuorumError(f"{path} is encrypted: give its passphrase ({PASSPHRASE_FILE_VARIABLE}, or on a terminal "
                          "when asked)")  # fmt: skip
    try:
        return Path(named).read_text(encoding="utf-8").strip().encode()
    except OSError as e:
        raise QuorumError(f"cannot read {PASSPHRASE_FILE_VARIABLE} {named}: {type(e).__name__}") from None


def asking_passphrase(path: Path) -> bytes:
    """:func:`passphrase_from_environment`, else, on a terminal, the passphrase asked there (hidden)."""
    import sys
    from getpass import getpass

    if os.environ.get(PASSPHRASE_FILE_VARIABLE) or not sys.stdin.isatty():
        return passphrase_from_environment(path)
    return getpass(f"passphrase of {path.name}: ").encode()


def is_encrypted(path: Path) -> bool:
    """Whether the operator identity in ``path`` needs a passphrase. Raises QuorumError."""
    return bool(_read(path, OPERATOR_IDENTITY_KIND).get("encrypted"))


def read_operator(path: Path) -> Operator:
    """Reads an operator's ``NAME.operator.pub.json``. Raises QuorumError."""
    data = _read(path, OPERATOR_PUBLIC_KIND)
    try:
        operator = Operator(str(data["operator"]), str(data["signing_key"]))
        _check_name(operator.name)
        signing_public(operator.signing_key)
    except (KeyError, WireError) as e:
        raise QuorumError(f"{path}: malformed operator public identity ({type(e).__name__})") from None
    return operator


def _read(path: Path, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuorumError(f"cannot read {path}: {type(e).__name__}") from None
    if not isinstance(data, dict) or data.get("kind") != kind or data.get("v") != 1:
        raise QuorumError(f"{path} is not a {kind} file")
    return data


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise QuorumError("operator names are 1-64 characters of a-z, 0-9, '-' and '_'")


@dataclass(frozen=True)
class OperatorSet:
    """The operators and how many of them (``quorum``, M of N) a sensitive change needs."""

    operators: tuple[Operator, ...]
    quorum: int

    def __post_init__(self) -> None:
        names = [o.name for o in self.operators]
        if not 1 <= len(names) <= MAX_OPERATORS:
            raise QuorumError(f"an operator set has 1 to {MAX_OPERATORS} operators")
        if len(set(names)) != len(names):
            raise QuorumError("operator names repeat")
        for operator in self.operators:
            _check_name(operator.name)
            try:
                signing_public(operator.signing_key)
            except WireError:
                raise QuorumError(f"operator {operator.name}: not an Ed25519 public key") from None
        if len({o.signing_key for o in self.operators}) != len(names):
            raise QuorumError("two operators share a key")
        if not isinstance(self.quorum, int) or isinstance(self.quorum, bool) or not 1 <= self.quorum <= len(names):
            raise QuorumError(f"the quorum must be 1 to {len(names)} (the number of operators)")

    def get(self, name: str) -> Operator | None:
        """The operator called ``name``, or None."""
        return next((o for o in self.operators if o.name == name), None)

    def document(self) -> dict[str, Any]:
        """The set as canonical JSON data (operators by name)."""
        return {"quorum": self.quorum,
                "operators": [{"name": o.name, "signing_key": o.signing_key}
                              for o in sorted(self.operators, key=lambda o: o.name)]}  # fmt: skip

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the set: a change names the set it was proposed under."""
        return hashlib.sha256(_OPERATOR_SET_DOMAIN + canonical_json(self.document())).hexdigest()

    @classmethod
    def from_document(cls, data: Mapping[str, Any]) -> OperatorSet:
        """The set in ``data`` (as :meth:`document` writes it). Raises QuorumError."""
        try:
            operators = tuple(Operator(str(o["name"]), str(o["signing_key"])) for o in data["operators"])
            return cls(operators, data["quorum"])
        except (KeyError, TypeError) as e:
            raise QuorumError(f"malformed operator set ({type(e).__name__})") from None

    def describe(self) -> str:
        """``2 of 3 (alice, bob, carol)``."""
        return f"{self.quorum} of {len(self.operators)} ({', '.join(sorted(o.name for o in self.operators))})"


# -- changes and approvals ---------------------------------------------------------------------------------


def change_digest(document: Mapping[str, Any]) -> str:
    """Hex SHA-256 of a change document's canonical JSON: what approvals sign."""
    return hashlib.sha256(canonical_json(dict(document))).hexdigest()


def expiry_of(document: Mapping[str, Any]) -> datetime:
    """The document's ``expires_at``. Raises QuorumError when it has none or it is not an ISO time with a
    zone."""
    return _time(document.get("expires_at"), "expires_at")


def _time(value: object, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise QuorumError(f"{name} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise QuorumError(f"{name} has no time zone")
    return moment


def _approval_input(digest: str, operator: str, approved_at: str) -> bytes:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise QuorumError("a change digest is 64 lowercase hex digits")
    return _APPROVAL_DOMAIN + bytes.fromhex(digest) + canonical_json({"approved_at": approved_at, "operator": operator})


@dataclass(frozen=True)
class Approval:
    """One operator's signature over a change's digest."""

    operator: str
    key_id: str
    digest: str
    approved_at: str
    signature: str

    def document(self) -> dict[str, str]:
        """The approval as JSON data."""
        return {"operator": self.operator, "key_id": self.key_id, "digest": self.digest,
                "approved_at": self.approved_at, "signature": self.signature}  # fmt: skip

    @classmethod
    def from_document(cls, data: Mapping[str, Any]) -> Approval:
        """The approval in ``data``. Raises QuorumError."""
        try:
            return cls(*(str(data[k]) for k in ("operator", "key_id", "digest", "approved_at", "signature")))
        except (KeyError, TypeError) as e:
            raise QuorumError(f"malformed approval ({type(e).__name__})") from None


def approve(identity: OperatorIdentity, digest: str, now: datetime | None = None) -> Approval:
    """``identity``'s approval of the change with ``digest``, dated ``now``."""
    approved_at = (now or datetime.now(UTC)).isoformat()
    signature = sign(identity.signing, _approval_input(digest, identity.name, approved_at))
    return Approval(identity.name, identity.public.key_id, digest, approved_at, signature)


@dataclass(frozen=True)
class Tally:
    """Which approvals of a change count, and why the others do not."""

    counted: tuple[str, ...]  # operator names, each once
    refused: tuple[tuple[str, str], ...]  # (operator as the approval names it, reason)
    quorum: int

    @property
    def met(self) -> bool:
        """True when at least ``quorum`` distinct operators approved."""
        return len(self.counted) >= self.quorum


def tally(digest: str, expires_at: datetime, approvals: Iterable[Approval], operators: OperatorSet) -> Tally:
    """Counts ``approvals`` of the change with ``digest``: an approval counts when its operator is in the set,
    it names that operator's key, it is for this digest, it was made by the document's expiry, and its signature
    verifies; each operator counts once."""
    counted: list[str] = []
    refused: list[tuple[str, str]] = []
    for approval in approvals:
        operator = operators.get(approval.operator)
        reason = None
        if operator is None:
            reason = "not in the operator set"
        elif approval.key_id != operator.key_id:
            reason = "not the operator's key"
        elif approval.digest != digest:
            reason = "for another change"
        elif approval.operator in counted:
            reason = "a second approval by the same operator"
        else:
            try:
                made = _time(approval.approved_at, "approved_at")
                verify(signing_public(operator.signing_key), approval.signature,
                       _approval_input(digest, approval.operator, approval.approved_at))  # fmt: skip
            except (QuorumError, WireError):
                reason = "a signature that does not verify"
            else:
                if made > expires_at:
                    reason = "made after the change expired"
        if reason is None:
            counted.append(approval.operator)
        else:
            refused.append((approval.operator, reason))
    return Tally(tuple(counted), tuple(refused), operators.quorum)
