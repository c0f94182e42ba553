"""The parameters of each operation of the queue protocol, version 1: one pydantic model per operation (frozen,
closed, strict), discriminated by ``op``. :mod:`schemas.operations` declares each operation with its model; the
signed :class:`schemas.messages.Request` carries one of them as ``params``."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from schemas.limits import (
    MAX_BATCH_ITEMS,
    MAX_PRV_BYTES,
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
from schemas.wire import sealed_length

RootKeyId = Annotated[str, StringConstraints(pattern=ROOT_KEY_ID_PATTERN)]


def _check_sealed_prv(value: str) -> str:
    # The seal's length gives away the plaintext's: refuse an oversized prv before anything opens it.
    if not value:
        raise FieldError("prv must not be empty")
    if len(value) > sealed_length(MAX_PRV_BYTES):
        check_prv_size(MAX_PRV_BYTES + 1)
    return value


# put_key's prv, HPKE-sealed to the pool's transport key (schemas.wire.seal_private_key).
SealedPrv = Annotated[str, AfterValidator(_check_sealed_prv)]


class Frozen(BaseModel):
    """A closed, immutable, strict model: the base of every message model."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class RequestParams(Frozen):
    """The parameters of one operation; each operation's model narrows ``op`` to its name."""

    op: str


class GenerateDataKey(RequestParams):
    """A new AES-256 data key, returned wrapped (``encryptedKey``) and sealed in plaintext."""

    op: Literal["generate_data_key"]
    root_key_id: RootKeyId | None = None
    key_spec: Literal["AES-256"] = "AES-256"


class GenerateDataKeyWithoutPlaintext(RequestParams):
    """A new AES-256 data key, returned wrapped only."""

    op: Literal["generate_data_key_without_plaintext"]
    root_key_id: RootKeyId | None = None
    key_spec: Literal["AES-256"] = "AES-256"


class DecryptDataKey(RequestParams):
    """Unwraps an ``encryptedKey``; the plaintext comes back sealed."""

    op: Literal["decrypt_data_key"]
    encrypted_key: EncryptedKey


class RewrapDataKey(RequestParams):
    """Wraps an ``encryptedKey`` again under its root key's current version, inside the HSM; the plaintext
    never leaves it. Its own permission (not ``decrypt_data_key``), no plaintext permission needed."""

    op: Literal["rewrap_data_key"]
    encrypted_key: EncryptedKey


class PutKey(RequestParams):
    """Stores a private key. ``prv`` is sealed to the pool's transport key (see ``schemas.wire``)."""

    op: Literal["put_key"]
    pub: Pub
    prv: SealedPrv
    coin: Coin
    source: Source
    type: KeyType
    root_key_id: RootKeyId | None = None


class GetKey(RequestParams):
    """Reads a stored private key; ``prv`` comes back sealed."""

    op: Literal["get_key"]
    pub: Pub
    source: Source


class GenerateSigningKey(RequestParams):
    """Generates a BIP32 key inside the worker (seed from the HSM) and stores it, never exportable; returns its
    xpub as ``pub``."""

    op: Literal["generate_signing_key"]
    coin: Coin
    source: Source
    type: KeyType
    root_key_id: RootKeyId | None = None
    # ETH-like coins: a secp256k1 key made and kept in the token (CKM_ECDSA), not a BIP32 seed.
    in_hsm: bool = False


class Sign(RequestParams):
    """Signs ``payload`` with a generated key: a PSBT (UTXO coins) or a 32-byte hash (ETH-like coins)."""

    op: Literal["sign"]
    pub: Pub
    source: Source
    payload: SignablePayload
    algorithm: Literal["ecdsa", "eddsa"]


MAX_OPERATION_DATA_BYTES = 65_536
EthAddress = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
Wei = Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]{0,76})$")]  # decimal, below 10**77 < 2**256
CallData = Annotated[
    str, StringConstraints(max_length=2 + 2 * MAX_OPERATION_DATA_BYTES, pattern=r"^0x([0-9a-fA-F]{2})*$")
]
Uint64 = Annotated[int, Field(ge=0, lt=2**64)]


