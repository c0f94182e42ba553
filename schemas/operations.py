"""Every operation of the queue protocol, declared once: :data:`OPERATIONS`.

A row names the operation's request model and typed reply model, the permission a caller needs for it, whether
it returns plaintext, the input field the caller seals to the pool's transport key, which field picks the pool,
its batch form (and whether concurrent single requests may be coalesced into it), and what its audit record
adds. Everything else is read from here: the request union (:data:`Params`), the permissions
(:data:`ALLOWABLE_OPS`, :data:`PLAINTEXT_OPS`, :func:`permission_of`), the worker's tasks and its dispatch to
one handler per family (``worker.handlers``), the caller's codec, SDK, coalescer and commands, and the gateway.

Adding an operation is a request model (:mod:`schemas.requests`), a reply model (:mod:`schemas.replies`, or one
that exists), a row here, a handler in the family's module under ``worker/handlers/``, and its docs and tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, Field

from schemas import replies, requests
from schemas.envelope import TEXT_PREFIX, EncryptedDataKey, FormatError
from schemas.limits import check_prv
from schemas.wire import canonical_json

# The families of operations; each has one handler module, ``worker/handlers/<family>.py``.
Family = Literal["data_keys", "private_keys", "signing", "results"]
# Which request field chooses the pool a request goes to (its root key's pool, or the pool of the root key an
# ``encryptedKey`` names); None: the caller names the pool, or takes the fleet file's default.
PoolFrom = Literal["root_key_id", "encrypted_key", "encrypted_keys"]
# What the audit record of an outcome adds to it, from the request's parameters and the reply (None when the
# request was refused: then the detail precedes the refusal's message). Identifiers and digests only.
AuditDetail = Callable[[Any, Any], str]


@dataclass(frozen=True)
class SealedInput:
    """A request field that the caller seals to the pool's transport key (``schemas.wire.seal_private_key``):
    ``text`` seals a string's UTF-8 bytes, ``json_list`` a list of strings as canonical JSON. ``check`` is the
    plaintext's limit, applied by the caller before sealing (the worker checks again after opening)."""

    field: str
    form: Literal["text", "json_list"]
    check: Callable[[Any], object] | None = None

    def encode(self, plaintext: Any) -> bytes:
        """Returns the bytes sealed for ``plaintext``. Raises ValueError for a value of the wrong form."""
        if self.form == "text" and isinstance(plaintext, str):
            return plaintext.encode("utf-8")
        if self.form == "json_list" and isinstance(plaintext, list) and all(isinstance(p, str) for p in plaintext):
            return canonical_json(plaintext)
        raise ValueError(f"{self.field} must be {'a string' if self.form == 'text' else 'a list of strings'}")


@dataclass(frozen=True)
class Batching:
    """How requests of a single operation travel together as one message of its batch operation ``op``.

    The batch's ``items`` field holds one entry per request: the single request's ``item_fields`` (their value
    when there is one field, an object when there are several; ``count`` holds only how many). The
    ``shared`` fields are the batch's own, equal for all its items; ``fixed`` are what the batch sets to mean
    this single operation. A single operation with a sealed input puts each plaintext in the batch's ``sealed``
    list. With ``coalesce``, the SDK may send concurrent single requests of this operation as one batch, except
    those ``alone`` picks out; with ``dedupe`` (reads), equal requests in one batch are one item.
    """

    op: str
    items: str
    item_fields: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    sealed: str | None = None
    coalesce: bool = True
    alone: Callable[[Mapping[str, Any]], bool] | None = None
    dedupe: bool = False  # the items are reads: equal ones in one batch are asked for once

    def item(self, params: Mapping[str, Any]) -> Any:
        """Returns the batch item that a single request's parameters make (None for a ``count`` batch)."""
        if not self.item_fields:
            return None
        if len(self.item_fields) == 1:
            return params[self.item_fields[0]]
        return {name: params[name] for name in self.item_fields}

    def batch_params(self, shared: Mapping[str, Any], items: list[Any], sealed: list[Any]) -> dict[str, Any]:
        """Returns the batch request's parameters for ``items`` (and their plaintexts to seal, ``sealed``)."""
        params: dict[str, Any] = {"op": self.op, **self.fixed, **shared}
        params[self.items] = len(items) if self.items == "count" else items
        if self.sealed is not None:
            params[self.sealed] = sealed
        return params


