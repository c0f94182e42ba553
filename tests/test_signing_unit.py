"""Keys generated inside kmsq (``generate_signing_key``) and ETH signatures (``sign``) in the unit tier: the
signature verifies with eth-keys (an implementation kmsq did not write) against the address of the xpub's own
key, the key is never exported (and a row flipped to exportable does not open), refusals are clear and change
nothing, and neither the xprv nor the seed is anywhere in the database, in any encoding."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import pytest
from embit import bip32
from eth_keys.datatypes import PublicKey, Signature
from sqlalchemy import func, select, update

from tasks.codec import KmsCodec, KmsError
from tests.test_no_plaintext_at_rest import dump_database, encodings
from tests.unit_fixtures import Unit, answer, refusal
from worker.storage.db import transaction
from worker.storage.models import AuditRecord, PrivateKey

SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def _generate(unit: Unit, codec: KmsCodec, coin: str = "hteth", source: str = "user") -> dict[str, Any]:
    return answer(codec, unit.deliver(codec, {"op": "generate_signing_key", "coin": coin, "source": source,
                                              "type": "independent"}))  # fmt: skip


def _sign(unit: Unit, codec: KmsCodec, pub: str, payload: str, **extra: Any) -> Any:
    params = {"op": "sign", "pub": pub, "source": "user", "payload": payload, "algorithm": "ecdsa", **extra}
    return unit.deliver(codec, params)


def _put(unit: Unit, codec: KmsCodec, pub: str, prv: str) -> Any:
    request_id = uuid.uuid4()
    params, _ = codec.put_key_params(pub, prv, "hteth", "user", "independent", None, request_id)
    request, args = codec.build_request(params, "alpha", request_id)
    return unit.handle_args(request, args)


def _eth_address_of_xpub(xpub: str) -> str:
    """The address of the xpub's own key (no derivation), computed with eth-keys."""
    compressed = bip32.HDKey.from_string(xpub).key.sec()
    return str(PublicKey.from_compressed_bytes(compressed).to_checksum_address())


def test_a_generated_key_signs_eth_hashes_that_recover_to_its_address(unit: Unit, full: KmsCodec) -> None:
    key = _generate(unit, full)
    assert key["pub"].startswith("xpub") and key["coin"] == "hteth" and key["type"] == "independent"
    address = _eth_address_of_xpub(key["pub"])
    for _ in range(8):  # both recovery ids turn up
        digest = secrets.token_bytes(32)
        signature = answer(full, _sign(unit, full, key["pub"], "0x" + digest.hex()))["signature"]
        assert signature.startswith("0x") and len(signature) == 2 + 130
        raw = bytes.fromhex(signature[2:])
        r, s, v = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
        assert v in (27, 28) and 0 < s <= SECP256K1_HALF_N  # low s, as Ethereum requires
        recovered = Signature(vrs=(v - 27, r, s)).recover_public_key_from_msg_hash(digest)
        assert recovered.to_checksum_address() == address


def test_a_generated_key_is_never_exported_nor_overwritten(unit: Unit, full: KmsCodec) -> None:
    key = _generate(unit, full)
    code, message = refusal(full, unit.deliver(full, {"op": "get_key", "pub": key["pub"], "source": "user"}))
    assert (code, message) == ("not_exportable", "this key was generated inside kmsq and cannot be exported")
    batch = answer(full, unit.deliver(full, {"op": "get_keys", "keys": [{"pub": key["pub"], "source": "user"}]}))
    assert batch["items"][0]["error"] == "not_exportable"
    assert refusal(full, _put(unit, full, key["pub"], "xprv-other"))[0] == "conflict"


def test_a_row_flipped_to_exportable_does_not_open(unit: Unit, full: KmsCodec) -> None:
    key = _generate(unit, full)
    with transaction(unit.service.sessions) as db:
        db.execute(update(PrivateKey).where(PrivateKey.pub == key["pub"]).values(exportable=True))
    refused = refusal(full, unit.deliver(full, {"op": "get_key", "pub": key["pub"], "source": "user"}))
    assert refused == ("invalid", "ciphertext failed integrity check")  # nothing of the key comes back


