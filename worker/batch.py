"""Batch operations: many items under one root key lookup, one HSM lock and one database transaction.

Each function returns one outcome per item, in order: the item's result or the :class:`KmsqError` that
refused it. An item's error never fails the rest of the batch; an error of the batch as a whole (unknown
root key, permission, HSM or database down) is raised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from schemas.envelope import (
    KEY_SPEC_LENGTHS,
    EncryptedDataKey,
    KeySpec,
)
from schemas.limits import MAX_ENCRYPTED_KEY_CHARS, FieldError, check_encrypted_key
from worker import legacy_keys, service
from worker.errors import Conflict, IntegrityError, InvalidRequest, KmsqError, PermanentError
from worker.hsm import Hsm
from worker.storage.models import PrivateKey, RootKeyVersion
from worker.storage.repo import PrivateKeyRepository


@dataclass(frozen=True)
class PrivateKeyItem:
    """One private key of a ``put_keys`` batch (``prv`` is plaintext, in worker memory only)."""

    pub: str
    coin: str
    source: str
    type: str
    prv: str


def generate_data_keys(
    hsm: Hsm,
    db: Session,
    count: int,
    with_plaintext: bool,
    root_key_id: str | None = None,
    pool: str = "default",
    check: service.RootKeyCheck | None = None,
) -> list[service.DataKey]:
    """Generates ``count`` data keys under the root key's current version (all or nothing).

    Returns them in order. Raises NotFound/InvalidRequest for the root key, or what ``check`` raises.
    """
    version = service.wrapping_version(db, root_key_id, pool, check)
    handle = service.hsm_handle(version)
    keys: list[service.DataKey] = []
    for wrapped, plaintext in hsm.generate_data_keys(handle, count, readable=with_plaintext):
        text = EncryptedDataKey(KeySpec.AES_256, handle.wrap_algorithm, version.root_key_id, version.version, wrapped)
        if plaintext is None:
            keys.append(service.DataKey(text.to_text()))
        else:
            with plaintext:
                keys.append(service.DataKey(text.to_text(), plaintext.b64()))
    return keys


def decrypt_data_keys(
    hsm: Hsm, db: Session, encrypted_keys: Sequence[str], check: service.RootKeyCheck | None = None
) -> list[str | KmsqError]:
    """Unwraps each ``encryptedKey``; returns its ``plaintextKey`` or its error (integrity, forbidden...).

    Raises InvalidRequest, before any work, when the old SJCL envelopes among them could cost more PBKDF2 than
    one message may (worker.legacy_keys.MAX_PBKDF2_ITERATIONS_PER_MESSAGE)."""
    old = [
        k for k in encrypted_keys if len(k) <= MAX_ENCRYPTED_KEY_CHARS and legacy_keys.looks_like_sjcl(k)
    ]  # each costs PBKDF2 work; an oversized one is refused without any
    with legacy_keys.LegacyNames(hsm, db, check) if old else contextlib.nullcontext() as names:
        if names is not None:
            names.check_budget(old)
        versions: dict[tuple[str, int, int], RootKeyVersion | KmsqError] = {}
        out: list[str | KmsqError] = []
        for encrypted_key in encrypted_keys:
            try:
                out.append(_decrypt_one(hsm, db, encrypted_key, check, names, versions))
            except PermanentError as e:
                out.append(e)
        return out


def _decrypt_one(
    hsm: Hsm,
    db: Session,
    encrypted_key: str,
    check: service.RootKeyCheck | None,
    names: legacy_keys.LegacyNames | None,
    versions: dict[tuple[str, int, int], RootKeyVersion | KmsqError],
) -> str:
    try:
        check_encrypted_key(encrypted_key)
    except FieldError as e:
        raise InvalidRequest(str(e)) from None
    if names is not None and legacy_keys.looks_like_sjcl(encrypted_key):
        return names.decrypt(encrypted_key)
    parsed = service.parse_data_key(encrypted_key)
    ref = (parsed.root_key_id, parsed.root_key_version, int(parsed.wrap_algorithm))
    if ref not in versions:  # one lookup (and one refusal) per root key version
        try:
            versions[ref] = service.unwrapping_version(db, *ref[:2], parsed.wrap_algorithm, check)
        except PermanentError as e:
            versions[ref] = e
    version = versions[ref]
    if isinstance(version, KmsqError):
        raise version
    with hsm.unwrap_data_key(service.hsm_handle(version), parsed.wrapped) as plaintext:
        if len(plaintext) != KEY_SPEC_LENGTHS[parsed.key_spec]:
            raise IntegrityError()
        return plaintext.b64()


def store_private_keys(
    hsm: Hsm,
    db: Session,
    items: Sequence[PrivateKeyItem],
    root_key_id: str | None = None,
    pool: str = "default",
    check: service.RootKeyCheck | None = None,
) -> list[service.StoredPrivateKey | KmsqError]:
    """Seals and stores each private key like :func:`worker.service.store_private_key`, with one bulk insert.

    Returns each item's public fields or its error: ``invalid`` for a bad field, ``conflict`` when (pub,
    source) is stored already or repeats within the batch.
    """
    version = service.wrapping_version(db, root_key_id, pool, check)
    outcomes: list[service.StoredPrivateKey | KmsqError | None] = [None] * len(items)
    for i, item in enumerate(items):
        try:
            service.validate_private_key(item.pub, item.prv, item.coin, item.source, item.type)
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
        rows.append(
            (i, service.sealed_private_key_row(hsm, version, item.pub, item.prv, item.coin, item.source, item.type))
        )
    for i, error in PrivateKeyRepository(db).add_many(rows):
        outcomes[i] = error
    for i, row in rows:
        if outcomes[i] is None:
            outcomes[i] = service.StoredPrivateKey(
                row.pub, row.source, row.coin, row.type, row.root_key, row.root_key_version
            )
    return [o if o is not None else Conflict() for o in outcomes]


def _existing(db: Session, idents: list[tuple[str, str]]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for start in range(0, len(idents), 500):
        chunk = idents[start : start + 500]
        stmt = select(PrivateKey.pub, PrivateKey.source).where(tuple_(PrivateKey.pub, PrivateKey.source).in_(chunk))
        found.update((pub, source) for pub, source in db.execute(stmt))
    return found
