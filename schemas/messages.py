"""Request and reply messages of the queue protocol, version 1 (pydantic v2, frozen, closed, strict).

A request travels as the Celery task ``kmsq.<op>`` with four string arguments::

    [caller, key_id, body (base64url of the JSON bytes of a Request), signature (base64url)]

The worker looks up ``caller``/``key_id``, verifies the signature over the raw body bytes (see
:mod:`schemas.wire`) and only then parses them into :class:`Request`. A reply is published to the request's
``reply_queue`` as the JSON object :class:`ReplyEnvelope`; its ``body`` parses into :class:`Reply`.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from schemas.limits import (
    MAX_BATCH_ITEMS,
    MAX_PRV_BYTES,
    MAX_REPLY_BYTES,
    NAME_PATTERN,
    ROOT_KEY_ID_PATTERN,
    Coin,
    EncryptedKey,
    FieldError,
    KeyType,
    Pub,
    SignablePayload,
    Source,
    check_prv_size,
)
from schemas.wire import REPLY_QUEUE_PREFIX, ErrorCode, b64u_length, sealed_length

CallerName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
PoolName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
RootKeyId = Annotated[str, StringConstraints(pattern=ROOT_KEY_ID_PATTERN)]
KeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{43}$")]  # 32 raw bytes, base64url
REPLY_QUEUE_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Operations that return a plaintext secret to the caller: they need the caller's ``plaintext`` permission.
PLAINTEXT_OPS = frozenset({"generate_data_key", "decrypt_data_key", "get_key"})
# Operations a caller may be allowed (``kmsq caller add --allow``). ``get_result`` needs no permission:
# it only returns the caller's own, already sealed replies.
ALLOWABLE_OPS = (
    "generate_data_key",
    "generate_data_key_without_plaintext",
    "decrypt_data_key",
    "rewrap_data_key",
    "put_key",
    "get_key",
    "generate_signing_key",
    "sign",
)


def _check_sealed_prv(value: str) -> str:
    # The seal's length gives away the plaintext's: refuse an oversized prv before anything opens it.
    if not value:
        raise FieldError("prv must not be empty")
    if len(value) > sealed_length(MAX_PRV_BYTES):
        check_prv_size(MAX_PRV_BYTES + 1)
    return value


# put_key's prv, HPKE-sealed to the pool's transport key (schemas.wire.seal_private_key).
SealedPrv = Annotated[str, AfterValidator(_check_sealed_prv)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class GenerateDataKey(_Frozen):
    """A new AES-256 data key, returned wrapped (``encryptedKey``) and sealed in plaintext."""

    op: Literal["generate_data_key"]
    root_key_id: RootKeyId | None = None
    key_spec: Literal["AES-256"] = "AES-256"


class GenerateDataKeyWithoutPlaintext(_Frozen):
    """A new AES-256 data key, returned wrapped only."""

    op: Literal["generate_data_key_without_plaintext"]
    root_key_id: RootKeyId | None = None
    key_spec: Literal["AES-256"] = "AES-256"


class DecryptDataKey(_Frozen):
    """Unwraps an ``encryptedKey``; the plaintext comes back sealed."""

    op: Literal["decrypt_data_key"]
    encrypted_key: EncryptedKey


class RewrapDataKey(_Frozen):
    """Wraps an ``encryptedKey`` again under its root key's current version, inside the HSM; the plaintext
    never leaves it. Its own permission (not ``decrypt_data_key``), no plaintext permission needed."""

    op: Literal["rewrap_data_key"]
    encrypted_key: EncryptedKey


class PutKey(_Frozen):
    """Stores a private key. ``prv`` is sealed to the pool's transport key (see ``schemas.wire``)."""

    op: Literal["put_key"]
    pub: Pub
    prv: SealedPrv
    coin: Coin
    source: Source
    type: KeyType
    root_key_id: RootKeyId | None = None


class GetKey(_Frozen):
    """Reads a stored private key; ``prv`` comes back sealed."""

    op: Literal["get_key"]
    pub: Pub
    source: Source


class GenerateSigningKey(_Frozen):
    """Generates a BIP32 key inside the worker (seed from the HSM) and stores it, never exportable; returns its
    xpub as ``pub``."""

    op: Literal["generate_signing_key"]
    coin: Coin
    source: Source
    type: KeyType
    root_key_id: RootKeyId | None = None
    # ETH-like coins: a secp256k1 key made and kept in the token (CKM_ECDSA), not a BIP32 seed.
    in_hsm: bool = False


class Sign(_Frozen):
    """Signs ``payload`` with a generated key: a PSBT (UTXO coins) or a 32-byte hash (ETH-like coins)."""

    op: Literal["sign"]
    pub: Pub
    source: Source
    payload: SignablePayload
    algorithm: Literal["ecdsa", "eddsa"]


class GetResult(_Frozen):
    """Fetches the stored reply of one of the caller's earlier requests."""

    op: Literal["get_result"]
    request_id: uuid.UUID


# -- batches: one signature, one transaction and one sealed reply for many items ------------------------


class GenerateDataKeys(_Frozen):
    """``count`` new data keys. With ``with_plaintext`` it needs the ``generate_data_key`` permission (and
    plaintext), without it ``generate_data_key_without_plaintext``."""

    op: Literal["generate_data_keys"]
    count: Annotated[int, Field(ge=1, le=MAX_BATCH_ITEMS)]
    with_plaintext: bool = True
    root_key_id: RootKeyId | None = None
    key_spec: Literal["AES-256"] = "AES-256"