class SignOperation(RequestParams):
    """Signs a BitGo multisig wallet operation (``sendMultiSig``: to, value in wei, call data, expire time,
    sequence id) with a generated ETH-like key: kmsq computes the operation hash, so the signing rules judge the
    destination and the value instead of a bare hash."""

    op: Literal["sign_operation"]
    pub: Pub
    source: Source
    to: EthAddress
    value: Wei
    data: CallData = "0x"
    expire_time: Uint64
    sequence_id: Uint64


class GetResult(RequestParams):
    """Fetches the stored reply of one of the caller's earlier requests."""

    op: Literal["get_result"]
    request_id: uuid.UUID


# -- batches: one signature, one transaction and one sealed reply for many items ------------------------


class GenerateDataKeys(RequestParams):
    """``count`` new data keys. With ``with_plaintext`` it needs the ``generate_data_key`` permission (and
    plaintext), without it ``generate_data_key_without_plaintext``."""

    op: Literal["generate_data_keys"]
    count: Annotated[int, Field(ge=1, le=MAX_BATCH_ITEMS)]
    with_plaintext: bool = True
    root_key_id: RootKeyId | None = None
    key_spec: Literal["AES-256"] = "AES-256"


class DecryptDataKeys(RequestParams):
    """Unwraps many ``encryptedKey`` strings; needs the ``decrypt_data_key`` permission."""

    op: Literal["decrypt_data_keys"]
    # Each key is checked on its own (an oversized one fails alone); the message size bounds them all.
    encrypted_keys: Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class RewrapDataKeys(RequestParams):
    """Rewraps many ``encryptedKey`` strings; needs the ``rewrap_data_key`` permission."""

    op: Literal["rewrap_data_keys"]
    encrypted_keys: Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class PutKeyItem(Frozen):
    """The public fields of one private key of a ``put_keys`` batch. Not checked here: the worker checks
    each item on its own (schemas.limits), so that a malformed item fails alone (``invalid``); the message
    size bounds them all."""

    pub: str
    coin: str
    source: str
    type: str


class PutKeys(RequestParams):
    """Stores many private keys; needs the ``put_key`` permission. ``prvs`` is one HPKE seal, to the pool's
    transport key, of the canonical JSON list of the private keys (strings), in the order of ``items``."""

    op: Literal["put_keys"]
    items: Annotated[list[PutKeyItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]
    prvs: Annotated[str, StringConstraints(min_length=1)]
    root_key_id: RootKeyId | None = None


class KeyRef(Frozen):
    """One private key of a ``get_keys`` batch. Not checked here, like :class:`PutKeyItem`: an item with a bad
    field fails alone."""

    pub: str
    source: str


class SignItem(Frozen):
    """One payload of a ``sign_many`` batch (checked as ``sign``'s fields; an item with a bad payload fails alone
    only when it parses here: the message is one signed whole)."""

    pub: Pub
    source: Source
    payload: SignablePayload
    algorithm: Literal["ecdsa", "eddsa"]


class SignMany(RequestParams):
    """Signs many payloads; needs the ``sign`` permission (and ``sign_hash`` for bare hashes). Each item is
    checked and judged by the signing rules on its own, in order (a window counts the items before it), and comes
    back as its signature or its error; a key is opened once for all of its items."""

    op: Literal["sign_many"]
    items: Annotated[list[SignItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class GetKeys(RequestParams):
    """Reads many stored private keys; needs the ``get_key`` permission (and plaintext). Each item comes back
    as its public fields or ``{"error", "message"}`` (``not_found``...); the ``prv`` strings are sealed
    together as one JSON list."""

    op: Literal["get_keys"]
    keys: Annotated[list[KeyRef], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]
