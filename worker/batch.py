"""Batch operations: many items under one root key lookup, one HSM lock and one database transaction.

Each function returns one outcome per item, in order: the item's result or the :class:`ServiceError` that
refused it. An item's error never fails the rest of the batch; an error of the batch as a whole (unknown
root key, permission, HSM or database down) is raised.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from schemas.envelope import GCM_NONCE_LEN, GCM_TAG_LEN, TEXT_PREFIX, EncryptedDataKey, KeySpec
from schemas.limits import MAX_REPLY_SECRET_BYTES, FieldError, check_encrypted_key, check_pub
from worker import service
from worker.errors import Conflict, InvalidRequest, PermanentError, ServiceError, TooLarge
from worker.keystore import KeyStore
from worker.storage.models import PrivateKey
from worker.storage.repo import PrivateKeyRepository


@dataclass(frozen=True, kw_only=True)
class PrivateKeyItem:
    """One private key of a ``put_keys`` batch (``prv`` is plaintext, in worker memory only)."""

    pub: str
    coin: str
    source: str
    type: str
    prv: str


def generate_data_keys(
    hsm: KeyStore,
    db: Session,
    count: int,
    with_plaintext: bool,
    root_key_id: str | None = None,
    pool: str = "default",
    keys: service.RootKeyAccess = service.DIRECT,
) -> list[service.DataKey]:
    """Generates ``count`` data keys under the root key's current version (all or nothing).

    Returns them in order. Raises NotFound/InvalidRequest for the root key, or what ``keys.check`` raises.
    """
    version = service.wrapping_version(db, root_key_id, pool, keys)
    handle = service.hsm_handle(version)
    made: list[service.DataKey] = []
    for wrapped, plaintext in hsm.generate_data_keys(handle, count, readable=with_plaintext):
        text = EncryptedDataKey(KeySpec.AES_256, handle.wrap_algorithm, version.root_key_id, version.version, wrapped)
        if plaintext is None:
            made.append(service.DataKey(text.to_text()))
        else:
            with plaintext:
                made.append(service.DataKey(text.to_text(), plaintext.b64()))
    return made


def decrypt_data_keys(encrypted_keys: Sequence[str], decrypt: Callable[[str], str]) -> list[str | ServiceError]:
    """Runs ``decrypt`` on each ``encryptedKey`` (checked against its limit first). Returns each one's
    ``plaintextKey`` or its error (integrity, forbidden...): an item's error never fails the others."""
    out: list[str | ServiceError] = []
    for encrypted_key in encrypted_keys:
        try:
            try:
                check_encrypted_key(encrypted_key)
            except FieldError as e:
                raise InvalidRequest(str(e)) from None
            out.append(decrypt(encrypted_key))
        except PermanentError as e:
            out.append(e)
    return out


def store_private_keys(
    hsm: KeyStore,
    db: Session,
    items: Sequence[PrivateKeyItem],
    root_key_id: str | None = None,
    pool: str = "default",
    keys: service.RootKeyAccess = service.DIRECT,
) -> list[service.StoredPrivateKey | ServiceError]:
    """Seals and stores each private key like :func:`worker.service.store_private_key`, with one bulk insert.

    Returns each item's public fields or its error: ``invalid`` for a bad field, ``conflict`` when (pub,
    source) is stored already or repeats within the batch.
    """
    version = service.wrapping_version(db, root_key_id, pool, keys)
    outcomes: list[service.StoredPrivateKey | ServiceError | None] = [None] * len(items)
    for i, item in enumerate(items):
        try:
            service.validate_private_key(pub=item.pub, prv=item.prv, coin=item.coin, source=item.source, type=item.type)
        except InvalidRequest as e:
            outcomes[i] = e
    wanted = [(item.pub, item.source) for i, item in enumerate(items) if outcomes[i] is None]
    existing = _existing(db, wanted)
    seen: set[tuple[str, str]] = set()
    rows: list[tuple[int, PrivateKey]] = []
    for i, item in enumerate(items):
        if outcomes[i] is not None:
            continue
        ident = (item.pub, item.source)
        if ident in existing or ident in seen:
            outcomes[i] = PrivateKeyRepository.conflict()
            continue
        seen.add(ident)
        row = service.sealed_private_key_row(
            hsm, version, pub=item.pub, prv=item.prv, coin=item.coin, source=item.source, type=item.type
        )
        rows.append((i, row))
    for i, error in PrivateKeyRepository(db).add_many(rows):
        outcomes[i] = error
    for i, row in rows:
        if outcomes[i] is None:
            outcomes[i] = service.StoredPrivateKey(
                pub=row.pub, source=row.source, coin=row.coin, type=row.type,
                root_key_id=row.root_key, root_key_version=row.root_key_version,
            )  # fmt: skip
    return [o if o is not None else Conflict() for o in outcomes]


