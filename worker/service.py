"""The key operations, as plain functions over a KeyStore (the HSM) and a caller-owned database session.

Functions here add rows and flush but never commit: the caller (the pipeline, or the :class:`KeyService`
facade) owns the transaction, so that an operation's rows and its request record commit together.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from schemas.coins import operation_prefix, signing_family
from schemas.envelope import (
    FORMAT_VERSION,
    GCM_NONCE_LEN,
    KEY_SPEC_LENGTHS,
    Aead,
    EncryptedDataKey,
    EncryptedPrivateKey,
    FormatError,
    KeySpec,
    PrivateKeyContext,
    WrapAlgorithm,
    key_spec_from_name,
)
from schemas.limits import (
    KEY_TYPES,
    MAX_ENCRYPTED_KEY_CHARS,
    NAME,
    ROOT_KEY_TYPES,
    SOURCES,
    FieldError,
    check_coin,
    check_prv,
    check_pub,
)
from worker import audit_log, eth_operation, policy, signing, signing_policy, signing_rules
from worker.errors import (
    Forbidden,
    IntegrityError,
    InvalidRequest,
    NotExportable,
    NotFound,
    PermanentError,
    ServiceError,
    VersionBelowMinimum,
)
from worker.keystore import KeyStore, RootKeyHandle
from worker.policy import TrustedRows
from worker.secret import SecretBytes
from worker.storage.models import PrivateKey, RootKey, RootKeyVersion, SigningRulesRow, aad_version
from worker.storage.repo import PrivateKeyRepository, RootKeyRepository

log = logging.getLogger("kmsq.worker")
RSA_BITS: dict[str, int] = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}  # the rsa-* of ROOT_KEY_TYPES
PROVIDER = "kmsq"

# Called with the root key an operation is about to use, before the HSM is touched; raises to refuse
# (the queue path checks the caller's root key permissions and the worker's pool here).
RootKeyCheck = Callable[[RootKey], None]


@dataclass(frozen=True)
class RootKeyAccess:
    """How an operation reaches root keys: through which rows (a worker's :class:`worker.policy.TrustedRows`:
    MAC-checked and cached; by default the database as it is, for operator commands), and the check each root
    key it is about to use must pass first (``check``; for a request, the caller's permissions and the worker's
    pool)."""

    rows: TrustedRows = field(default_factory=TrustedRows)
    check: RootKeyCheck | None = None
    # Before anything is wrapped under a root key version: raises NotReplicated while it is on too few tokens
    # (a worker's worker.replication.CustodyGate; None: no such rule).
    gate: Callable[[Session, RootKeyVersion], None] | None = None

    def unchecked(self) -> RootKeyAccess:
        """The same rows and gate without the check (a root key chosen by kmsq, not named by the caller)."""
        return RootKeyAccess(self.rows, gate=self.gate)


DIRECT = RootKeyAccess()  # the database as it is, nothing checked: operator commands and tests


@dataclass(frozen=True)
class RootKeyInfo:
    """A root key as operators see it."""

    id: str
    type: str
    pool: str
    state: str
    version: int
    versions: tuple[int, ...]  # every version that still exists in the HSM
    wrap_algorithm: str
    hsm_label: str
    created_at: datetime
    min_decryption_version: int = 1
    destroyed_versions: tuple[int, ...] = ()
    # Versions waiting for destruction, with when it falls due (as their approval claims; workers verify it).
    pending_destruction: tuple[tuple[int, datetime | None], ...] = ()
    rotation_period_days: int | None = None  # rotated by its pool's workers that long after its last change
    next_rotation: datetime | None = None


@dataclass(frozen=True)
class DataKey:
    """A generated data key: ``encrypted_key`` always, ``plaintext_key`` (base64) only when asked."""

    encrypted_key: str
    plaintext_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class StoredPrivateKey:
    """The public fields of a stored private key."""

    pub: str
    source: str
    coin: str
    type: str
    root_key_id: str
    root_key_version: int


@dataclass(frozen=True, kw_only=True)
class PrivateKeyRecord:
    """A private key read back: ``prv`` is the plaintext and is never shown in a repr."""

    pub: str
    source: str
    coin: str
    type: str
    prv: str = field(repr=False)
    root_key_id: str = ""
    root_key_version: int = 0


# -- root keys -------------------------------------------------------------------------------------


def hsm_handle(version: RootKeyVersion) -> RootKeyHandle:
    return RootKeyHandle(bytes.fromhex(version.hsm_id), version.hsm_label, WrapAlgorithm(version.wrap_algorithm))


def root_key_info(db: Session, key: RootKey) -> RootKeyInfo:
    """Returns the operators' description of a root key."""
    return _info(RootKeyRepository(db), key)


