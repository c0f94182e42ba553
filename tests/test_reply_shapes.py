"""What every operation's reply carries on the wire, and what its audit record names: the public result fields,
the sealed ones, the shape of a batch's items, and the record's action, outcome, root key and detail. Pinned
here so that a change in how operations are declared or dispatched cannot change what callers receive or what
auditors read."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from schemas.messages import Reply, ReplyEnvelope
from tasks.codec import KmsCodec
from tests.unit_fixtures import Unit, answer
from worker.pipeline import Delivery
from worker.storage.db import transaction
from worker.storage.models import AuditRecord

pytestmark = pytest.mark.unit
ETH_HASH = "0x" + "ab" * 32


def _shape(value: Any) -> Any:
    """A reply's ``result`` with every string replaced by its kind (the values change from run to run)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def _reply(codec: KmsCodec, delivery: Delivery) -> Reply:
    return codec.verify_envelope(ReplyEnvelope(**delivery.envelope))


def _last_audit(unit: Unit, request_id: str) -> tuple[str, str, bool, str]:
    with transaction(unit.service.sessions) as db:
        row = db.scalars(select(AuditRecord).where(AuditRecord.request_id == request_id)).one()
        return row.action, row.outcome, row.root_key_id is not None, row.detail


def _put_params(codec: KmsCodec, pub: str, request_id: uuid.UUID) -> dict[str, Any]:
    params, _ = codec.put_key_params(pub, "xprv-shape", "btc", "user", "independent", None, request_id)
    return params


def _run(unit: Unit, codec: KmsCodec, params: dict[str, Any], request_id: uuid.UUID | None = None) -> Delivery:
    request, args = codec.build_request(params, "alpha", request_id)
    return unit.handle_args(request, args)


def test_each_operation_replies_and_audits_as_before(unit: Unit, full: KmsCodec) -> None:
    key = answer(full, _run(unit, full, {"op": "generate_data_key"}))
    sjcl = '{"iv":"AAAA","v":1,"iter":1000,"ks":256,"ts":64,"mode":"ccm","cipher":"aes","salt":"AA","ct":"AA"}'
    put_id, puts_id = uuid.uuid4(), uuid.uuid4()
    puts, _ = full.put_keys_params(
        [{"pub": "xpub-shape-b", "prv": "xprv-b", "coin": "btc", "source": "user", "type": "independent"}],
        None,
        puts_id,
    )
    signing = answer(full, _run(unit, full, {"op": "generate_signing_key", "coin": "hteth", "source": "user",
                                             "type": "independent"}))  # fmt: skip
    cases: list[tuple[dict[str, Any], uuid.UUID | None, Any, list[str], tuple[str, str, bool, str]]] = [
        ({"op": "generate_data_key"}, None, {"encryptedKey": "str"}, ["plaintextKey"],
         ("generate_data_key", "ok", True, "")),
        ({"op": "generate_data_key_without_plaintext"}, None, {"encryptedKey": "str"}, [],
         ("generate_data_key_without_plaintext", "ok", True, "")),
        ({"op": "decrypt_data_key", "encrypted_key": key["encryptedKey"]}, None, {}, ["plaintextKey"],
         ("decrypt_data_key", "ok", True, "")),
        ({"op": "rewrap_data_key", "encrypted_key": key["encryptedKey"]}, None, {"encryptedKey": "str"}, [],
         ("rewrap_data_key", "ok", True, "from version 1")),
        (_put_params(full, "xpub-shape", put_id), put_id,
         {"coin": "str", "pub": "str", "source": "str", "type": "str"}, [], ("put_key", "ok", True, "")),
        ({"op": "get_key", "pub": "xpub-shape", "source": "user"}, None,
         {"coin": "str", "pub": "str", "source": "str", "type": "str"}, ["prv"], ("get_key", "ok", True, "")),
        ({"op": "generate_signing_key", "coin": "hteth", "source": "backup", "type": "independent"}, None,
         {"coin": "str", "pub": "str", "source": "str", "type": "str"}, [],
         ("generate_signing_key", "ok", True, "key xpub")),
        ({"op": "sign", "pub": signing["pub"], "source": "user", "payload": ETH_HASH, "algorithm": "ecdsa"}, None,
         {"signature": "str"}, [], ("sign", "ok", True, f"key {signing['pub'][:32]}, payload sha256 ")),
        ({"op": "generate_data_keys", "count": 2}, None, {"items": [{"encryptedKey": "str"}] * 2}, ["items"],
         ("generate_data_keys", "ok", True, "2 items, 0 errors")),
        ({"op": "generate_data_keys", "count": 1, "with_plaintext": False}, None,
         {"items": [{"encryptedKey": "str"}]}, [], ("generate_data_keys", "ok", True, "1 items, 0 errors")),
        ({"op": "decrypt_data_keys", "encrypted_keys": [key["encryptedKey"], "kmsq:v1:AAAA"]}, None,
         {"items": [{}, {"error": "str", "message": "str"}]}, ["items"],
         ("decrypt_data_keys", "ok", True, "2 items, 1 errors")),
        ({"op": "rewrap_data_keys", "encrypted_keys": ["kmsq:v1:AAAA", key["encryptedKey"]]}, None,
         {"items": [{"error": "str", "message": "str"}, {"encryptedKey": "str"}]}, [],
         ("rewrap_data_keys", "ok", True, "2 items, 1 errors")),
        (puts, puts_id, {"items": [{"coin": "str", "pub": "str", "source": "str", "type": "str"}]}, [],
         ("put_keys", "ok", True, "1 items, 0 errors")),
        ({"op": "get_keys", "keys": [{"pub": "xpub-shape-b", "source": "user"}, {"pub": "no", "source": "user"}]},
         None, {"items": [{"coin": "str", "pub": "str", "source": "str", "type": "str"},
                          {"error": "str", "message": "str"}]}, ["items"],
         ("get_keys", "ok", True, "2 items, 1 errors")),
        ({"op": "get_keys", "keys": [{"pub": "no", "source": "user"}]}, None,
         {"items": [{"error": "str", "message": "str"}]}, ["items"], ("get_keys", "ok", False, "1 items, 1 errors")),
    ]  # fmt: skip
    for params, request_id, result, sealed, audit in cases:
        delivery = _run(unit, full, params, request_id)
        reply = _reply(full, delivery)
        assert (reply.op, reply.status, delivery.code) == (params["op"], "ok", None), reply.error
        assert _shape(reply.result) == result, params["op"]
        assert sorted(reply.sealed) == sealed, params["op"]
        action, outcome, has_root, detail = _last_audit(unit, delivery.request_id)
        assert (action, outcome, has_root) == audit[:3], params["op"]
        assert detail.startswith(audit[3]) and (audit[3] or detail == ""), (params["op"], detail)
    # The replaced API's SJCL envelope that no registered name opens: refused, no root key of kmsq's named.
    refused = _run(unit, full, {"op": "decrypt_data_key", "encrypted_key": sjcl})
    assert _last_audit(unit, refused.request_id) == (
        "decrypt_data_key",
        "invalid",
        False,
        "ciphertext failed integrity check",
    )


