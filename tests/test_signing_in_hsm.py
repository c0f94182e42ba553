"""``generate_signing_key`` with ``in_hsm`` on the test run's SoftHSM2 token: SoftHSM2 2.6 makes secp256k1 key
pairs (CKM_EC_KEY_PAIR_GEN) and signs with CKM_ECDSA, so an ETH-like key can live in the token, non-extractable
and sensitive. The token's s is high about half the time; kmsq makes it low and finds v by recovery. Signatures
are checked with eth-keys (an implementation kmsq did not write) against the address of the xpub kmsq answers."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from embit import bip32
from eth_keys.datatypes import PublicKey, Signature
from sqlalchemy import select

from tasks.codec import KmsCodec
from tests.test_no_plaintext_at_rest import dump_database
from tests.unit_fixtures import Unit, UnitTemplate, answer, refusal, units
from worker.hsm import Hsm
from worker.storage.db import transaction
from worker.storage.models import PrivateKey

SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


@pytest.fixture
def token_unit(tmp_path: Path, hsm: Hsm, unit_template: UnitTemplate) -> Iterator[Unit]:
    yield from units(tmp_path, hsm, unit_template.schema)


def _generate(unit: Unit, codec: KmsCodec, coin: str = "hteth", **extra: Any) -> Any:
    params = {"op": "generate_signing_key", "coin": coin, "source": "user", "type": "independent", "in_hsm": True}
    return unit.deliver(codec, {**params, **extra})


def _sign(unit: Unit, codec: KmsCodec, pub: str, payload: str) -> Any:
    return unit.deliver(codec, {"op": "sign", "pub": pub, "source": "user", "payload": payload, "algorithm": "ecdsa"})


def test_a_token_key_signs_eth_hashes_that_recover_to_its_xpubs_address(token_unit: Unit) -> None:
    codec = token_unit.register("full")
    key = answer(codec, _generate(token_unit, codec))
    assert key["pub"].startswith("xpub") and key["coin"] == "hteth"
    address = PublicKey.from_compressed_bytes(bip32.HDKey.from_string(key["pub"]).key.sec()).to_checksum_address()
    recovery_ids = set()
    for _ in range(12):  # the token's s is high about half the time; both recovery ids turn up
        digest = secrets.token_bytes(32)
        signature = answer(codec, _sign(token_unit, codec, key["pub"], "0x" + digest.hex()))["signature"]
        raw = bytes.fromhex(signature[2:])
        r, s, v = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
        assert len(raw) == 65 and v in (27, 28) and 0 < s <= SECP256K1_HALF_N
        recovered = Signature(vrs=(v - 27, r, s)).recover_public_key_from_msg_hash(digest)
        assert recovered.to_checksum_address() == address
        recovery_ids.add(v)
    assert recovery_ids == {27, 28}


def test_the_token_key_is_sensitive_leaves_only_for_a_trusted_key_and_only_signs(token_unit: Unit, hsm: Hsm) -> None:
    codec = token_unit.register("full")
    key = answer(codec, _generate(token_unit, codec))
    dump = dump_database(token_unit.service)
    assert b"pkcs11-ec:" not in dump  # the reference is sealed like an xprv
    key_ids = [label for label in _labels(hsm) if label.startswith("kmsq-ec-")]
    assert key_ids, "no token key was made"
    attributes = hsm.ec_signing_key_attributes(key_ids[-1].encode("ascii"))
    assert attributes["SENSITIVE"] is True and attributes["ALWAYS_SENSITIVE"] is True
    assert attributes["WRAP_WITH_TRUSTED"] is True  # leaves only wrapped for an SO-trusted key (another HSM)
    assert attributes["SIGN"] is True and attributes["DECRYPT"] is False and attributes["DERIVE"] is False
    assert attributes["UNWRAP"] is False and attributes["TOKEN"] is True and attributes["PRIVATE"] is True
    code, _ = refusal(codec, token_unit.deliver(codec, {"op": "get_key", "pub": key["pub"], "source": "user"}))
    assert code == "not_exportable"


def test_in_hsm_is_refused_for_utxo_coins_and_nothing_is_made(token_unit: Unit, hsm: Hsm) -> None:
    codec = token_unit.register("full")
    before = _labels(hsm)
    code, message = refusal(codec, _generate(token_unit, codec, coin="tbtc"))
    assert code == "invalid" and "ETH-like coins only" in message
    assert _labels(hsm) == before
    with transaction(token_unit.service.sessions) as db:
        assert db.scalars(select(PrivateKey)).all() == []


def test_a_token_key_gone_from_the_token_is_not_found(token_unit: Unit, hsm: Hsm) -> None:
    with pytest.raises(Exception, match="signing key not present in the HSM"):
        hsm.sign_ecdsa(b"kmsq-ec-" + secrets.token_hex(16).encode(), bytes(32))


def _labels(hsm: Hsm) -> list[str]:
    return hsm.ec_signing_keys()