@dataclass(frozen=True)
class Operation:
    """One operation of the protocol. See the module docstring."""

    name: str
    summary: str
    request: type[BaseModel]
    reply: type[BaseModel]
    family: Family
    # The permission a caller needs (``kmsq caller add --allow``): a single operation's own name. None for a
    # batch (its items' permission) and for get_result (none: it returns only the caller's own sealed replies).
    permission: str | None
    plaintext: bool = False  # returns plaintext: needs the caller's plaintext permission too
    sealed_input: SealedInput | None = None
    pool_from: PoolFrom | None = None
    batch: Batching | None = None  # a single operation's batch form
    recorded: bool = True  # the reply is stored as the request's outcome (not get_result's: it returns one)
    audit: AuditDetail = lambda params, reply: ""

    @property
    def sealed_reply_fields(self) -> tuple[str, ...]:
        """The reply fields sealed to the caller (a batch's: its items', sealed together as ``items``)."""
        return replies.sealed_fields(self.reply)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()


def _root_key_version(encrypted_key: str) -> int | None:
    try:
        return EncryptedDataKey.from_text(encrypted_key).root_key_version
    except FormatError:
        return None


def _counts(_params: Any, reply: Any) -> str:
    if reply is None:
        return ""
    return f"{len(reply.items)} items, {sum(isinstance(i, replies.ItemError) for i in reply.items)} errors"


def _kmsq_key(params: Mapping[str, Any]) -> bool:
    return str(params.get("encrypted_key", "")).startswith(TEXT_PREFIX)


def _sjcl_goes_alone(params: Mapping[str, Any]) -> bool:
    # The replaced system's envelopes cost PBKDF2 work each, and a message may hold only so much of it.
    return not _kmsq_key(params)


def _psbt_goes_alone(params: Mapping[str, Any]) -> bool:
    # A PSBT costs a worker up to a quarter of a second to sign and may be 2 MiB: coalescing is for hashes.
    return len(str(params.get("payload", ""))) > _COALESCED_PAYLOAD_CHARS


_COALESCED_PAYLOAD_CHARS = 4096
_DATA_KEY_SHARED = ("root_key_id", "key_spec")
_PRIVATE_KEY_FIELDS = ("pub", "coin", "source", "type")

