"""Caller-side key files: a caller's identity (private, 0600) and public identity, and the fleet file.

* ``NAME.key.json`` (``kmsq caller keygen``): the caller's Ed25519 signing key and X25519 reply key.
* ``NAME.pub.json``: their public halves, which an operator registers with ``kmsq caller add``.
* the fleet file (``kmsq fleet-key export``): per pool, the key that signs replies, the transport key that
  inbound secrets are sealed to, and the root keys of the pool (the client routes by them).

Imports nothing from ``worker``: a caller installs without python-pkcs11 or SQLAlchemy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from schemas.files import FLEET_KIND, IDENTITY_KIND, PUBLIC_IDENTITY_KIND
from schemas.limits import NAME
from schemas.wire import WireError, b64u, from_b64u, key_id, sealing_public, signing_public


class IdentityError(ValueError):
    """An identity or fleet file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class CallerIdentity:
    """A caller's private keys. The repr shows only the name and key id."""

    caller: str
    signing: Ed25519PrivateKey = field(repr=False)
    reply: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, caller: str) -> CallerIdentity:
        """Returns a new identity with fresh keys. Raises IdentityError for a bad name."""
        if not NAME.fullmatch(caller):
            raise IdentityError("caller names are 1-64 characters of a-z, 0-9, '-' and '_'")
        return cls(caller, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def key_id(self) -> str:
        """The signing key's id, carried by every request."""
        return key_id(self.signing.public_key().public_bytes_raw())

    @property
    def reply_public(self) -> str:
        """The reply key's public half, base64url."""
        return b64u(self.reply.public_key().public_bytes_raw())

    def public_document(self) -> dict[str, Any]:
        """Returns the public identity document (``NAME.pub.json``)."""
        return {
            "kind": PUBLIC_IDENTITY_KIND,
            "v": 1,
            "caller": self.caller,
            "key_id": self.key_id,
            "signing_key": b64u(self.signing.public_key().public_bytes_raw()),
            "reply_key": self.reply_public,
        }

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Writes ``NAME.key.json`` (0600, created exclusively) and ``NAME.pub.json`` into ``directory``.

        Returns both paths. Raises IdentityError when the private file already exists.
        """
        directory.mkdir(parents=True, exist_ok=True)
        private_path = directory / f"{self.caller}.key.json"
        public_path = directory / f"{self.caller}.pub.json"
        document = {
            "kind": IDENTITY_KIND,
            "v": 1,
            "caller": self.caller,
            "signing_key": b64u(self.signing.private_bytes_raw()),
            "reply_key": b64u(self.reply.private_bytes_raw()),
        }
        try:
            fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(f"{private_path} already exists; not overwriting a caller identity") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
        public_path.write_text(json.dumps(self.public_document(), indent=2) + "\n", encoding="utf-8")
        return private_path, public_path

    @classmethod
    def load(cls, path: Path) -> CallerIdentity:
        """Reads ``NAME.key.json``. Raises IdentityError."""
        data = _read_json(path, IDENTITY_KIND)
        try:
            signing = Ed25519PrivateKey.from_private_bytes(from_b64u(data["signing_key"], max_len=32))
            reply = X25519PrivateKey.from_private_bytes(from_b64u(data["reply_key"], max_len=32))
            return cls(str(data["caller"]), signing, reply)
        except (KeyError, ValueError, WireError) as e:
            raise IdentityError(f"{path}: malformed caller identity ({type(e).__name__})") from None


@dataclass(frozen=True)
class FleetPool:
    """One pool's public fleet keys and root keys."""

    pool: str
    signing_key: Ed25519PublicKey
    transport_key: X25519PublicKey
    root_keys: tuple[str, ...]

    @property
    def signing_key_id(self) -> str:
        """The id replies of this pool carry."""
        return key_id(self.signing_key.public_bytes_raw())


@dataclass(frozen=True)
class Fleet:
    """The fleet file: every pool a caller may route to."""

    pools: dict[str, FleetPool]
    default_pool: str
    _pool_of: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Looked up for every request: a scan of every pool's root keys cost the gateway 1% of its CPU.
        object.__setattr__(self, "_pool_of", {r: p.pool for p in reversed(self.pools.values()) for r in p.root_keys})

    @classmethod
    def from_document(cls, data: dict[str, Any], source: str = "fleet document") -> Fleet:
        """Parses a fleet document. Raises IdentityError."""
        if data.get("kind") != FLEET_KIND:
            raise IdentityError(f"{source}: not a kmsq fleet file")
        try:
            pools = {
                name: FleetPool(
                    name,
                    signing_public(entry["signing_key"]),
                    sealing_public(entry["transport_key"]),
                    tuple(entry.get("root_keys", ())),
                )
                for name, entry in data["pools"].items()
            }
            default = str(data.get("default_pool") or next(iter(pools)))
        except (KeyError, TypeError, StopIteration, WireError) as e:
            raise IdentityError(f"{source}: malformed fleet file ({type(e).__name__})") from None
        if default not in pools:
            raise IdentityError(f"{source}: default pool {default!r} is not listed")
        return cls(pools, default)

    @classmethod
    def load(cls, path: Path) -> Fleet:
        """Reads a fleet file. Raises IdentityError."""
        return cls.from_document(_read_json(path, FLEET_KIND), str(path))

    def pool_of_root_key(self, root_key_id: str) -> str | None:
        """Returns the pool holding ``root_key_id``, or None when the fleet file does not list it."""
        return self._pool_of.get(root_key_id)


def _read_json(path: Path, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise IdentityError(f"{path}: not JSON") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise IdentityError(f"{path}: not a {kind} file")
    return data