def _info(repo: RootKeyRepository, key: RootKey) -> RootKeyInfo:
    versions = repo.versions(key.id)
    current = next(v for v in versions if v.version == key.current_version)
    return RootKeyInfo(
        id=key.id,
        type=key.type,
        pool=key.pool,
        state=key.state,
        version=key.current_version,
        versions=tuple(v.version for v in versions if v.state != "destroyed"),
        min_decryption_version=key.min_decryption_version,
        destroyed_versions=tuple(v.version for v in versions if v.state == "destroyed"),
        pending_destruction=tuple((v.version, _destruction_due(v)) for v in versions if v.state == "pending_destroy"),
        rotation_period_days=key.rotation_period_days,
        next_rotation=_after(key.approval, key.rotation_period_days),
        wrap_algorithm=WrapAlgorithm(current.wrap_algorithm).name,
        hsm_label=current.hsm_label,
        created_at=key.created_at if key.created_at.tzinfo else key.created_at.replace(tzinfo=UTC),
    )


def _destruction_due(version: RootKeyVersion) -> datetime | None:
    return _after(version.approval, version.destroy_wait_days)


def _after(evidence: str | None, days: int | None) -> datetime | None:
    """``days`` after the approval ``evidence`` claims (for display: workers verify it), or None."""
    from worker.approvals import claimed_approval_time

    approved = claimed_approval_time(evidence)
    return None if approved is None or days is None else approved + timedelta(days=days)


def _create_hsm_version(hsm: KeyStore, key_type: str, key_id: str, version: int) -> RootKeyHandle:
    bits = RSA_BITS.get(key_type)
    if bits is None:
        return hsm.create_aes_root_key(key_id, version)
    return hsm.create_rsa_root_key(key_id, version, bits)


def _version_row(key_id: str, version: int, handle: RootKeyHandle) -> RootKeyVersion:
    return RootKeyVersion(
        root_key_id=key_id,
        version=version,
        hsm_id=handle.hsm_id.hex(),
        hsm_label=handle.label,
        wrap_algorithm=int(handle.wrap_algorithm),
        state="enabled",
    )


def create_root_key(hsm: KeyStore, db: Session, key_type: str = "aes-256", pool: str = "default") -> RootKeyInfo:
    """Creates a root key (version 1) in the HSM and records it.

    Returns its description. Raises InvalidRequest for an unknown type or bad pool name; HSM errors pass
    through. If recording fails the HSM object is destroyed again.
    """
    if key_type not in ROOT_KEY_TYPES:
        raise InvalidRequest(f"unknown root key type {key_type!r} (one of {', '.join(ROOT_KEY_TYPES)})")
    if not NAME.fullmatch(pool):
        raise InvalidRequest("pool names are 1-64 characters of a-z, 0-9, '-' and '_'")
    key_id = "rk-" + secrets.token_hex(6)
    handle = _create_hsm_version(hsm, key_type, key_id, 1)
    repo = RootKeyRepository(db)
    key = RootKey(id=key_id, type=key_type, pool=pool, state="enabled", current_version=1)
    version = _version_row(key_id, 1, handle)
    try:
        policy.seal(hsm, db, key)
        policy.seal(hsm, db, version)
        repo.add(key, version)
        policy.ensure_pool_row(hsm, db, pool)  # a pool is served only with its row
        audit_log.operator_action(hsm, db, pool, "root-key create", root_key_id=key_id, root_key_version=1,
                                  detail=key_type)  # fmt: skip
    except BaseException:
        hsm.destroy_root_key(handle)
        raise
    return _info(repo, key)


def rotate_root_key(hsm: KeyStore, db: Session, root_key_id: str, *, actor: str | None = None) -> RootKeyInfo:
    """Adds a new version to a root key; it wraps from now on, older versions keep unwrapping. ``actor`` names who
    rotates in the audit record when it is not the operator running the command (worker.schedule).

    Returns the updated description. Raises NotFound.
    """
    repo = RootKeyRepository(db)
    key = repo.get(root_key_id, for_update=True)
    if key is None:
        raise NotFound(f"no root key {root_key_id!r}")
    policy.require(hsm, key)
    version = key.current_version + 1
    handle = _create_hsm_version(hsm, key.type, key.id, version)
    row = _version_row(key.id, version, handle)
    try:
        policy.seal(hsm, db, row)
        repo.add_version(key, row)
        policy.seal(hsm, db, key)  # its current version changed
        db.flush()
        audit_log.operator_action(hsm, db, key.pool, "root-key rotate", root_key_id=key.id, root_key_version=version,
                                  actor=actor)  # fmt: skip
    except BaseException:
        hsm.destroy_root_key(handle)
        raise
    return _info(repo, key)


