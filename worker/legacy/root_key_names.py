"""The replaced system's root key *names*, kept sealed so that the data keys it handed out still decrypt.

That system's ``generateDataKey`` returned, as ``encryptedKey``, an SJCL envelope of the data-key string with
the root key's name as the password. Its clients keep those envelopes (next to data they encrypted with the
data-key string) and call ``decryptDataKey`` with them later. kmsq keeps each such name sealed with
AES-256-GCM inside the HSM under one of its root keys (like a fleet key); ``decrypt_data_key`` given an SJCL
envelope opens the names under the root keys the caller may use, in the worker's pool, and tries them.
"""

from __future__ import annotations

import json
import secrets
import struct
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import audit_log
from worker.errors import IntegrityError, InvalidRequest, PermanentError
from worker.keystore import KeyStore
from worker.legacy import sjcl
from worker.secret import SecretBytes
from worker.service import DIRECT, RootKeyAccess, open_under_root_key, seal_under_root_key, wrapping_version
from worker.storage.models import LegacyRootKey, RootKeyVersion, aad_version

_AAD_LABEL = b"kmsq/legacy-root-key/v1\x00"
MAX_NAMES_TRIED = 16  # names tried for one envelope: each try costs a PBKDF2
MAX_ITERATIONS = 100_000  # the PBKDF2 work one envelope may ask for, per name (the old system used 10,000)
MAX_NAME_BYTES = 1024
# The PBKDF2 work one message may cost, counted up front as iterations x names to try for each envelope, so
# that no message can outlive the broker's visibility timeout (300 s) and run twice: PBKDF2-HMAC-SHA256 does
# 2.3-4.7 million iterations a second on the 2-core test machine (a worst-case envelope, 16 names x 100,000
# iterations, took 0.69 s under load), so 16 million is 3.5-7 s there, under a tenth of the timeout even on a
# host five times slower. One envelope (at most 1.6 million) always fits; a batch of old envelopes may not.
MAX_PBKDF2_ITERATIONS_PER_MESSAGE = 16_000_000


@dataclass(frozen=True)
class LegacyRootKeyInfo:
    """A registered name (never the name itself)."""

    id: str
    root_key_id: str
    root_key_version: int
    created_at: datetime


def looks_like_sjcl(encrypted_key: str) -> bool:
    """True when ``encrypted_key`` is a JSON object, i.e. an SJCL envelope rather than a ``kmsq:`` string."""
    return encrypted_key.lstrip().startswith("{")


def _aad(header: bytes, key_id: str, root_key: str, version: int) -> bytes:
    encoded = b"".join(struct.pack(">H", len(p)) + p.encode("ascii") for p in (key_id, root_key))
    return header + _AAD_LABEL + encoded + struct.pack(">I", version)


def _info(row: LegacyRootKey) -> LegacyRootKeyInfo:
    return LegacyRootKeyInfo(row.id, row.root_key, row.root_key_version, row.created_at)


def _open(hsm: KeyStore, db: Session, row: LegacyRootKey, keys: RootKeyAccess = DIRECT) -> SecretBytes:
    """Returns a registered name. Raises IntegrityError when its row does not open."""

    def aad(header: bytes) -> bytes:
        return _aad(header, row.id, row.root_key, aad_version(row))

    return open_under_root_key(
        hsm, db, row.root_key, row.root_key_version, row.encrypted_name, row.encrypted_data_key, aad, keys
    )


def _seal(hsm: KeyStore, version: RootKeyVersion, key_id: str, name: str) -> LegacyRootKey:
    def aad(header: bytes) -> bytes:
        return _aad(header, key_id, version.root_key_id, version.version)

    with SecretBytes.from_str(name) as secret:
        encrypted_name, encrypted_data_key = seal_under_root_key(hsm, version, secret, aad)
    return LegacyRootKey(
        id=key_id,
        root_key=version.root_key_id,
        root_key_version=version.version,
        encrypted_name=encrypted_name,
        encrypted_data_key=encrypted_data_key,
    )