class DecryptDataKeys(_Frozen):
    """Unwraps many ``encryptedKey`` strings; needs the ``decrypt_data_key`` permission."""

    op: Literal["decrypt_data_keys"]
    # Each key is checked on its own (an oversized one fails alone); the message size bounds them all.
    encrypted_keys: Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class RewrapDataKeys(_Frozen):
    """Rewraps many ``encryptedKey`` strings; needs the ``rewrap_data_key`` permission."""

    op: Literal["rewrap_data_keys"]
    encrypted_keys: Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class PutKeyItem(_Frozen):
    """The public fields of one private key of a ``put_keys`` batch. Not checked here: the worker checks
    each item on its own (schemas.limits), so that a malformed item fails alone (``invalid``); the message
    size bounds them all."""

    pub: str
    coin: str
    source: str
    type: str


class PutKeys(_Frozen):
    """Stores many private keys; needs the ``put_key`` permission. ``prvs`` is one HPKE seal, to the pool's
    transport key, of the canonical JSON list of the private keys (strings), in the order of ``items``."""

    op: Literal["put_keys"]
    items: Annotated[list[PutKeyItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]
    prvs: Annotated[str, StringConstraints(min_length=1)]
    root_key_id: RootKeyId | None = None


class KeyRef(_Frozen):
    """One private key of a ``get_keys`` batch. Not checked here, like :class:`PutKeyItem`: an item with a bad
    field fails alone."""

    pub: str
    source: str


class GetKeys(_Frozen):
    """Reads many stored private keys; needs the ``get_key`` permission (and plaintext). Each item comes back
    as its public fields or ``{"error", "message"}`` (``not_found``...); the ``prv`` strings are sealed
    together as one JSON list."""

    op: Literal["get_keys"]
    keys: Annotated[list[KeyRef], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


BATCH_OPS = frozenset({"generate_data_keys", "decrypt_data_keys", "rewrap_data_keys", "put_keys", "get_keys"})


_BATCH_PERMISSION = {
    "decrypt_data_keys": "decrypt_data_key",
    "rewrap_data_keys": "rewrap_data_key",
    "put_keys": "put_key",
    "get_keys": "get_key",
}


def permission_of(op: str, params: object) -> str:
    """Returns the permission an operation needs (batch operations need their single operation's)."""
    if op == "generate_data_keys":
        return "generate_data_key" if getattr(params, "with_plaintext", True) else "generate_data_key_without_plaintext"
    return _BATCH_PERMISSION.get(op, op)


Operation = Annotated[
    GenerateDataKey
    | GenerateDataKeyWithoutPlaintext
    | DecryptDataKey
    | RewrapDataKey
    | PutKey
    | GetKey
    | GenerateSigningKey
    | Sign
    | GetResult
    | GenerateDataKeys
    | DecryptDataKeys
    | RewrapDataKeys
    | PutKeys
    | GetKeys,
    Field(discriminator="op"),
]
OPS = (*ALLOWABLE_OPS, "get_result", *sorted(BATCH_OPS))


def _reply_queue_check(value: str) -> str:
    if not value.startswith(REPLY_QUEUE_PREFIX):
        raise ValueError(f"reply_queue must start with {REPLY_QUEUE_PREFIX!r}")
    return value


class Request(_Frozen):
    """A signed request. ``reply_queue`` must be ``kmsq.reply.<caller>.<suffix>`` (checked by the worker)."""

    v: Literal[1]
    caller: CallerName
    key_id: Annotated[str, StringConstraints(pattern=r"^ed25519:[0-9a-f]{16}$")]
    request_id: uuid.UUID
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    pool: PoolName
    reply_queue: Annotated[str, StringConstraints(max_length=200), AfterValidator(_reply_queue_check)]
    reply_key: KeyB64
    params: Operation


def reply_queue_for(caller: str, suffix: str) -> str:
    """Returns the reply queue name ``kmsq.reply.<caller>.<suffix>``. Raises ValueError for a bad suffix."""
    if not REPLY_QUEUE_SUFFIX.fullmatch(suffix):
        raise ValueError("reply queue suffix must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return f"{REPLY_QUEUE_PREFIX}{caller}.{suffix}"


def reply_queue_belongs_to(queue: str, caller: str) -> bool:
    """Returns True when ``queue`` is one of ``caller``'s reply queues."""
    prefix = f"{REPLY_QUEUE_PREFIX}{caller}."
    return queue.startswith(prefix) and bool(REPLY_QUEUE_SUFFIX.fullmatch(queue[len(prefix) :]))


class ErrorBody(_Frozen):
    """A failure: a stable ``code`` (``schemas.wire.ErrorCode``) and a caller-safe message."""

    code: ErrorCode
    message: str


# Batch replies carry ``items``: one object per item, its fields or ``{"error": code, "message": ...}``.
ResultValue = str | int | bool | None | list[dict[str, str | None]]


class Reply(_Frozen):
    """A worker's signed answer. Secret fields are in ``sealed`` (field name → HPKE ciphertext, base64url)."""

    v: Literal[1]
    request_id: uuid.UUID
    caller: str
    op: str
    status: Literal["ok", "error"]
    result: dict[str, ResultValue] = Field(default_factory=dict)
    sealed: dict[str, str] = Field(default_factory=dict)
    error: ErrorBody | None = None
    pool: str
    worker_key_id: str
    issued_at: datetime
    # SHA-256 of the task arguments as the worker received them (signature included, see
    # schemas.wire.args_digest): a caller accepts a reply only for the message it sent, so nobody can
    # answer its request with an error provoked by a forged copy.
    request_digest: str


class ReplyEnvelope(_Frozen):
    """What a reply queue carries: the reply's JSON bytes (base64url) and the worker's signature."""

    body: Annotated[str, StringConstraints(max_length=b64u_length(MAX_REPLY_BYTES))]
    signature: str
    key_id: str