def list_root_keys(db: Session) -> list[RootKeyInfo]:
    """Returns every root key, oldest first."""
    repo = RootKeyRepository(db)
    return [_info(repo, key) for key in repo.list()]


def wrapping_version(db: Session, root_key_id: str | None, pool: str, keys: RootKeyAccess = DIRECT) -> RootKeyVersion:
    """The current version of the named root key (or of the pool's default one), ready to wrap.

    Raises NotFound, InvalidRequest (disabled), or whatever ``keys.check`` and ``keys.gate`` raise.
    """
    key = keys.rows.default_root_key(db, pool) if root_key_id is None else keys.rows.root_key(db, root_key_id)
    if key is None:
        raise NotFound("no such root key" if root_key_id else f"no enabled root key in pool {pool!r}")
    if keys.check is not None:
        keys.check(key)
    if key.state != "enabled":
        raise InvalidRequest(f"root key {key.id} is disabled")
    version = keys.rows.root_key_version(db, key.id, key.current_version)
    if version is None or version.state != "enabled":
        raise InvalidRequest(f"root key {key.id!r} has no enabled current version")
    if keys.gate is not None:
        keys.gate(db, version)
    return version


def unwrapping_version(
    db: Session, root_key_id: str, version_no: int, algorithm: WrapAlgorithm, keys: RootKeyAccess = DIRECT
) -> RootKeyVersion:
    """The root key version a ciphertext names; every mismatch is the same opaque IntegrityError.

    ``keys.check`` runs only for a valid reference, so a refusal never tells which part of a ciphertext is wrong.
    Then, to a caller that may use the root key: VersionBelowMinimum for a version older than the root key's
    minimum decryption version (destroyed ones included), InvalidRequest for a disabled root key.
    """
    key = keys.rows.root_key(db, root_key_id)
    if key is None:
        raise IntegrityError()
    if version_no < key.min_decryption_version:
        if keys.check is not None:
            keys.check(key)
        raise VersionBelowMinimum(root_key_id, version_no, key.min_decryption_version)
    version = keys.rows.root_key_version(db, root_key_id, version_no)
    if version is None or version.state != "enabled" or version.wrap_algorithm != int(algorithm):
        raise IntegrityError()
    if keys.check is not None:
        keys.check(key)
    if key.state != "enabled":
        raise InvalidRequest(f"root key {key.id} is disabled")
    return version


# -- data keys -------------------------------------------------------------------------------------


def generate_data_key(
    hsm: KeyStore,
    db: Session,
    root_key_id: str | None = None,
    key_spec: str = "AES-256",
    with_plaintext: bool = True,
    pool: str = "default",
    keys: RootKeyAccess = DIRECT,
) -> DataKey:
    """Generates a data key in the HSM and wraps it under the root key's current version.

    Returns the ``encryptedKey`` string and, when ``with_plaintext``, the key as a base64 string. Raises
    InvalidRequest for an unknown key spec, NotFound for an unknown root key.
    """
    try:
        spec = key_spec_from_name(key_spec)
    except FormatError:
        raise InvalidRequest(f"unknown key spec {key_spec!r} (supported: AES-256)") from None
    version = wrapping_version(db, root_key_id, pool, keys)
    handle = hsm_handle(version)
    wrapped, plaintext = hsm.generate_data_key(handle, readable=with_plaintext)
    encrypted = EncryptedDataKey(spec, handle.wrap_algorithm, version.root_key_id, version.version, wrapped)
    if plaintext is None:
        return DataKey(encrypted.to_text())
    with plaintext:
        return DataKey(encrypted.to_text(), plaintext.b64())


def parse_data_key(encrypted_key: str) -> EncryptedDataKey:
    """Parses an ``encryptedKey``. Raises IntegrityError (opaque) for anything malformed."""
    if not isinstance(encrypted_key, str) or len(encrypted_key) > MAX_ENCRYPTED_KEY_CHARS:
        raise IntegrityError()
    try:
        return EncryptedDataKey.from_text(encrypted_key)
    except FormatError:
        raise IntegrityError() from None