def test_get_result_and_refusals_reply_and_audit_as_before(unit: Unit, full: KmsCodec) -> None:
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    unit.handle_args(request, args)
    delivery = _run(unit, full, {"op": "get_result", "request_id": str(request.request_id)})
    reply = _reply(full, delivery)
    assert _shape(reply.result) == {"reply": "str", "request_id": "str"} and reply.sealed == {}
    assert _last_audit(unit, delivery.request_id) == ("get_result", "ok", False, f"the result of {request.request_id}")
    missing = _run(unit, full, {"op": "get_result", "request_id": str(uuid.uuid4())})
    assert _last_audit(unit, missing.request_id) == ("get_result", "not_found", False, "no stored result for this "
                                                                                         "request_id")  # fmt: skip
    signing = answer(full, _run(unit, full, {"op": "generate_signing_key", "coin": "hteth", "source": "user",
                                             "type": "independent"}))  # fmt: skip
    refused = _run(unit, full, {"op": "sign", "pub": signing["pub"], "source": "user", "payload": "0x12",
                                "algorithm": "ecdsa"})  # fmt: skip
    action, outcome, has_root, detail = _last_audit(unit, refused.request_id)
    assert (action, outcome, has_root) == ("sign", "invalid", False)
    assert re.fullmatch(rf"key {re.escape(signing['pub'][:32])}, payload sha256 [0-9a-f]{{64}}: signablePayload must "
                        r"be 0x and a 32-byte hash \(64 hex digits\) for this coin", detail), detail  # fmt: skip
    conflict = _run(unit, full, {"op": "generate_signing_key", "coin": "btc", "source": "user", "type": "tss"})
    assert _last_audit(unit, conflict.request_id) == (
        "generate_signing_key", "invalid", False,
        "kmsq generates independent (multisig) keys only; type must be 'independent'")  # fmt: skip
    forbidden_caller = unit.register("nodecrypt", ("generate_data_key",))
    denied = _run(unit, forbidden_caller, {"op": "decrypt_data_keys", "encrypted_keys": ["kmsq:v1:AAAA"]})
    assert _last_audit(unit, denied.request_id) == (
        "decrypt_data_keys",
        "forbidden",
        False,
        "operation decrypt_data_key is not allowed for this caller",
    )
