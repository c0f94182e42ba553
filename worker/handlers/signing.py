"""The signing family: keys generated and kept inside kmsq, and their signatures (see :mod:`worker.signing`).
The audit record names the key and the payload's SHA-256, never the payload (``schemas.operations``)."""

from __future__ import annotations

from schemas.operations import SIGN_HASH, Family
from schemas.replies import ItemError, SignatureReply, SignaturesReply, SignedOperationReply, StoredKeyReply
from schemas.requests import GenerateSigningKey, Sign, SignMany, SignOperation
from worker import batch, eth_operation, service, signing
from worker.errors import InvalidRequest, ServiceError
from worker.handlers.registry import OpCall, Outcome, handles, item_error, refuse_if_recorded

FAMILY: Family = "signing"


@handles(FAMILY, "generate_signing_key")
def generate_signing_key(call: OpCall, params: GenerateSigningKey) -> Outcome:
    """A BIP32 root from the HSM's random generator (or, ``in_hsm``, a secp256k1 key in the token), stored never
    exportable; the reply's ``pub`` is its xpub. A redelivered ``in_hsm`` request finds its record before the token
    is touched (a rollback does not remove a token key; one that rolls back anyway is destroyed by the service)."""
    if params.in_hsm:
        if call.keys.gate is not None:  # KMSQ_MIN_TOKENS > 1: a token key would be on one token until replicated
            raise InvalidRequest(
                "in_hsm keys cannot be made while KMSQ_MIN_TOKENS asks for more than one token: a "
                "new token key is on one token until it is replicated; make it without in_hsm"
            )
        refuse_if_recorded(call)
    made = service.generate_signing_key(
        call.hsm, call.db, coin=params.coin, source=params.source, type=params.type, root_key_id=params.root_key_id,
        in_hsm=params.in_hsm, pool=call.pool, keys=call.keys, owner=call.request.caller,
    )  # fmt: skip
    reply = StoredKeyReply(pub=made.pub, coin=made.coin, source=made.source, type=made.type)
    return Outcome(reply, made.root_key_id, made.root_key_version)


@handles(FAMILY, "sign")
def sign(call: OpCall, params: Sign) -> Outcome:
    """The payload signed by the generated key (pub, source); a bare hash only for a caller with sign_hash."""
    signed = service.sign_payload(
        call.hsm, call.db, pub=params.pub, source=params.source, payload=params.payload, algorithm=params.algorithm,
        caller=call.request.caller, keys=call.keys, hash_allowed=_hash_allowed(call),
    )  # fmt: skip
    return Outcome(SignatureReply(signature=signed.signature), signed.root_key_id, signed.root_key_version)


@handles(FAMILY, "sign_many")
def sign_many(call: OpCall, params: SignMany) -> Outcome:
    """Each payload's signature or its error, judged one after another."""
    items = [batch.SignItem(pub=i.pub, source=i.source, payload=i.payload, algorithm=i.algorithm) for i in params.items]
    signed = batch.sign_payloads(call.hsm, call.db, items, caller=call.request.caller,
                                 hash_allowed=_hash_allowed(call), keys=call.keys)  # fmt: skip
    replies: list[SignatureReply | ItemError] = [
        item_error(s) if isinstance(s, ServiceError) else SignatureReply(signature=s.signature) for s in signed
    ]
    first = next((s for s in signed if not isinstance(s, ServiceError)), None)
    refused = tuple(
        ("sign", s.code, f"item {i}: key {item.pub[:32]}, payload sha256 {signing.payload_digest(item.payload)}: "
                         f"{s.message}"[:255])
        for i, (item, s) in enumerate(zip(items, signed, strict=True)) if isinstance(s, ServiceError)
    )  # fmt: skip
    reply = SignaturesReply(items=replies)
    if first is None:
        return Outcome(reply, item_audits=refused)
    return Outcome(reply, first.root_key_id, first.root_key_version, item_audits=refused)


def _hash_allowed(call: OpCall) -> bool:
    return SIGN_HASH in call.permissions


@handles(FAMILY, "sign_operation")
def sign_operation(call: OpCall, params: SignOperation) -> Outcome:
    """The operation hash of a wallet's sendMultiSig, computed here, and its signature by the generated key."""
    operation = eth_operation.Operation(
        to=params.to, value=int(params.value), data=bytes.fromhex(params.data[2:]), expire_time=params.expire_time,
        sequence_id=params.sequence_id,
    )  # fmt: skip
    digest, signed = service.sign_operation(
        call.hsm, call.db, pub=params.pub, source=params.source, operation=operation, caller=call.request.caller,
        keys=call.keys,
    )  # fmt: skip
    reply = SignedOperationReply(operation_hash=digest, signature=signed.signature)
    return Outcome(reply, signed.root_key_id, signed.root_key_version)