# Root key versions already looked up within one request, by (root key id, version, wrap algorithm): a
# batch looks each up (and is refused for each) once.
VersionCache = dict[tuple[str, int, int], RootKeyVersion | PermanentError]


def decrypt_data_key(
    hsm: KeyStore,
    db: Session,
    encrypted_key: str,
    keys: RootKeyAccess = DIRECT,
    versions: VersionCache | None = None,
) -> str:
    """Unwraps a kmsq ``encryptedKey`` in the HSM under the root key version it names (the replaced system's
    SJCL envelopes are :mod:`worker.legacy`'s, dispatched by the pipeline).

    Returns the base64 ``plaintextKey``, the same string :func:`generate_data_key` returned. Raises
    IntegrityError, without detail, for anything wrong with the ciphertext or the root key it names, or what
    ``keys.check`` raises for a valid reference.
    """
    parsed = parse_data_key(encrypted_key)
    ref = (parsed.root_key_id, parsed.root_key_version, int(parsed.wrap_algorithm))
    found = None if versions is None else versions.get(ref)
    if found is None:
        try:
            found = unwrapping_version(db, *ref[:2], parsed.wrap_algorithm, keys)
        except PermanentError as e:
            found = e
        if versions is not None:
            versions[ref] = found
    if isinstance(found, PermanentError):
        raise found
    version = found
    with hsm.unwrap_data_key(hsm_handle(version), parsed.wrapped) as plaintext:
        if len(plaintext) != KEY_SPEC_LENGTHS[parsed.key_spec]:
            raise IntegrityError()
        return plaintext.b64()


# -- private keys ----------------------------------------------------------------------------------


def validate_private_key(*, pub: str, prv: str, coin: str, source: str, type: str) -> None:
    """Raises InvalidRequest, naming the field and its limit (schemas.limits), when a field of a private key
    to store is malformed or out of range."""
    try:
        check_pub(pub)
        if source not in SOURCES:
            raise FieldError("source must be 'user' or 'backup'")
        if type not in KEY_TYPES:
            raise FieldError("type must be 'independent' or 'tss'")
        check_coin(coin)
        check_prv(prv)
    except FieldError as e:
        raise InvalidRequest(str(e)) from None


def store_private_key(
    hsm: KeyStore,
    db: Session,
    *,
    pub: str,
    prv: str,
    coin: str,
    source: str,
    type: str,
    root_key_id: str | None = None,
    pool: str = "default",
    keys: RootKeyAccess = DIRECT,
) -> StoredPrivateKey:
    """Seals ``prv`` with AES-256-GCM under a fresh HSM data key, bound to its row, and adds the row.

    Returns the stored key's public fields. Raises InvalidRequest, NotFound (root key), or Conflict when
    (pub, source) is already stored.
    """
    validate_private_key(pub=pub, prv=prv, coin=coin, source=source, type=type)
    # The root key (and the caller's permission on it) first: a refused caller learns nothing about
    # which (pub, source) pairs exist.
    version = wrapping_version(db, root_key_id, pool, keys)
    return _add_private_key(hsm, db, version, pub=pub, prv=prv, coin=coin, source=source, type=type)


def _add_private_key(
    hsm: KeyStore,
    db: Session,
    version: RootKeyVersion,
    *,
    pub: str,
    prv: str,
    coin: str,
    source: str,
    type: str,
    exportable: bool = True,
    owner: str | None = None,
) -> StoredPrivateKey:
    """Adds the row of a checked private key sealed under ``version``. Returns its public fields. Raises
    Conflict when (pub, source) is already stored."""
    repo = PrivateKeyRepository(db)
    if repo.exists(pub, source):
        raise PrivateKeyRepository.conflict()
    repo.add(sealed_private_key_row(
        hsm, version, pub=pub, prv=prv, coin=coin, source=source, type=type, exportable=exportable, owner=owner
    ))  # fmt: skip
    return StoredPrivateKey(
        pub=pub, source=source, coin=coin, type=type, root_key_id=version.root_key_id, root_key_version=version.version
    )