def get_private_keys(
    hsm: KeyStore, db: Session, refs: Sequence[tuple[str, str]], keys: service.RootKeyAccess = service.DIRECT
) -> list[service.PrivateKeyRecord | ServiceError]:
    """Reads and opens each (pub, source) like :func:`worker.service.get_private_key`, within the reply's budget:
    the private keys together, as the JSON list the reply seals, come to at most MAX_REPLY_SECRET_BYTES.

    Returns each key or its error (``invalid`` for a bad field or a (pub, source) asked for again in the batch,
    ``not_found``, an integrity failure, a root key the caller may not use, ``too_large`` for a key past the
    budget, which is not opened when its stored size already tells): an item's error never fails the others."""
    out: list[service.PrivateKeyRecord | ServiceError] = []
    seen: set[tuple[str, str]] = set()
    used = 2  # the list's brackets
    for pub, source in refs:
        try:
            try:
                check_pub(pub)
            except FieldError as e:
                raise InvalidRequest(str(e)) from None
            if (pub, source) in seen:
                raise InvalidRequest("this pub and source are asked for more than once in the batch")
            seen.add((pub, source))
            row = service.private_key_row(db, pub, source)
            if used + _stored_size(row.encrypted_prv) > MAX_REPLY_SECRET_BYTES:
                raise TooLarge()
            record = service.open_private_key(hsm, db, row, keys)
            size = len(json.dumps(record.prv)) + 1  # as the sealed list holds it, with its comma
            if used + size > MAX_REPLY_SECRET_BYTES:
                raise TooLarge()
            used += size
            out.append(record)
        except PermanentError as e:
            out.append(e)
    return out


def _stored_size(encrypted_prv: str) -> int:
    """The bytes of the private key a stored ``encryptedPrv`` holds, from its length alone (base64url of a 3-byte
    header, the GCM nonce, the ciphertext and its tag; schemas.envelope): its JSON, as ASCII, is no shorter
    (2 quotes more), so nothing that fits is refused before it is opened."""
    raw = (len(encrypted_prv) - len(TEXT_PREFIX)) * 3 // 4
    return max(0, raw - 3 - GCM_NONCE_LEN - GCM_TAG_LEN)


def _existing(db: Session, idents: list[tuple[str, str]]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for start in range(0, len(idents), 500):
        chunk = idents[start : start + 500]
        stmt = select(PrivateKey.pub, PrivateKey.source).where(tuple_(PrivateKey.pub, PrivateKey.source).in_(chunk))
        found.update((pub, source) for pub, source in db.execute(stmt))
    return found


@dataclass(frozen=True, kw_only=True)
class SignItem:
    """One payload of a ``sign_many`` batch."""

    pub: str
    source: str
    payload: str
    algorithm: str


def sign_payloads(
    hsm: KeyStore, db: Session, items: Sequence[SignItem], *, caller: str, hash_allowed: bool,
    keys: service.RootKeyAccess = service.DIRECT,
) -> list[service.Signature | ServiceError]:  # fmt: skip
    """Signs each payload like :func:`worker.service.sign_payload`, in order (a window of the signing rules counts
    the items signed before it), reading and opening each key once for all of its items and dropping them after.
    The window locks of every item's scopes are taken first, in one sorted pass (service.begin_signing_batch).

    Returns each item's signature or its error (``policy_denied``, ``forbidden``, ``invalid``, ``not_found``...):
    an item's error never fails the others."""
    out: list[service.Signature | ServiceError] = []
    batch = service.begin_signing_batch(db, [(i.pub, i.source) for i in items], caller=caller, keys=keys)
    try:
        for item in items:
            try:
                out.append(service.sign_payload(
                    hsm, db, pub=item.pub, source=item.source, payload=item.payload, algorithm=item.algorithm,
                    caller=caller, keys=keys, hash_allowed=hash_allowed, batch=batch,
                ))  # fmt: skip
            except PermanentError as e:
                out.append(e)
    finally:
        batch.opened.clear()
    return out