@pytest.mark.parametrize(
    ("payload", "extra", "message"),
    [
        ("0x" + "ab" * 31, {}, "signablePayload must be 0x and a 32-byte hash (64 hex digits) for this coin"),
        ("ab" * 32, {}, "signablePayload must be 0x and a 32-byte hash (64 hex digits) for this coin"),
        ("0x" + "ab" * 32, {"algorithm": "eddsa"}, "algorithm must be ecdsa for this coin"),
    ],
)
def test_a_payload_the_coin_cannot_sign_is_refused(
    unit: Unit, full: KmsCodec, payload: str, extra: dict[str, str], message: str
) -> None:
    key = _generate(unit, full)
    assert refusal(full, _sign(unit, full, key["pub"], payload, **extra)) == ("invalid", message)


def test_malformed_and_unknown_requests_are_refused(unit: Unit, full: KmsCodec) -> None:
    assert refusal(full, _sign(unit, full, "xpub-unknown", "0x" + "00" * 32)) == (
        "not_found", "no private key for this pub and source")  # fmt: skip
    with pytest.raises(KmsError, match="signablePayload must be hex"):  # refused before it is sent
        _sign(unit, full, "xpub-unknown", "0xzz")
    stored = "xpub-stored-" + secrets.token_hex(4)
    answer(full, _put(unit, full, stored, "xprv-stored"))
    assert refusal(full, _sign(unit, full, stored, "0x" + "00" * 32)) == (
        "invalid", "only a key generated by kmsq (generate_signing_key) signs")  # fmt: skip
    tss = {"op": "generate_signing_key", "coin": "hteth", "source": "user", "type": "tss"}
    assert refusal(full, unit.deliver(full, tss))[0] == "invalid"
    sol = {"op": "generate_signing_key", "coin": "sol", "source": "user", "type": "independent"}
    assert refusal(full, unit.deliver(full, sol)) == ("invalid", "kmsq does not generate signing keys for coin 'sol'")
    utxo = _generate(unit, full, coin="tbtc")
    code, message = refusal(full, _sign(unit, full, utxo["pub"], "70736274ff0100"))
    assert code == "invalid" and "PSBT" in message
    with unit.service.sessions() as db:
        assert db.scalar(select(func.count()).select_from(PrivateKey)) == 2  # the stored one and tbtc's


def test_signing_needs_its_own_permission(unit: Unit, full: KmsCodec) -> None:
    key = _generate(unit, full)
    limited = unit.register("no-sign", ("generate_signing_key", "get_key"))
    assert refusal(limited, _sign(unit, limited, key["pub"], "0x" + "00" * 32))[0] == "forbidden"
    assert _generate(unit, limited)["pub"].startswith("xpub")


def test_the_audit_names_the_payload_digest_never_the_payload(unit: Unit, full: KmsCodec) -> None:
    key = _generate(unit, full)
    payload = "0x" + secrets.token_hex(32)
    answer(full, _sign(unit, full, key["pub"], payload))
    refusal(full, _sign(unit, full, key["pub"], "0x" + secrets.token_hex(31)))
    import hashlib

    with unit.service.sessions() as db:
        signs = list(db.scalars(select(AuditRecord).where(AuditRecord.action == "sign").order_by(AuditRecord.seq)))
    assert [r.outcome for r in signs] == ["ok", "invalid"]
    assert hashlib.sha256(payload.encode()).hexdigest() in signs[0].detail
    assert "payload sha256" in signs[1].detail
    assert all(payload[2:] not in r.detail and key["pub"][:32] in r.detail for r in signs)


def test_neither_the_xprv_nor_the_seed_is_in_the_database(unit: Unit, full: KmsCodec) -> None:
    seed = bytearray(secrets.token_bytes(64))
    known = bytes(seed)
    unit.service.hsm.random = lambda count: bytearray(known[:count])  # type: ignore[method-assign]
    key = _generate(unit, full)
    root = bip32.HDKey.from_seed(known)
    assert key["pub"] == root.to_public().to_string()
    answer(full, _sign(unit, full, key["pub"], "0x" + "11" * 32))
    dump = dump_database(unit.service)
    assert key["pub"].encode() in dump  # the dump is real
    for secret in (root.to_string().encode(), known, root.key.secret):
        for form in encodings(secret):
            assert form not in dump, "a generated key's secret is in the database"