def seal_under_root_key(
    hsm: KeyStore, version: RootKeyVersion, secret: SecretBytes, aad: Callable[[bytes], bytes]
) -> tuple[str, str]:
    """Seals ``secret`` with AES-256-GCM inside the HSM under a fresh data key wrapped by ``version``.

    ``aad`` maps the ciphertext's header to the associated data. Returns the ciphertext and the
    ``encryptedDataKey``, both as ``kmsq:v1:`` text.
    """
    handle = hsm_handle(version)
    shell = EncryptedPrivateKey(Aead.AES_256_GCM, os.urandom(GCM_NONCE_LEN), b"")
    wrapped, ciphertext = hsm.seal(handle, secret, shell.nonce, aad(shell.header()))
    data_key = EncryptedDataKey(KeySpec.AES_256, handle.wrap_algorithm, version.root_key_id, version.version, wrapped)
    return EncryptedPrivateKey(shell.aead, shell.nonce, ciphertext).to_text(), data_key.to_text()


def open_under_root_key(
    hsm: KeyStore,
    db: Session,
    root_key_id: str,
    root_key_version: int,
    encrypted: str,
    encrypted_data_key: str,
    aad: Callable[[bytes], bytes],
    keys: RootKeyAccess = DIRECT,
) -> SecretBytes:
    """Opens what :func:`seal_under_root_key` sealed under ``root_key_id`` version ``root_key_version``.

    Returns the secret. Raises IntegrityError (opaque) for a malformed, swapped or tampered ciphertext, or
    what ``check`` raises for a valid reference.
    """
    try:
        data_key = EncryptedDataKey.from_text(encrypted_data_key)
        sealed = EncryptedPrivateKey.from_text(encrypted)
    except FormatError:
        raise IntegrityError() from None
    if (data_key.root_key_id, data_key.root_key_version) != (root_key_id, root_key_version):
        raise IntegrityError()
    if data_key.key_spec is not KeySpec.AES_256:  # what seal_under_root_key makes
        raise IntegrityError()
    version = unwrapping_version(db, root_key_id, root_key_version, data_key.wrap_algorithm, keys)
    return hsm.open(hsm_handle(version), data_key.wrapped, sealed.nonce, aad(sealed.header()), sealed.ciphertext)


def sealed_private_key_row(
    hsm: KeyStore,
    version: RootKeyVersion,
    *,
    pub: str,
    prv: str,
    coin: str,
    source: str,
    type: str,
    exportable: bool = True,
    owner: str | None = None,
) -> PrivateKey:
    """Returns a new ``private_keys`` row: ``prv`` sealed with AES-256-GCM inside the HSM under a fresh data
    key wrapped by ``version``, with the row's fields (``exportable`` and ``owner`` included) as associated data.
    Adds nothing to a session."""
    context = PrivateKeyContext(
        pub=pub, source=source, coin=coin, type=type, root_key_id=version.root_key_id,
        root_key_version=version.version, exportable=exportable, owner=owner,
    )  # fmt: skip
    with SecretBytes.from_str(prv) as plaintext:
        encrypted_prv, encrypted_data_key = seal_under_root_key(hsm, version, plaintext, context.associated_data)
    return PrivateKey(
        pub=pub,
        source=source,
        coin=coin,
        type=type,
        provider=PROVIDER,
        root_key=version.root_key_id,
        root_key_version=version.version,
        format_version=FORMAT_VERSION,
        encrypted_prv=encrypted_prv,
        encrypted_data_key=encrypted_data_key,
        exportable=exportable,
        owner=owner,
    )


def get_private_key(
    hsm: KeyStore,
    db: Session,
    pub: str,
    source: str,
    keys: RootKeyAccess = DIRECT,
    *,
    for_signing: bool = False,
) -> PrivateKeyRecord:
    """Reads and opens the private key stored for (pub, source): to export it, or ``for_signing`` inside the
    worker (only a key generated inside kmsq signs).

    Returns it with its public fields. Raises NotFound when absent, NotExportable for a generated key
    (unless ``for_signing``), InvalidRequest for a stored key asked to sign, and IntegrityError when the row's
    ciphertexts do not authenticate against the row (tampered, swapped between rows, wrong root key, or its
    ``exportable`` flag changed).
    """
    return open_private_key(hsm, db, private_key_row(db, pub, source, for_signing=for_signing), keys)


