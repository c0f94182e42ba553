"""A pool's fleet keys: the Ed25519 key that signs replies and the X25519 key that opens inbound secrets.

Callers know the public halves from ``kmsq fleet-key export``. The private halves (64 bytes: the Ed25519
seed, then the X25519 scalar) are sealed with AES-256-GCM inside the HSM under a fresh data key wrapped by
the pool's root key, with associated data naming the pool, the root key version and both public keys. They
exist in plaintext only in a worker process of the pool, from :func:`load_fleet_key`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import exc, select
from sqlalchemy.orm import Session

from schemas.files import FILE_VERSION, FLEET_KIND
from schemas.wire import b64u, from_b64u, key_id
from worker import audit_log
from worker.errors import ConfigError, IntegrityError
from worker.keystore import KeyStore
from worker.secret import SecretBytes
from worker.service import DIRECT, RootKeyAccess, open_under_root_key, seal_under_root_key, wrapping_version
from worker.storage.models import FleetKey, aad_version
from worker.storage.repo import RootKeyRepository

_AAD_LABEL = b"kmsq/fleet-key/v1\x00"
_KEY_LEN = 32


@dataclass(frozen=True)
class FleetPublic:
    """A pool's public fleet keys (base64url raw keys)."""

    pool: str
    signing_key: str
    transport_key: str

    @property
    def signing_key_id(self) -> str:
        """The id that replies carry."""
        return key_id(from_b64u(self.signing_key, max_len=32))


@dataclass(frozen=True)
class FleetSecrets:
    """A pool's fleet private keys, in worker memory only."""

    pool: str
    signing_key_id: str
    signing: Ed25519PrivateKey = field(repr=False)
    transport: X25519PrivateKey = field(repr=False)


def _aad(header: bytes, pool: str, root_key: str, version: int, signing: str, transport: str) -> bytes:
    parts = [pool, root_key, signing, transport]
    encoded = b"".join(struct.pack(">H", len(p)) + p.encode("ascii") for p in parts)
    return header + _AAD_LABEL + encoded + struct.pack(">I", version)


def _public(row: FleetKey) -> FleetPublic:
    return FleetPublic(row.pool, row.signing_key, row.transport_key)


def fleet_document(hsm: KeyStore, db: Session, default_pool: str, pools: list[str] | None = None) -> dict[str, Any]:
    """Returns the fleet file callers need (``kmsq fleet-key export``): per pool (``pools``, default all), the
    public fleet keys, checked in the HSM (:func:`verified_public_keys`), and the pool's enabled root keys.

    Raises ConfigError for fleet keys that do not verify."""
    keys = verified_public_keys(hsm, db, pools)
    roots = RootKeyRepository(db).list()
    document: dict[str, Any] = {"kind": FLEET_KIND, "v": FILE_VERSION, "default_pool": default_pool, "pools": {}}
    for key in keys:
        document["pools"][key.pool] = {
            "signing_key": key.signing_key,
            "signing_key_id": key.signing_key_id,
            "transport_key": key.transport_key,
            "root_keys": [r.id for r in roots if r.pool == key.pool and r.state == "enabled"],
        }
    if document["default_pool"] not in document["pools"] and document["pools"]:
        document["default_pool"] = next(iter(document["pools"]))
    return document


def ensure_fleet_key(hsm: KeyStore, db: Session, pool: str) -> tuple[FleetPublic, bool]:
    """Returns the pool's fleet keys, creating them (sealed under the pool's default root key) if absent.

    The flag is True when they were created now. Raises NotFound when the pool has no enabled root key.
    """
    row = db.get(FleetKey, pool)
    if row is not None:
        return _public(row), False
    version = wrapping_version(db, None, pool)
    signing, transport = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    signing_pub = b64u(signing.public_key().public_bytes_raw())
    transport_pub = b64u(transport.public_key().public_bytes_raw())

    def aad(header: bytes) -> bytes:
        return _aad(header, pool, version.root_key_id, version.version, signing_pub, transport_pub)

    # The raw private bytes are immutable copies owned by cryptography; the joined buffer is wiped.
    with SecretBytes(signing.private_bytes_raw() + transport.private_bytes_raw()) as secret:
        encrypted_private, encrypted_data_key = seal_under_root_key(hsm, version, secret, aad)
    row = FleetKey(
        pool=pool,
        signing_key=signing_pub,
        transport_key=transport_pub,
        root_key=version.root_key_id,
        root_key_version=version.version,
        encrypted_private=encrypted_private,
        encrypted_data_key=encrypted_data_key,
    )
    try:
        with db.begin_nested():
            db.add(row)
    except exc.IntegrityError:  # another process created them first: use theirs
        existing = db.get(FleetKey, pool)
        assert existing is not None
        return _public(existing), False
    audit_log.operator_action(hsm, db, pool, "fleet-key create", root_key_id=version.root_key_id,
                              root_key_version=version.version, detail=_public(row).signing_key_id)  # fmt: skip
    return _public(row), True


def fleet_public_keys(db: Session) -> list[FleetPublic]:
    """Returns every pool's public fleet keys, by pool, as the database holds them (unverified)."""
    return [_public(row) for row in db.scalars(select(FleetKey).order_by(FleetKey.pool))]


def verified_public_keys(hsm: KeyStore, db: Session, pools: list[str] | None = None) -> list[FleetPublic]:
    """Returns the public fleet keys of ``pools`` (default: all), each checked by opening the pool's sealed
    private keys in the HSM: a row whose public keys were changed in the database does not open (they are
    part of its associated data), so they never reach a fleet file that callers trust.

    Raises ConfigError naming the pool when a row does not verify.
    """
    verified = []
    for public in fleet_public_keys(db):
        if pools and public.pool not in pools:
            continue
        try:
            secrets = load_fleet_key(hsm, db, public.pool)
        except IntegrityError:
            raise ConfigError(
                f"the fleet keys of pool {public.pool!r} do not verify in the HSM (their row was changed)"
            ) from None
        verified.append(
            FleetPublic(
                public.pool,
                b64u(secrets.signing.public_key().public_bytes_raw()),
                b64u(secrets.transport.public_key().public_bytes_raw()),
            )
        )
    return verified


def load_fleet_key(hsm: KeyStore, db: Session, pool: str, keys: RootKeyAccess = DIRECT) -> FleetSecrets:
    """Opens the pool's fleet private keys in the HSM, reading the root key through ``keys`` (a worker's: only
    rows that pass their policy check).

    Returns them. Raises ConfigError when the pool has none, IntegrityError when the row does not open.
    """
    row = db.get(FleetKey, pool)
    if row is None:
        raise ConfigError(f"no fleet key for pool {pool!r} (run: kmsq fleet-key create --pool {pool})")

    def aad(header: bytes) -> bytes:
        return _aad(header, pool, row.root_key, aad_version(row), row.signing_key, row.transport_key)

    with open_under_root_key(
        hsm, db, row.root_key, row.root_key_version, row.encrypted_private, row.encrypted_data_key, aad, keys
    ) as secret:
        raw = secret.view()
        if len(raw) != 2 * _KEY_LEN:
            raise IntegrityError()
        signing = Ed25519PrivateKey.from_private_bytes(bytes(raw[:_KEY_LEN]))
        transport = X25519PrivateKey.from_private_bytes(bytes(raw[_KEY_LEN:]))
    if (
        b64u(signing.public_key().public_bytes_raw()) != row.signing_key
        or b64u(transport.public_key().public_bytes_raw()) != row.transport_key
    ):
        raise IntegrityError()
    return FleetSecrets(pool, _public(row).signing_key_id, signing, transport)
