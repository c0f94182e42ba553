"""What each operation returns: one typed model per kind of result (frozen, closed, strict).

A field marked :data:`Sealed` holds a secret: the worker seals it to the caller's reply key and it travels in the
reply's ``sealed`` map, never in ``result`` (see :class:`schemas.messages.Reply`). A batch returns ``items``, each
the reply of its single operation or an :class:`ItemError`; the items' sealed fields travel together as one sealed
JSON list named ``items``, in item order (``null`` for an item without one).

The worker builds these models; the caller checks every reply it opens against its operation's model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel

from schemas.requests import Frozen
from schemas.wire import ErrorCode


@dataclass(frozen=True)
class SealedToCaller:
    """Marks a reply field as a secret sealed to the caller (``Annotated[str, SealedToCaller()]``)."""


Sealed = Annotated[str, SealedToCaller()]


@functools.cache  # called per item of a batch reply: a thousand times a message
def sealed_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Returns the names of ``model``'s sealed fields, in declaration order."""
    return tuple(
        name for name, info in model.model_fields.items() if any(isinstance(m, SealedToCaller) for m in info.metadata)
    )


class DataKeyReply(Frozen):
    """A new data key: wrapped, and in plaintext (base64 of its bytes)."""

    encryptedKey: str
    plaintextKey: Sealed


class WrappedDataKeyReply(Frozen):
    """A data key, wrapped only (new, or wrapped again under the current root key version)."""

    encryptedKey: str


class PlaintextKeyReply(Frozen):
    """A data key in plaintext: exactly the string ``generate_data_key`` returned."""

    plaintextKey: Sealed


class StoredKeyReply(Frozen):
    """The public fields of a private key stored, or generated, inside kmsq."""

    pub: str
    coin: str
    source: str
    type: str


class PrivateKeyReply(StoredKeyReply):
    """A stored private key and its public fields."""

    prv: Sealed


class SignatureReply(Frozen):
    """A signature by a generated key: the PSBT with its signatures (UTXO coins) or ``0x`` + r + s + v."""

    signature: str


class SignedOperationReply(Frozen):
    """The operation hash kmsq computed and its signature (``0x`` + r + s + v)."""

    operation_hash: str
    signature: str


class StoredResultReply(Frozen):
    """The stored reply envelope of an earlier request (JSON text), and that request's id."""

    reply: str
    request_id: str


class ItemError(Frozen):
    """One item of a batch that failed: its error code and a caller-safe message."""

    error: ErrorCode
    message: str


class SignaturesReply(Frozen):
    """``sign_many``: each payload's signature, or its error."""

    items: list[SignatureReply | ItemError]


class DataKeysReply(Frozen):
    """``generate_data_keys``: the new keys, with plaintext or without."""

    items: list[DataKeyReply | WrappedDataKeyReply]


class PlaintextKeysReply(Frozen):
    """``decrypt_data_keys``: each key's plaintext, or its error."""

    items: list[PlaintextKeyReply | ItemError]


class WrappedDataKeysReply(Frozen):
    """``rewrap_data_keys``: each key wrapped under its root key's current version, or its error."""

    items: list[WrappedDataKeyReply | ItemError]


class StoredKeysReply(Frozen):
    """``put_keys``: each stored key's public fields, or its error."""

    items: list[StoredKeyReply | ItemError]


class PrivateKeysReply(Frozen):
    """``get_keys``: each private key with its public fields, or its error."""

    items: list[PrivateKeyReply | ItemError]