def private_key_row(db: Session, pub: str, source: str, *, for_signing: bool = False) -> PrivateKey:
    """Returns the ``private_keys`` row of (pub, source) if it may be exported, or ``for_signing`` if it may sign.
    Raises InvalidRequest, NotFound, NotExportable or IntegrityError as :func:`get_private_key`."""
    if source not in SOURCES:
        raise InvalidRequest("source must be 'user' or 'backup'")
    row = PrivateKeyRepository(db).get(pub, source)
    if row is None:
        raise NotFound("no private key for this pub and source")
    if row.format_version != FORMAT_VERSION:
        raise IntegrityError()
    if not for_signing and not row.exportable:
        raise NotExportable()
    if for_signing and row.exportable:
        raise InvalidRequest("only a key generated by kmsq (generate_signing_key) signs")
    return row


def context_of(row: PrivateKey) -> PrivateKeyContext:
    """The associated data context of a stored row (what its ciphertext was sealed with, if the row is intact)."""
    return PrivateKeyContext(
        pub=row.pub, source=row.source, coin=row.coin, type=row.type,
        root_key_id=row.root_key, root_key_version=aad_version(row), exportable=row.exportable, owner=row.owner,
    )  # fmt: skip


def open_private_key(hsm: KeyStore, db: Session, row: PrivateKey, keys: RootKeyAccess = DIRECT) -> PrivateKeyRecord:
    """Returns the opened private key of ``row``. Raises IntegrityError when it does not authenticate."""
    context = context_of(row)
    with open_under_root_key(
        hsm, db, row.root_key, row.root_key_version, row.encrypted_prv, row.encrypted_data_key,
        context.associated_data, keys,
    ) as plaintext:  # fmt: skip
        try:
            prv = plaintext.text()
        except UnicodeDecodeError:
            raise IntegrityError() from None
    return PrivateKeyRecord(
        pub=row.pub, source=row.source, coin=row.coin, type=row.type, prv=prv,
        root_key_id=row.root_key, root_key_version=row.root_key_version,
    )  # fmt: skip


# -- keys generated inside kmsq for signing ------------------------------------------------------------


def generate_signing_key(
    hsm: KeyStore,
    db: Session,
    *,
    coin: str,
    source: str,
    type: str,
    root_key_id: str | None = None,
    in_hsm: bool = False,
    pool: str = "default",
    keys: RootKeyAccess = DIRECT,
    owner: str | None = None,
) -> StoredPrivateKey:
    """Generates a BIP32 root key from 64 bytes of the HSM's random generator and stores its xprv sealed like
    a stored private key, never exportable; ``pub`` is its xpub. With ``in_hsm`` (ETH-like coins) the key is
    a secp256k1 key pair made and kept in the token instead; the row holds a reference to it and ``pub`` is an
    xpub of its public key. That key is destroyed again when ``db``'s transaction does not commit.

    Returns the stored key's public fields. Raises InvalidRequest (``tss``, a coin kmsq does not sign for,
    ``in_hsm`` for a UTXO coin, a malformed field), NotFound (root key), HsmError (a token without secp256k1),
    or Conflict (the xpub is stored already: a repeated seed).
    """
    if type != "independent":
        raise InvalidRequest("kmsq generates independent (multisig) keys only; type must be 'independent'")
    family = signing_family(coin)
    if family is None:
        raise InvalidRequest(f"kmsq does not generate signing keys for coin {coin[:32]!r}")
    if in_hsm and family != "eth":
        raise InvalidRequest("in_hsm keys sign ETH-like coins only (a PSBT needs BIP32 derivation, which a token "
                             "key cannot do)")  # fmt: skip
    version = wrapping_version(db, root_key_id, pool, keys)
    if in_hsm:
        key_id = signing.token_key_id(hsm.random(16))
        _TokenKeyGuard(hsm, key_id).listen(db)  # a rollback does not remove a token key: the guard destroys it
        xpub = signing.token_xpub(hsm.create_ec_signing_key(key_id), hsm.random(32))
        reference = signing.token_key_reference(key_id)
        validate_private_key(pub=xpub, prv=reference, coin=coin, source=source, type=type)
        return _add_private_key(
            hsm,
            db,
            version,
            pub=xpub,
            prv=reference,
            coin=coin,
            source=source,
            type=type,
            exportable=False,
            owner=owner,
        )
    key = signing.bip32_root(hsm.random(signing.SEED_BYTES))
    validate_private_key(pub=key.xpub, prv=key.xprv, coin=coin, source=source, type=type)
    return _add_private_key(
        hsm,
        db,
        version,
        pub=key.xpub,
        prv=key.xprv,
        coin=coin,
        source=source,
        type=type,
        exportable=False,
        owner=owner,
    )