_ROWS = (
    Operation(
        "generate_data_key", "a new AES-256 data key, wrapped and in plaintext", requests.GenerateDataKey,
        replies.DataKeyReply, "data_keys", "generate_data_key", plaintext=True, pool_from="root_key_id",
        batch=Batching("generate_data_keys", "count", shared=_DATA_KEY_SHARED,
                       fixed=MappingProxyType({"with_plaintext": True})),
    ),
    Operation(
        "generate_data_key_without_plaintext", "a new AES-256 data key, wrapped only",
        requests.GenerateDataKeyWithoutPlaintext, replies.WrappedDataKeyReply, "data_keys",
        "generate_data_key_without_plaintext", pool_from="root_key_id",
        batch=Batching("generate_data_keys", "count", shared=_DATA_KEY_SHARED,
                       fixed=MappingProxyType({"with_plaintext": False})),
    ),
    Operation(
        "decrypt_data_key", "the plaintext of an encryptedKey", requests.DecryptDataKey, replies.PlaintextKeyReply,
        "data_keys", "decrypt_data_key", plaintext=True, pool_from="encrypted_key",
        batch=Batching("decrypt_data_keys", "encrypted_keys", ("encrypted_key",), alone=_sjcl_goes_alone,
                       dedupe=True),
        audit=lambda params, reply: (
            "" if reply is None or _kmsq_key({"encrypted_key": params.encrypted_key})
            else "an SJCL envelope of the replaced API"
        ),
    ),
    Operation(
        "rewrap_data_key", "an encryptedKey wrapped again under its root key's current version, inside the HSM",
        requests.RewrapDataKey, replies.WrappedDataKeyReply, "data_keys", "rewrap_data_key",
        pool_from="encrypted_key",
        batch=Batching("rewrap_data_keys", "encrypted_keys", ("encrypted_key",), alone=_sjcl_goes_alone),
        audit=lambda params, reply: (
            "" if reply is None else f"from version {_root_key_version(params.encrypted_key)}"
        ),
    ),
    Operation(
        "put_key", "stores a private key (sealed to the pool's transport key)", requests.PutKey,
        replies.StoredKeyReply, "private_keys", "put_key", sealed_input=SealedInput("prv", "text", check_prv),
        pool_from="root_key_id",
        batch=Batching("put_keys", "items", _PRIVATE_KEY_FIELDS, shared=("root_key_id",), sealed="prvs"),
    ),
    Operation(
        "get_key", "a stored private key", requests.GetKey, replies.PrivateKeyReply, "private_keys", "get_key",
        plaintext=True, batch=Batching("get_keys", "keys", ("pub", "source"), dedupe=True),
    ),
    Operation(
        "generate_signing_key", "a key generated and kept inside kmsq, which signs and is never exported",
        requests.GenerateSigningKey, replies.StoredKeyReply, "signing", "generate_signing_key",
        pool_from="root_key_id", audit=lambda params, reply: "" if reply is None else f"key {reply.pub[:32]}",
    ),
    Operation(
        "sign", "a signature by a generated key: a wallet PSBT (UTXO coins) or a 32-byte hash (ETH-like)",
        requests.Sign, replies.SignatureReply, "signing", "sign",
        batch=Batching("sign_many", "items", ("pub", "source", "payload", "algorithm"), alone=_psbt_goes_alone),
        audit=lambda params, reply: f"key {params.pub[:32]}, payload sha256 {_sha256(params.payload)}",
    ),
    Operation(
        "sign_operation", "a signature of a wallet operation (ETH-like: sendMultiSig's fields) whose hash kmsq "
        "computes, so that its signing rules judge it", requests.SignOperation, replies.SignedOperationReply,
        "signing", "sign_operation",
        audit=lambda params, reply: f"key {params.pub[:32]}, to {params.to}, value {params.value}"
        + ("" if reply is None else f", operation hash {reply.operation_hash}"),
    ),
    Operation(
        "get_result", "the stored reply of one of the caller's earlier requests", requests.GetResult,
        replies.StoredResultReply, "results", None, recorded=False,
        audit=lambda params, reply: "" if reply is None else f"the result of {params.request_id}",
    ),
    Operation(
        "decrypt_data_keys", "decrypt_data_key for many encryptedKeys", requests.DecryptDataKeys,
        replies.PlaintextKeysReply, "data_keys", None, pool_from="encrypted_keys", audit=_counts,
    ),
    Operation(
        "generate_data_keys", "count new data keys, with plaintext or without", requests.GenerateDataKeys,
        replies.DataKeysReply, "data_keys", None, pool_from="root_key_id", audit=_counts,
    ),
    Operation(
        "sign_many", "sign for many payloads, each judged by the signing rules", requests.SignMany,
        replies.SignaturesReply, "signing", None, audit=_counts,
    ),
    Operation(
        "get_keys", "get_key for many keys", requests.GetKeys, replies.PrivateKeysReply, "private_keys", None,
        audit=_counts,
    ),
    Operation(
        "put_keys", "put_key for many keys (their private keys sealed together)", requests.PutKeys,
        replies.StoredKeysReply, "private_keys", None, sealed_input=SealedInput("prvs", "json_list"),
        pool_from="root_key_id", audit=_counts,
    ),
    Operation(
        "rewrap_data_keys", "rewrap_data_key for many encryptedKeys", requests.RewrapDataKeys,
        replies.WrappedDataKeysReply, "data_keys", None, pool_from="encrypted_keys", audit=_counts,
    ),
)  # fmt: skip

