"""Signing ETH-like wallet operations (issue 26): kmsq hashes a BitGo multisig wallet's ``sendMultiSig`` fields to
exactly the hash BitGo's own code computes (@bitgo/statics' prefixes, ethereumjs-abi's ``soliditySHA3`` of
@bitgo/abstract-eth's layout, through tests/interop/eth.js), and the signing rules judge the operation (destination,
value, window); a bare hash needs its own permission, ``sign_hash``, and is counted (``max_hashes``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from coincurve import PublicKey
from embit import bip32

from schemas.coins import ETH_OPERATION_PREFIXES, operation_prefix
from schemas.operations import ALLOWABLE_OPS
from tasks.codec import KmsCodec
from tests.conftest import missing_service
from tests.unit_fixtures import Unit, answer, refusal
from worker.eth_operation import Operation, operation_hash

INTEROP = Path(__file__).parent / "interop"
ETH = 10**18
PAYEE = "0x" + "5a" * 20


def _eth_js(command: str, request: dict[str, Any]) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules" / "@bitgo" / "statics").is_dir():
        missing_service("node and @bitgo/statics (npm ci --prefix tests/interop)")
    assert node is not None
    done = subprocess.run([node, str(INTEROP / "eth.js"), command], input=json.dumps(request), capture_output=True,
                          text=True, timeout=60, check=True)  # fmt: skip
    answer_: dict[str, Any] = json.loads(done.stdout)
    return answer_


def test_the_prefixes_are_bitgos() -> None:
    coins = [*sorted(ETH_OPERATION_PREFIXES), "avaxc"]
    assert _eth_js("prefixes", {"coins": coins})["prefixes"] == {**ETH_OPERATION_PREFIXES, "avaxc": None}
    assert operation_prefix("avaxc") is None and operation_prefix("hteth:bgerchv2") is None


@pytest.mark.parametrize(("coin", "to", "value", "data", "expire", "sequence"), [
    ("hteth", PAYEE, ETH, "0x", 1_700_000_000, 7),
    ("eth", "0x" + "00" * 20, 0, "0x", 0, 0),
    ("polygon", "0x" + "ff" * 20, 2**255 + 12345, "0xa9059cbb" + "00" * 64, 2**63, 2**64 - 1),
    ("tarbeth", "0xAbCdEf" + "01" * 17, 123_456_789, "0x01", 1, 1),
])  # fmt: skip
def test_the_operation_hash_is_bitgos(coin: str, to: str, value: int, data: str, expire: int, sequence: int) -> None:
    theirs = _eth_js("hash", {"coin": coin, "to": to, "value": str(value), "data": data, "expireTime": str(expire),
                              "sequenceId": str(sequence)})["operationHash"]  # fmt: skip
    prefix = operation_prefix(coin)
    assert prefix is not None
    mine = operation_hash(prefix, Operation(to, value, bytes.fromhex(data[2:]), expire, sequence))
    assert "0x" + mine.hex() == theirs


def _key(unit: Unit, codec: KmsCodec, coin: str = "hteth") -> str:
    params = {"op": "generate_signing_key", "coin": coin, "source": "user", "type": "independent"}
    return str(answer(codec, unit.deliver(codec, params))["pub"])


def _operation(pub: str, value: int = ETH, to: str = PAYEE, data: str = "0x", sequence: int = 1) -> dict[str, Any]:
    return {"op": "sign_operation", "pub": pub, "source": "user", "to": to, "value": str(value), "data": data,
            "expire_time": 1_900_000_000, "sequence_id": sequence}  # fmt: skip


def test_an_operation_is_signed_under_its_rules(unit: Unit, full: KmsCodec) -> None:
    pub = _key(unit, full)
    unit.set_rules(f"key:{pub}", {"allow_destinations": [PAYEE.upper().replace("0X", "0x")], "max_payment": 2 * ETH,
                                  "window": {"seconds": 3600, "max_payment": 3 * ETH}})  # fmt: skip
    signed = answer(full, unit.deliver(full, _operation(pub)))
    expected = operation_hash("ETHER", Operation(PAYEE, ETH, b"", 1_900_000_000, 1))
    assert signed["operation_hash"] == "0x" + expected.hex()
    signature = bytes.fromhex(signed["signature"][2:])
    recovered = PublicKey.from_signature_and_message(signature[:64] + bytes([signature[64] - 27]), expected,
                                                     hasher=None)  # fmt: skip
    assert recovered.format() == bip32.HDKey.from_string(pub).key.sec()

    def refused(params: dict[str, Any], rule: str) -> None:
        code, message = refusal(full, unit.deliver(full, params))
        assert code == "policy_denied" and f"signing rule {rule} of key:" in message, (code, message)

    refused(_operation(pub, to="0x" + "66" * 20), "allow_destinations")
    refused(_operation(pub, value=2 * ETH + 1), "max_payment")
    refused(_operation(pub, data="0xa9059cbb" + "00" * 64), "data")  # a token transfer: its value is not what moves
    answer(full, unit.deliver(full, _operation(pub, value=2 * ETH, sequence=2)))
    refused(_operation(pub, value=1, sequence=3), "window")  # 3 ETH left within the hour


def test_a_bare_hash_needs_sign_hash_and_rules_that_count_hashes(unit: Unit, full: KmsCodec) -> None:
    assert "sign_hash" in ALLOWABLE_OPS
    pub = _key(unit, full)
    bare = {"op": "sign", "pub": pub, "source": "user", "payload": "0x" + "cd" * 32, "algorithm": "ecdsa"}
    no_hash = unit.register("no-hash", tuple(op for op in ALLOWABLE_OPS if op != "sign_hash"))
    pub_of_no_hash = _key(unit, no_hash)
    code, message = refusal(no_hash, unit.deliver(no_hash, {**bare, "pub": pub_of_no_hash}))
    assert code == "forbidden" and "sign_hash" in message

    answer(full, unit.deliver(full, bare))  # the default is none: a hash signs
    unit.set_rules(f"key:{pub}", {"max_payment": ETH})
    code, message = refusal(full, unit.deliver(full, {**bare, "payload": "0x" + "ce" * 32}))
    assert code == "policy_denied" and "bare hash cannot be judged" in message
    unit.set_rules(f"key:{pub}", {"max_payment": ETH, "max_hashes": {"seconds": 3600, "count": 2}})
    answer(full, unit.deliver(full, {**bare, "payload": "0x" + "cf" * 32}))
    code, message = refusal(full, unit.deliver(full, {**bare, "payload": "0x" + "d0" * 32}))
    assert code == "policy_denied" and "signing rule max_hashes" in message and "2 hashes signed" in message