class _TokenKeyGuard:
    """Destroys the token key ``key_id`` when the transaction that makes it ends without committing (a duplicate
    delivery that lost the race on its request record, a database error, an exception after the key was made):
    only the row names the key, and a rollback leaves the token as it is. Only when that is certain: once the
    database's commit began and did not return, the row may be there, so the key is kept and logged (``kmsq
    signing-key orphans`` removes it when no row names it)."""

    def __init__(self, hsm: KeyStore, key_id: bytes) -> None:
        self.hsm = hsm
        self.key_id = key_id
        self.committing = False  # the root transaction's COMMIT began (a savepoint's release is not one)
        self.committed = False
        self.over = False  # the transaction ended: the listeners do nothing more (removing them while the session
        # dispatches its events is not allowed)

    def listen(self, db: Session) -> None:
        event.listen(db.connection(), "commit", self._committing)  # the connection's: fired for the root only
        event.listen(db, "after_commit", self._after_commit)  # fired for savepoints too
        event.listen(db, "after_transaction_end", self._ended)

    def _committing(self, connection: Any) -> None:
        self.committing = True

    def _after_commit(self, session: Session) -> None:
        self.committed = self.committed or self.committing  # after the COMMIT: the root's

    def _ended(self, session: Session, transaction: SessionTransaction) -> None:
        if self.over or transaction.parent is not None:  # over, or a savepoint
            return
        self.over = True
        label = self.key_id.decode("ascii")
        if self.committed:
            return
        if self.committing:
            log.warning("token key %s kept: the commit of the transaction that made it failed, so its row may be "
                        "there (kmsq signing-key orphans removes it if none names it)", label)  # fmt: skip
            return
        try:
            self.hsm.destroy_ec_signing_key(self.key_id)
        except NotFound:
            pass  # never made (the token failed first)
        except Exception as e:  # the transaction's own error is the one to raise
            log.error("token key %s of a rolled-back transaction was not destroyed (%s): run kmsq signing-key "
                      "orphans --remove", label, type(e).__name__)  # fmt: skip


@dataclass(frozen=True)
class Signature:
    """A signature made by a generated key, and what the audit record names."""

    signature: str
    coin: str
    root_key_id: str
    root_key_version: int


def sign_payload(
    hsm: KeyStore,
    db: Session,
    *,
    pub: str,
    source: str,
    payload: str,
    algorithm: str,
    caller: str,
    keys: RootKeyAccess = DIRECT,
    hash_allowed: bool = True,
    batch: SigningBatch | None = None,
) -> Signature:
    """Signs ``payload`` with the generated key (pub, source) (see :mod:`worker.signing`) for ``caller``. The
    payload is checked against the key's coin, and against the signing rules that bind the key
    (worker.signing_policy), before the key is opened; the signature's signing log entry joins ``db``'s
    transaction. ``batch`` is what a batch read once for all of its items (:func:`begin_signing_batch`).

    Raises NotFound, InvalidRequest (a stored key, a coin kmsq does not sign for, a malformed payload),
    Forbidden (a bare hash, unless ``hash_allowed``: the caller's sign_hash permission), PolicyDenied (a signing
    rule) or IntegrityError (a tampered row).
    """
    row = batch.found.get((pub, source)) if batch is not None else None
    if row is None:
        row = private_key_row(db, pub, source, for_signing=True)
    signable = signing.check_signable(row.coin, payload, algorithm)  # before the key is opened
    rules = batch.rules if batch is not None else keys.rows.signing_rules(db)
    documents = signing_policy.applicable(rules, pub=row.pub, coin=row.coin, caller=caller)
    signing_policy.check_owner(row.owner, caller, documents)
    if signable.digest is not None and not hash_allowed:
        raise Forbidden("signing a bare hash needs the sign_hash permission; sign_operation signs what rules can judge")
    spend = None if signable.psbt is None else signing_rules.analyse(signable.psbt, row.coin, row.pub)
    signing_policy.judge(db, documents, spend, pub=row.pub, coin=row.coin, caller=caller)
    key = batch.opened.get((pub, source)) if batch is not None else None
    if key is None:
        key = open_private_key(hsm, db, row, keys)
        if batch is not None:
            batch.opened[(pub, source)] = key
    return _sign_and_record(hsm, db, key, signable, caller=caller, row=row,
                            payload_digest=signing.payload_digest(payload), spend=spend)  # fmt: skip


