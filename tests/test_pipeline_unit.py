"""Every check of docs/PROTOCOL.md ("The worker's checks, in order") in process, in milliseconds: the real
pipeline (``worker.pipeline.handle``), the real service, callers, policy and storage code, on SQLite and
the in-memory KeyStore of ``tests/fake_hsm.py``. The same checks run against SoftHSM2, Redis, Postgres and
real workers in the queue tests; these are the fast loop (``pytest -m unit``)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from schemas.envelope import EncryptedDataKey
from schemas.messages import ReplyEnvelope
from schemas.wire import b64u, canonical_json, request_signing_input, sign
from tasks.codec import KmsCodec
from tasks.identity import CallerIdentity
from tests.unit_fixtures import Unit, answer, refusal
from worker import callers
from worker.errors import HsmUnavailable
from worker.pipeline import Delivery, Inbound, handle
from worker.storage.db import transaction
from worker.storage.models import AuditRecord, Caller, PrivateKey, RequestRecord

pytestmark = pytest.mark.unit


# -- checks 1-10: rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["a", "b", "c"], ["a", "b", "c", 4], [1, 2, 3, 4], "abcd"])
def test_1_malformed_arguments_get_no_reply(unit: Unit, full: KmsCodec, args: Any) -> None:
    request, _ = full.build_request({"op": "generate_data_key"}, "alpha")
    delivery = unit.handle_args(request, args)
    assert (delivery.queue, delivery.code) == (None, "invalid")
    assert unit.rejection(str(request.request_id)).reason == "malformed task arguments"


def test_2_and_3_an_oversized_or_malformed_body_gets_no_reply(unit: Unit, full: KmsCodec) -> None:
    for body, reason in (("A" * 12_000_000, "oversized body"), ("not base64!", "body is not base64url")):
        request, args = full.build_request({"op": "generate_data_key"}, "alpha")
        delivery = unit.handle_args(request, [args[0], args[1], body, args[3]])
        assert (delivery.queue, delivery.code) == (None, "invalid")
        assert unit.rejection(str(request.request_id)).reason == reason


def test_4_to_6_what_anyone_could_have_made_gets_no_reply(unit: Unit, full: KmsCodec) -> None:
    stranger = KmsCodec(CallerIdentity.generate("stranger"), unit.fleet)
    impostor = KmsCodec(CallerIdentity.generate("full"), unit.fleet)  # the name, not the key
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    forged = [*args[:3], ("B" if args[3][0] == "A" else "A") + args[3][1:]]
    cases = [
        (stranger, None, ("?", "unknown caller")),
        (impostor, None, ("full", "unknown signing key")),
        (full, forged, ("full", "bad signature")),
    ]
    for codec, raw, (caller, reason) in cases:
        request, args = codec.build_request({"op": "generate_data_key"}, "alpha")
        delivery = unit.handle_args(request, raw or args, message_id=str(request.request_id))
        assert (delivery.queue, delivery.code) == (None, "unauthenticated")
        row = unit.rejection(str(request.request_id))
        assert (row.caller, row.reason) == (caller, reason)
    assert unit.count(RequestRecord) == 0  # counted, not stored, and audited only as counts:
    with unit.service.sessions() as db:
        outcomes = set(db.scalars(select(AuditRecord.outcome).where(~AuditRecord.actor.startswith("operator:"))))
    assert outcomes == {"rejected:unauthenticated"}


def test_6a_a_disabled_caller_is_told_on_its_own_queue(unit: Unit, full: KmsCodec) -> None:
    with transaction(unit.service.sessions) as db:
        callers.set_caller_state(unit.service.hsm, db, "full", "disabled")
    delivery = unit.deliver(full, {"op": "generate_data_key"})
    assert delivery.queue == full.reply_queue
    assert refusal(full, delivery) == ("unauthenticated", "request could not be authenticated")


def test_7_a_signed_body_that_does_not_parse(unit: Unit, full: KmsCodec) -> None:
    for body, queue in ((b'{"reply_queue": "' + full.reply_queue.encode() + b'", "v": 1}', full.reply_queue),
                        (b"{not json", None)):  # fmt: skip
        args = [full.identity.caller, full.identity.key_id, b64u(body),
                sign(full.identity.signing, request_signing_input("kmsq.generate_data_key", body))]  # fmt: skip
        rid = str(uuid.uuid4())
        delivery = handle(unit.ctx, Inbound("kmsq.generate_data_key", full.reply_queue, rid, args))
        assert (delivery.queue, delivery.code) == (queue, "invalid")
        if queue:
            assert refusal(full, delivery)[1].startswith("malformed request: ")


@pytest.mark.parametrize("header", ["task", "reply_to", "message_id"])
def test_8_headers_that_disagree_with_the_signed_body(unit: Unit, full: KmsCodec, header: str) -> None:
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    other = {"task": "kmsq.get_key", "reply_to": full.reply_queue + "x", "message_id": str(uuid.uuid4())}[header]
    delivery = unit.handle_args(request, args, **{header: other})
    assert delivery.queue is None
    assert delivery.code == "unauthenticated"


def test_9_and_10_wrong_pool_and_foreign_reply_key(unit: Unit, full: KmsCodec) -> None:
    assert refusal(full, unit.deliver(full, {"op": "generate_data_key"}, pool="beta")) == (
        "invalid", "request for pool beta reached pool alpha")  # fmt: skip
    other = CallerIdentity.generate("full")
    request, _ = full.build_request({"op": "generate_data_key"}, "alpha")
    body = request.model_dump(mode="json") | {"reply_key": other.reply_public}
    raw = canonical_json(body)
    args = [full.identity.caller, full.identity.key_id, b64u(raw),
            sign(full.identity.signing, request_signing_input("kmsq.generate_data_key", raw))]  # fmt: skip
    delivery = unit.handle_args(request, args)
    assert refusal(full, delivery)[0] == "forbidden"


# -- checks 11-14: authenticated refusals, stored ---------------------------------------------------------


def test_11_a_redelivery_gets_the_stored_reply_and_a_reused_id_is_replayed(unit: Unit, full: KmsCodec) -> None:
    request_id = uuid.uuid4()
    request, args = full.build_request({"op": "put_key", **_put(full, "xpub-11", request_id=request_id)}, "alpha",
                                       request_id)  # fmt: skip
    first, second = unit.handle_args(request, args), unit.handle_args(request, args)
    assert first.envelope == second.envelope and answer(full, first)["pub"] == "xpub-11"
    assert unit.count(PrivateKey) == 1 and unit.count(RequestRecord) == 1
    with unit.service.sessions() as db:
        audited = db.scalars(select(AuditRecord.outcome).where(AuditRecord.request_id == str(request_id))).all()
    assert audited == ["ok"]  # the redelivery is not a second attempt
    other, other_args = full.build_request({"op": "generate_data_key"}, "alpha", request.request_id)
    assert refusal(full, unit.handle_args(other, other_args, task="kmsq.generate_data_key")) == (
        "replayed", "request_id already used for a different request")  # fmt: skip


def _put(codec: KmsCodec, pub: str, *, request_id: uuid.UUID) -> dict[str, Any]:
    """The ``put_key`` parameters of a ``prv`` sealed for ``request_id`` (``op`` left out)."""
    params, _ = codec.put_key_params(pub, "xprv-unit", "btc", "user", "tss", None, request_id)
    return {k: v for k, v in params.items() if k != "op"}


def _deliver_put(unit: Unit, codec: KmsCodec, pub: str) -> Delivery:
    request_id = uuid.uuid4()
    request, args = codec.build_request({"op": "put_key", **_put(codec, pub, request_id=request_id)}, "alpha",
                                        request_id)  # fmt: skip
    return unit.handle_args(request, args)


def test_12_and_13_lifetime_and_freshness(unit: Unit, full: KmsCodec) -> None:
    long_lived = KmsCodec(full.identity, unit.fleet, ttl_seconds=3601)
    assert refusal(long_lived, unit.deliver(long_lived, {"op": "generate_data_key"}))[0] == "invalid"
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    unit.clock[0] += timedelta(minutes=20)  # past expires_at (10 min) and the skew (5 min)
    assert refusal(full, unit.handle_args(request, args)) == ("expired", "request expired or not yet valid")
    assert unit.count(RequestRecord) == 2  # both stored: a redelivery gets the same answer


def test_13_a_late_redelivery_of_an_answered_request_gets_its_answer(unit: Unit, full: KmsCodec) -> None:
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    first = unit.handle_args(request, args)
    unit.clock[0] += timedelta(hours=2)
    assert unit.handle_args(request, args).envelope == first.envelope


def test_14_operations_and_plaintext_are_permissions(unit: Unit) -> None:
    limited = unit.register("limited", ("generate_data_key_without_plaintext",), plaintext=False)
    assert "encryptedKey" in answer(limited, unit.deliver(limited, {"op": "generate_data_key_without_plaintext"}))
    assert refusal(limited, unit.deliver(limited, {"op": "generate_data_key"}))[0] == "forbidden"
    assert refusal(limited, unit.deliver(limited, {"op": "get_key", "pub": "x", "source": "user"}))[0] == "forbidden"


# -- check 15: the operations ------------------------------------------------------------------------------


@pytest.mark.parametrize("root", ["aes", "rsa"])
def test_15_data_keys_round_trip(unit: Unit, full: KmsCodec, root: str) -> None:
    key = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": unit.roots[root]}))
    again = answer(full, unit.deliver(full, {"op": "decrypt_data_key", "encrypted_key": key["encryptedKey"]}))
    assert again == {"plaintextKey": key["plaintextKey"]} and len(key["plaintextKey"]) == 44
    tampered = key["encryptedKey"][:-2] + ("A" if key["encryptedKey"][-2] != "A" else "B") + key["encryptedKey"][-1]
    assert refusal(full, unit.deliver(full, {"op": "decrypt_data_key", "encrypted_key": tampered})) == (
        "invalid", "ciphertext failed integrity check")  # fmt: skip


def test_15_private_keys_conflict_and_not_found(unit: Unit, full: KmsCodec) -> None:
    assert answer(full, _deliver_put(unit, full, "xpub-15"))["pub"] == "xpub-15"
    assert refusal(full, _deliver_put(unit, full, "xpub-15"))[0] == "conflict"
    got = answer(full, unit.deliver(full, {"op": "get_key", "pub": "xpub-15", "source": "user"}))
    assert (got["prv"], got["coin"], got["type"]) == ("xprv-unit", "btc", "tss")
    assert refusal(full, unit.deliver(full, {"op": "get_key", "pub": "absent", "source": "user"}))[0] == "not_found"


def test_15_a_sealed_prv_for_another_request_does_not_open(unit: Unit, full: KmsCodec) -> None:
    params = {"op": "put_key", **_put(full, "xpub-moved", request_id=uuid.uuid4())}  # sealed for another id
    assert refusal(full, unit.deliver(full, params)) == (
        "invalid", "prv is not sealed to this pool's transport key for this request")  # fmt: skip
    assert unit.count(PrivateKey) == 0


def test_15_root_keys_of_other_pools_and_not_allowed(unit: Unit, full: KmsCodec) -> None:
    beta = unit.roots["beta"]
    assert refusal(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": beta})) == (
        "invalid", f"root key {beta} is in pool beta, not alpha")  # fmt: skip
    aes_only = unit.register("aesonly", roots=[unit.roots["aes"]])
    assert refusal(aes_only, unit.deliver(aes_only, {"op": "generate_data_key", "root_key_id": unit.roots["rsa"]}))[
        0] == "forbidden"  # fmt: skip


def test_15_batches_answer_per_item(unit: Unit, full: KmsCodec) -> None:
    keys = answer(full, unit.deliver(full, {"op": "generate_data_keys", "count": 3}))["items"]
    encrypted = [keys[0]["encryptedKey"], "kmsq:v1:AAAA"]
    decrypted = answer(full, unit.deliver(full, {"op": "decrypt_data_keys", "encrypted_keys": encrypted}))
    assert decrypted["items"][0] == {"plaintextKey": keys[0]["plaintextKey"]}
    assert decrypted["items"][1]["error"] == "invalid"


def test_15_rewrap_needs_its_own_permission_and_never_carries_plaintext(unit: Unit, full: KmsCodec) -> None:
    """rewrap_data_key(s): under the current version after a rotation, opened to the same key; a caller with
    decrypt only may not; one with rewrap only (and no plaintext permission) may, and its replies seal
    nothing."""
    key = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": unit.roots["aes"]}))
    unit.service.rotate_root_key(unit.roots["aes"])
    decrypt_only = unit.register("decryptonly", ("decrypt_data_key",))
    rewrap = {"op": "rewrap_data_key", "encrypted_key": key["encryptedKey"]}
    assert refusal(decrypt_only, unit.deliver(decrypt_only, rewrap))[0] == "forbidden"
    rewrapper = unit.register("rewrapper", ("rewrap_data_key",), plaintext=False)
    delivery = unit.deliver(rewrapper, rewrap)
    assert rewrapper.verify_envelope(ReplyEnvelope(**delivery.envelope)).sealed == {}
    new = answer(rewrapper, delivery)["encryptedKey"]
    assert new != key["encryptedKey"] and EncryptedDataKey.from_text(new).root_key_version == 2
    again = answer(full, unit.deliver(full, {"op": "decrypt_data_key", "encrypted_key": new}))
    assert again == {"plaintextKey": key["plaintextKey"]}
    assert answer(rewrapper, unit.deliver(rewrapper, {"op": "rewrap_data_key", "encrypted_key": new})) == {
        "encryptedKey": new}  # current already: the same string  # fmt: skip
    batch = {"op": "rewrap_data_keys", "encrypted_keys": [key["encryptedKey"], "kmsq:v1:AAAA", new]}
    items = answer(rewrapper, unit.deliver(rewrapper, batch))["items"]
    assert EncryptedDataKey.from_text(items[0]["encryptedKey"]).root_key_version == 2
    assert items[1] == {"error": "invalid", "message": "ciphertext failed integrity check"}
    assert items[2] == {"encryptedKey": new}
    rsa_only = unit.register("rsaonly", ("rewrap_data_key",), roots=[unit.roots["rsa"]], plaintext=False)
    assert refusal(rsa_only, unit.deliver(rsa_only, rewrap))[0] == "forbidden"  # not its root key


def test_get_result_returns_the_stored_reply(unit: Unit, full: KmsCodec) -> None:
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    key = answer(full, unit.handle_args(request, args))
    assert answer(full, unit.deliver(full, {"op": "get_result", "request_id": str(request.request_id)})) == key
    assert refusal(full, unit.deliver(full, {"op": "get_result", "request_id": str(uuid.uuid4())}))[0] == "not_found"


# -- retries, policy ---------------------------------------------------------------------------------------


def test_an_hsm_outage_is_retried_then_answered_unavailable(unit: Unit, full: KmsCodec) -> None:
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    unit.service.hsm.down = True  # type: ignore[attr-defined]
    with pytest.raises(HsmUnavailable):
        unit.handle_args(request, args)
    assert refusal(full, unit.handle_args(request, args, final=True))[0] == "unavailable"
    assert unit.count(RequestRecord) == 0  # not stored: a later delivery runs it
    unit.service.hsm.down = False  # type: ignore[attr-defined]
    assert "plaintextKey" in answer(full, unit.handle_args(request, args))


def test_a_caller_row_changed_in_the_database_is_refused(unit: Unit, full: KmsCodec) -> None:
    with transaction(unit.service.sessions) as db:
        db.execute(update(Caller).where(Caller.name == "full").values(plaintext=False))
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    delivery = unit.handle_args(request, args)
    assert (delivery.queue, delivery.code) == (None, "unauthenticated")
    assert unit.rejection(str(request.request_id)).reason == "caller failed its policy check"
