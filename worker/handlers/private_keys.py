"""The private-key family: store private keys (their ``prv`` sealed to the pool's transport key) and read them
back (sealed to the caller), one or many."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel

from schemas.operations import Family
from schemas.replies import ItemError, PrivateKeyReply, PrivateKeysReply, StoredKeyReply, StoredKeysReply
from schemas.requests import GetKey, GetKeys, PutKey, PutKeys
from worker import batch, service
from worker.errors import InvalidRequest, ServiceError
from worker.handlers.registry import OpCall, Outcome, handles, item_error

FAMILY: Family = "private_keys"


def _public(key: service.StoredPrivateKey | service.PrivateKeyRecord) -> StoredKeyReply:
    return StoredKeyReply(pub=key.pub, coin=key.coin, source=key.source, type=key.type)


def _private(key: service.PrivateKeyRecord) -> PrivateKeyReply:
    return PrivateKeyReply(pub=key.pub, coin=key.coin, source=key.source, type=key.type, prv=key.prv)


@handles(FAMILY, "put_key")
def put_key(call: OpCall, params: PutKey) -> Outcome:
    """Stores one private key, sealed inside the HSM under a fresh data key bound to its row."""
    assert call.sealed_input is not None  # put_key's prv is its sealed input (schemas.operations)
    try:
        prv = call.sealed_input.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("prv must be UTF-8 text") from None
    stored = service.store_private_key(
        call.hsm, call.db, pub=params.pub, prv=prv, coin=params.coin, source=params.source, type=params.type,
        root_key_id=params.root_key_id, pool=call.pool, keys=call.keys,
    )  # fmt: skip
    return Outcome(_public(stored), stored.root_key_id, stored.root_key_version)


@handles(FAMILY, "put_keys")
def put_keys(call: OpCall, params: PutKeys) -> Outcome:
    """Stores each private key, or answers its error (``invalid``, ``conflict``), with one bulk insert."""
    entries = [
        batch.PrivateKeyItem(pub=i.pub, coin=i.coin, source=i.source, type=i.type, prv=prv)
        for i, prv in zip(params.items, _private_keys_of(call, params), strict=True)
    ]
    stored = batch.store_private_keys(call.hsm, call.db, entries, params.root_key_id, call.pool, call.keys)
    items: list[StoredKeyReply | ItemError] = [
        item_error(o) if isinstance(o, ServiceError) else _public(o) for o in stored
    ]
    return _batch_outcome(StoredKeysReply(items=items), stored)


def _private_keys_of(call: OpCall, params: PutKeys) -> list[str]:
    """The opened ``prvs``: a JSON list of strings, one per item. Raises InvalidRequest for anything else."""
    assert call.sealed_input is not None
    try:
        prvs = json.loads(call.sealed_input)
    except (ValueError, RecursionError):  # RecursionError: a 10,000-level nesting
        raise InvalidRequest("prvs must be a sealed JSON list of strings") from None
    if not isinstance(prvs, list) or len(prvs) != len(params.items) or not all(isinstance(p, str) for p in prvs):
        raise InvalidRequest("prvs must be a sealed JSON list of strings, one per item")
    return prvs


@handles(FAMILY, "get_key")
def get_key(call: OpCall, params: GetKey) -> Outcome:
    """One stored private key, opened in the HSM (never one generated inside kmsq: ``not_exportable``)."""
    record = service.get_private_key(call.hsm, call.db, params.pub, params.source, call.keys)
    return Outcome(_private(record), record.root_key_id, record.root_key_version)


@handles(FAMILY, "get_keys")
def get_keys(call: OpCall, params: GetKeys) -> Outcome:
    """Each stored private key or its error (``not_found``...)."""
    records = batch.get_private_keys(call.hsm, call.db, [(k.pub, k.source) for k in params.keys], call.keys)
    items: list[PrivateKeyReply | ItemError] = [
        item_error(r) if isinstance(r, ServiceError) else _private(r) for r in records
    ]
    return _batch_outcome(PrivateKeysReply(items=items), records)


def _batch_outcome(
    reply: BaseModel, outcomes: Sequence[service.StoredPrivateKey | service.PrivateKeyRecord | ServiceError]
) -> Outcome:
    """A batch's outcome; its audit record names the root key version of the first item that did not fail."""
    first = next((o for o in outcomes if not isinstance(o, ServiceError)), None)
    if first is None:
        return Outcome(reply)
    return Outcome(reply, first.root_key_id, first.root_key_version)