def add_legacy_root_key(
    hsm: KeyStore, db: Session, name: str, root_key_id: str | None, pool: str, *, audit: bool = True
) -> tuple[LegacyRootKeyInfo, bool]:
    """Registers an old root key name, sealed under ``root_key_id`` (or the pool's default root key).

    Returns its info and True, or the existing registration and False when the name is already registered.
    Raises InvalidRequest for an empty or oversized name, NotFound for an unknown root key.
    """
    if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidRequest(f"a legacy root key name must be 1-{MAX_NAME_BYTES} bytes")
    version = wrapping_version(db, root_key_id, pool)
    for row in db.scalars(select(LegacyRootKey).order_by(LegacyRootKey.created_at)):
        with _open(hsm, db, row) as existing:
            if secrets.compare_digest(bytes(existing.view()), name.encode("utf-8")):
                return _info(row), False
    row = _seal(hsm, version, "lrk-" + secrets.token_hex(6), name)
    db.add(row)
    db.flush()
    if audit:  # (the import records its pages instead, each as the page's last step)
        audit_log.operator_action(hsm, db, pool, "legacy-root-key add", root_key_id=row.root_key,
                                  root_key_version=row.root_key_version, detail=row.id)  # fmt: skip
    return _info(row), True


def list_legacy_root_keys(db: Session) -> list[LegacyRootKeyInfo]:
    """Returns the registered names' ids and root keys, oldest first."""
    return [_info(row) for row in db.scalars(select(LegacyRootKey).order_by(LegacyRootKey.created_at))]


def envelope_iterations(envelope: str) -> int:
    """Returns the PBKDF2 iterations an SJCL envelope asks for, or 0 when it is malformed or asks for more than
    MAX_ITERATIONS (such an envelope is refused without any PBKDF2)."""
    try:
        fields = json.loads(envelope)
    except (ValueError, RecursionError):
        return 0
    iterations = fields.get("iter") if isinstance(fields, dict) else None
    if not isinstance(iterations, int) or isinstance(iterations, bool) or not 0 < iterations <= MAX_ITERATIONS:
        return 0
    return iterations


class LegacyNames:
    """The registered names one request may try: those under root keys the caller may use in the worker's
    pool (at most MAX_NAMES_TRIED), each opened in the HSM once per request and wiped when it ends.

    Use as a context manager.
    """

    def __init__(self, hsm: KeyStore, db: Session, keys: RootKeyAccess = DIRECT) -> None:
        self.hsm = hsm
        self.db = db
        self.keys = keys
        self.rows: list[LegacyRootKey] = []
        for row in db.scalars(select(LegacyRootKey).order_by(LegacyRootKey.created_at).limit(MAX_NAMES_TRIED)):
            root = keys.rows.root_key(db, row.root_key)
            if root is None:
                continue
            if keys.check is not None:
                try:
                    keys.check(root)  # the caller's root keys, in this worker's pool
                except PermanentError:
                    continue
            self.rows.append(row)
        self._opened: dict[str, SecretBytes] = {}

    def cost(self, envelope: str) -> int:
        """The most PBKDF2 iterations decrypting ``envelope`` can take: its iterations x the names to try."""
        return envelope_iterations(envelope) * len(self.rows)

    def check_budget(self, envelopes: list[str]) -> None:
        """Raises InvalidRequest, before any PBKDF2 runs, when ``envelopes`` together could cost more than
        MAX_PBKDF2_ITERATIONS_PER_MESSAGE."""
        total = sum(self.cost(e) for e in envelopes)
        if total > MAX_PBKDF2_ITERATIONS_PER_MESSAGE:
            raise InvalidRequest(
                f"the old SJCL envelopes of this message may need {total} PBKDF2 iterations; a message may need "
                f"at most {MAX_PBKDF2_ITERATIONS_PER_MESSAGE}: send fewer of them per message"
            )

    def decrypt(self, envelope: str) -> str:
        """Returns the data-key string exactly as the old system generated it. Raises IntegrityError, without
        detail, when the envelope is malformed, asks for more than MAX_ITERATIONS, or no name opens it."""
        if not envelope_iterations(envelope):
            raise IntegrityError()
        for row in self.rows:
            name = self._opened.get(row.id)
            if name is None:
                name = self._opened[row.id] = _open(self.hsm, self.db, row, self.keys.unchecked())
            try:
                return sjcl.decrypt(name.text(), envelope)
            except sjcl.SjclError:
                continue
        raise IntegrityError()

    def __enter__(self) -> LegacyNames:
        return self

    def __exit__(self, *_: object) -> None:
        for name in self._opened.values():
            name.wipe()
        self._opened.clear()