OPERATIONS: Mapping[str, Operation] = MappingProxyType({row.name: row for row in _ROWS})
# Every task name's operation, in the table's order.
OPS: tuple[str, ...] = tuple(OPERATIONS)
# The batch operations, and for each the single operations whose requests it carries.
BATCH_ITEMS: Mapping[str, tuple[Operation, ...]] = MappingProxyType(
    {
        batch: tuple(row for row in _ROWS if row.batch is not None and row.batch.op == batch)
        for batch in dict.fromkeys(row.batch.op for row in _ROWS if row.batch is not None)
    }
)
BATCH_OPS = frozenset(BATCH_ITEMS)
# The permissions a caller may be given (``kmsq caller add --allow``), and those that return plaintext.
# ``sign_hash``: signing a bare 32-byte hash with ``sign`` (ETH-like coins), which no rule can judge.
SIGN_HASH = "sign_hash"
ALLOWABLE_OPS: tuple[str, ...] = (*(row.permission for row in _ROWS if row.permission is not None), SIGN_HASH)
PLAINTEXT_OPS = frozenset(row.name for row in _ROWS if row.plaintext)


def item_operation(params: BaseModel | Mapping[str, Any]) -> Operation:
    """Returns the single operation each item of a batch request is (for ``generate_data_keys``: with or
    without plaintext, by its ``with_plaintext``). Raises KeyError for an operation that is not a batch."""
    values = params if isinstance(params, Mapping) else params.model_dump()
    candidates = BATCH_ITEMS[str(values["op"])]
    for row in candidates:
        assert row.batch is not None
        if all(values.get(name, _default(row.batch.op, name)) == value for name, value in row.batch.fixed.items()):
            return row
    raise KeyError(values["op"])


def _default(op: str, name: str) -> Any:
    info = OPERATIONS[op].request.model_fields.get(name)
    return None if info is None else info.default


def permission_of(params: BaseModel | Mapping[str, Any]) -> str | None:
    """Returns the permission a request needs (a batch: its items' operation's), or None when it needs none."""
    values = params if isinstance(params, Mapping) else {"op": getattr(params, "op")}  # noqa: B009
    row = OPERATIONS[str(values["op"])]
    if row.name in BATCH_OPS:
        return item_operation(params).permission
    return row.permission


def returns_plaintext(params: BaseModel | Mapping[str, Any]) -> bool:
    """True when a request returns plaintext to the caller (a batch: when its items' operation does)."""
    op = str(params["op"] if isinstance(params, Mapping) else getattr(params, "op"))  # noqa: B009
    row = item_operation(params) if op in BATCH_OPS else OPERATIONS[op]
    return row.plaintext


def batch_items(params: BaseModel) -> int | None:
    """The number of items of a batch request (None for a single one)."""
    op = str(getattr(params, "op"))  # noqa: B009
    if op not in BATCH_OPS:
        return None
    items_field = BATCH_ITEMS[op][0].batch.items  # type: ignore[union-attr]
    value = getattr(params, items_field)
    return value if isinstance(value, int) else len(value)


def item_sealed_field(op: str) -> str | None:
    """The field each item of a batch reply gets from the sealed ``items`` list (``plaintextKey``, ``prv``), or
    None when its items carry no secret."""
    if op not in BATCH_OPS:
        return None
    fields = [f for row in BATCH_ITEMS[op] for f in row.sealed_reply_fields]
    return fields[0] if fields else None


# The request parameters: one model per operation, told apart by ``op``. Built from the table, so that a new
# row is a new kind of request; type checkers see the common base.
if TYPE_CHECKING:
    Params = requests.RequestParams
else:
    Params = Annotated[Union[tuple(row.request for row in _ROWS)], Field(discriminator="op")]  # noqa: UP007