def _sign_and_record(
    hsm: KeyStore, db: Session, key: PrivateKeyRecord, signable: signing.Signable, *, caller: str, row: PrivateKey,
    payload_digest: str, spend: signing_rules.Spend | None,
) -> Signature:  # fmt: skip
    """Signs ``signable`` with the opened ``key`` (its xprv here, or its token key with CKM_ECDSA in the HSM) and
    adds the signature's signing log entry to ``db``'s transaction. Returns the signature. Raises IntegrityError
    for a token key asked to sign anything but a hash (a token key is made for ETH-like coins only)."""
    token_key = signing.token_key_of(key.prv)
    if token_key is None:
        signature = signing.sign(key.prv, signable)
    elif signable.digest is not None:  # kept in the token: CKM_ECDSA there, v by recovery here
        signature = signing.eth_signature_of(hsm.sign_ecdsa(token_key, signable.digest), signable.digest, key.pub)
    else:
        raise IntegrityError()
    signing_policy.record(db, caller=caller, pub=row.pub, coin=row.coin, payload_digest=payload_digest, spend=spend)
    return Signature(signature, key.coin, key.root_key_id, key.root_key_version)


@dataclass
class SigningBatch:
    """What a batch of signatures reads once for all of its items: the signing rules, the rows of its keys, and the
    keys it opened (which the batch drops when it ends)."""

    rules: dict[str, SigningRulesRow]
    found: dict[tuple[str, str], PrivateKey] = field(default_factory=dict)
    opened: dict[tuple[str, str], PrivateKeyRecord] = field(default_factory=dict)


def begin_signing_batch(
    db: Session, keys_of_items: Sequence[tuple[str, str]], *, caller: str, keys: RootKeyAccess = DIRECT
) -> SigningBatch:
    """Reads the signing rules and the rows of the generated keys (pub, source) of ``keys_of_items`` once, and
    takes, in one sorted pass, the signing-rule locks that signing with each of them for ``caller`` would take one
    by one (worker.signing_policy.lock): a batch whose items took them in their own order could wait in a cycle
    with another batch. A key that does not resolve is left to its item, whose error it is. Raises
    PolicyViolation when a rules row fails its check."""
    batch = SigningBatch(keys.rows.signing_rules(db))
    subjects: set[str] = set()
    for pub, source in dict.fromkeys(keys_of_items):
        try:
            row = private_key_row(db, pub, source, for_signing=True)
        except ServiceError:
            continue
        batch.found[(pub, source)] = row
        documents = signing_policy.applicable(batch.rules, pub=row.pub, coin=row.coin, caller=caller)
        subjects |= signing_policy.subjects(documents, pub=row.pub, coin=row.coin, caller=caller)
    signing_policy.lock(db, subjects)
    return batch


def sign_operation(
    hsm: KeyStore,
    db: Session,
    *,
    pub: str,
    source: str,
    operation: eth_operation.Operation,
    caller: str,
    keys: RootKeyAccess = DIRECT,
) -> tuple[str, Signature]:
    """Computes the operation hash of a BitGo multisig wallet's ``sendMultiSig`` (worker.eth_operation) for the
    generated ETH-like key (pub, source), judges the operation by the signing rules that bind the key, and signs the
    hash. Returns the hash (``0x`` hex) and the signature.

    Raises NotFound, InvalidRequest (a stored key, a coin whose operations kmsq does not hash), PolicyDenied or
    IntegrityError."""
    row = private_key_row(db, pub, source, for_signing=True)
    prefix = operation_prefix(row.coin)
    if prefix is None or signing_family(row.coin) != "eth":
        raise InvalidRequest(f"kmsq does not hash the wallet operations of coin {row.coin[:32]!r}")
    documents = signing_policy.applicable(keys.rows.signing_rules(db), pub=row.pub, coin=row.coin, caller=caller)
    signing_policy.check_owner(row.owner, caller, documents)
    digest = eth_operation.operation_hash(prefix, operation)
    spend = signing_rules.operation_spend(operation.destination, operation.value, bool(operation.data))
    signing_policy.judge(db, documents, spend, pub=row.pub, coin=row.coin, caller=caller)
    key = open_private_key(hsm, db, row, keys)
    signature = _sign_and_record(hsm, db, key, signing.Signable(digest=digest), caller=caller, row=row,
                                 payload_digest=digest.hex(), spend=spend)  # fmt: skip
    return "0x" + digest.hex(), signature
