"""A backup custodian's key: the X25519 key pair a share of a backup key is sealed to (worker.backup).

A custodian makes it on a machine of their own (``kmsq backup custodian-key``), keeps the private file there
(encrypted under a passphrase unless told otherwise) and hands the public file to the operator who sets up
backups. Nothing here needs the HSM or the database: a custodian installs kmsq without the worker extra.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from schemas.wire import WireError, b64u, from_b64u

PUBLIC_FORMAT = "kmsq-custodian/v1"
PRIVATE_FORMAT = "kmsq-custodian-key/v1"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_SHARE_INFO = b"kmsq/backup-share/v1\x00"
_MAX_SHARE = 1024


class CustodianKeyError(ValueError):
    """A custodian key file is malformed, or its passphrase is wrong."""


@dataclass(frozen=True)
class Custodian:
    """A custodian's public half: their name and X25519 public key (base64url)."""

    name: str
    public: str

    def document(self) -> dict[str, str]:
        """The public file's content."""
        return {"format": PUBLIC_FORMAT, "name": self.name, "public": self.public}

    @classmethod
    def from_document(cls, data: Any) -> Custodian:
        """Parses a public file's content. Raises CustodianKeyError."""
        if not isinstance(data, dict) or data.get("format") != PUBLIC_FORMAT:
            raise CustodianKeyError(f"not a custodian public key (format {PUBLIC_FORMAT})")
        name, public = data.get("name"), data.get("public")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise CustodianKeyError("a custodian's name is 1-64 characters of a-z, 0-9, '.', '_' and '-'")
        try:
            if not isinstance(public, str) or len(from_b64u(public, max_len=32)) != 32:
                raise CustodianKeyError("a custodian's public key is 32 bytes of X25519, base64url")
        except WireError:
            raise CustodianKeyError("a custodian's public key is 32 bytes of X25519, base64url") from None
        return cls(name, public)


@dataclass(frozen=True)
class CustodianKey:
    """A custodian's private key, loaded."""

    name: str
    private: X25519PrivateKey = field(repr=False)

    @property
    def custodian(self) -> Custodian:
        """The public half."""
        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return Custodian(self.name, b64u(raw))


def new_custodian_key(name: str, passphrase: bytes | None) -> tuple[str, str]:
    """Makes a custodian key pair. Returns the private file's and the public file's text (the private key
    encrypted under ``passphrase`` when one is given). Raises CustodianKeyError for a bad name."""
    if not NAME_PATTERN.fullmatch(name):
        raise CustodianKeyError("a custodian's name is 1-64 characters of a-z, 0-9, '.', '_' and '-'")
    key = X25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()
    private = {"format": PRIVATE_FORMAT, "name": name, "encrypted": bool(passphrase), "private_key": pem}
    public = CustodianKey(name, key).custodian.document()
    return json.dumps(private, indent=2) + "\n", json.dumps(public, indent=2) + "\n"


def key_is_encrypted(text: str) -> bool:
    """Whether a private file's key needs a passphrase. Raises CustodianKeyError for a malformed file."""
    data = _private_document(text)
    return bool(data.get("encrypted"))


def _private_document(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        raise CustodianKeyError("not a custodian key file (JSON)") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != PRIVATE_FORMAT
        or not isinstance(data.get("private_key"), str)
    ):
        raise CustodianKeyError(f"not a custodian key file (format {PRIVATE_FORMAT})")
    return data


def load_custodian_key(text: str, passphrase: bytes | None) -> CustodianKey:
    """Loads a private file. Raises CustodianKeyError when it is malformed or the passphrase is wrong."""
    data = _private_document(text)
    try:
        key = serialization.load_pem_private_key(data["private_key"].encode(), passphrase or None)
    except (ValueError, TypeError):
        raise CustodianKeyError(f"custodian key {data.get('name')!r}: wrong passphrase, or not a key") from None
    if not isinstance(key, X25519PrivateKey):
        raise CustodianKeyError("a custodian key is X25519")
    return CustodianKey(str(data.get("name")), key)


def _info(backup_key_id: str, name: str) -> bytes:
    return _SHARE_INFO + backup_key_id.encode() + b"\x00" + name.encode()


def seal_share(custodian: Custodian, backup_key_id: str, share: str) -> str:
    """Seals one share (a SLIP-39 mnemonic) of backup key ``backup_key_id`` to ``custodian``; returns base64url.
    The seal names the backup key and the custodian: it opens for no other."""
    public = X25519PublicKey.from_public_bytes(from_b64u(custodian.public, max_len=32))
    return b64u(_SUITE.encrypt(share.encode(), public, info=_info(backup_key_id, custodian.name)))


def open_share(key: CustodianKey, backup_key_id: str, sealed: str) -> str:
    """Opens a share sealed to this custodian. Raises CustodianKeyError when it does not open."""
    try:
        raw = _SUITE.decrypt(from_b64u(sealed, max_len=_MAX_SHARE), key.private, info=_info(backup_key_id, key.name))
        return raw.decode("ascii")
    except Exception:  # InvalidTag, WireError, a share that is not text: all mean the same here
        raise CustodianKeyError(f"the share of custodian {key.name!r} does not open with this key") from None
