"""The signing family: keys generated and kept inside kmsq, and their signatures (see :mod:`worker.signing`).
The audit record names the key and the payload's SHA-256, never the payload (``schemas.operations``)."""

from __future__ import annotations

from schemas.operations import Family
from schemas.replies import SignatureReply, StoredKeyReply
from schemas.requests import GenerateSigningKey, Sign
from worker import service
from worker.errors import InvalidRequest
from worker.handlers.registry import OpCall, Outcome, handles, refuse_if_recorded

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
        in_hsm=params.in_hsm, pool=call.pool, keys=call.keys,
    )  # fmt: skip
    reply = StoredKeyReply(pub=made.pub, coin=made.coin, source=made.source, type=made.type)
    return Outcome(reply, made.root_key_id, made.root_key_version)


@handles(FAMILY, "sign")
def sign(call: OpCall, params: Sign) -> Outcome:
    """The payload signed by the generated key (pub, source)."""
    signed = service.sign_payload(
        call.hsm, call.db, pub=params.pub, source=params.source, payload=params.payload, algorithm=params.algorithm,
        keys=call.keys,
    )  # fmt: skip
    return Outcome(SignatureReply(signature=signed.signature), signed.root_key_id, signed.root_key_version)
