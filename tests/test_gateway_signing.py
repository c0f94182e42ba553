"""External signing through ``kmsq gateway`` as the Advanced Wallet Manager's ``KeyProviderClient`` calls it
(``SIGNING_MODE=external``), over real HTTP to real workers on SoftHSM2 and Postgres: ``POST /key/generate``
and ``POST /sign`` with its bodies and codes, ETH signatures checked with eth-keys, a generated key never
exported (403), and the audit naming the payload's digest, never the payload. Wallet PSBTs are built, checked and
finalized by BitGo's ``@bitgo/utxo-lib``; ``--eth-keys-in-hsm`` keeps ETH-like keys in the token."""

from __future__ import annotations

import hashlib
import secrets
import time
from urllib.parse import quote

import httpx
from embit import bip32
from eth_keys.datatypes import PublicKey, Signature
from sqlalchemy import select

from tests.gateway_fixtures import message_of, start_gateway
from tests.queue_fixtures import Deployment
from tests.test_signing_psbt import EVERY_TESTNET_TYPE
from tests.utxo_lib import UtxoLib
from worker.hsm import Hsm
from worker.storage.models import AuditRecord, PrivateKey

CACHE_SECONDS = 1  # KMSQ_CACHE_SECONDS of the deployment's workers (tests.queue_fixtures.subprocess_env)


def _generate(http: httpx.Client, coin: str = "hteth", source: str = "user") -> dict[str, str]:
    answer = http.post("/key/generate", json={"coin": coin, "source": source, "type": "independent"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"pub", "coin", "source", "type"} and body["pub"].startswith("xpub")
    assert (body["coin"], body["source"], body["type"]) == (coin, source, "independent")
    return dict(body)


def test_generate_then_sign_an_eth_operation_hash(deployment: Deployment, http: httpx.Client) -> None:
    key = _generate(http, "hteth", "backup")
    digest = secrets.token_bytes(32)
    payload = "0x" + digest.hex()
    answer = http.post("/sign", json={"pub": key["pub"], "source": "backup", "signablePayload": payload,
                                      "algorithm": "ecdsa"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert set(answer.json()) == {"signature"}
    assert recovered_address(answer.json()["signature"], digest) == address_of_xpub(key["pub"])
    with deployment.sessions() as db:
        row = db.scalars(select(PrivateKey).where(PrivateKey.pub == key["pub"])).one()
        audited = db.scalars(select(AuditRecord).where(AuditRecord.action == "sign", AuditRecord.actor == "gateway")
                             .order_by(AuditRecord.at.desc())).first()  # fmt: skip
    assert row.exportable is False and "xprv" not in row.encrypted_prv
    assert audited is not None and audited.outcome == "ok"
    assert hashlib.sha256(payload.encode()).hexdigest() in audited.detail and digest.hex() not in audited.detail


def test_a_generated_key_is_never_exported(http: httpx.Client) -> None:
    key = _generate(http)
    answer = http.get(f"/key/{quote(key['pub'], safe='')}", params={"source": "user"})
    assert message_of(answer, 403) == "this key was generated inside kmsq and cannot be exported"
    stored = http.post("/key", json={"pub": key["pub"], "prv": "xprv-overwrite", "coin": "hteth", "source": "user",
                                     "type": "independent"})  # fmt: skip
    assert message_of(stored, 409)


def test_what_the_wallet_manager_cannot_sign_is_a_400_or_404(http: httpx.Client) -> None:
    key = _generate(http)

    def sign(pub: str, payload: str, algorithm: str = "ecdsa") -> httpx.Response:
        return http.post("/sign", json={"pub": pub, "source": "user", "signablePayload": payload,
                                        "algorithm": algorithm})  # fmt: skip

    assert "32-byte hash" in message_of(sign(key["pub"], "0x" + "ab" * 31), 400)
    assert "hex" in message_of(sign(key["pub"], "0xnothex"), 400)
    assert message_of(sign("xpub-nobody", "0x" + "00" * 32), 404) == "no private key for this pub and source"
    assert message_of(sign(key["pub"], "0x" + "00" * 32, "rsa"), 400)
    utxo = _generate(http, "tbtc")
    assert "PSBT" in message_of(sign(utxo["pub"], "70736274ff01"), 400)
    tss = http.post("/key/generate", json={"coin": "hteth", "source": "user", "type": "tss"})
    assert "independent" in message_of(tss, 400)
    assert "coin" in message_of(http.post("/key/generate", json={"source": "user", "type": "independent"}), 400)


def _sign(http: httpx.Client, pub: str, source: str, payload: str) -> httpx.Response:
    return http.post("/sign", json={"pub": pub, "source": source, "signablePayload": payload, "algorithm": "ecdsa"})


def test_a_wallet_psbt_signed_through_the_gateway_by_user_then_backup_finalizes(
    http: httpx.Client, utxo_lib: UtxoLib
) -> None:
    user, backup = _generate(http, "tbtc", "user"), _generate(http, "tbtc", "backup")
    xpubs = [user["pub"], backup["pub"], utxo_lib.keys()[1][2]]
    unsigned = utxo_lib.build("testnet", xpubs, EVERY_TESTNET_TYPE)
    half = _sign(http, user["pub"], "user", unsigned)
    assert half.status_code == 200 and set(half.json()) == {"signature"}, half.text
    assert half.headers["content-type"] == "application/json"  # the client parses nothing else
    assert utxo_lib.signed_by("testnet", xpubs, half.json()["signature"]) == [{"user"}] * len(EVERY_TESTNET_TYPE)
    signed = _sign(http, backup["pub"], "backup", half.json()["signature"])
    assert signed.status_code == 200, signed.text
    assert utxo_lib.finalize("testnet", signed.json()["signature"])["txid"]
    musig2 = [{"scriptType": "p2trMusig2", "signer": "user", "cosigner": "bitgo", "index": 0, "value": 10_000}]
    refused = _sign(http, user["pub"], "user", utxo_lib.build("testnet", xpubs, musig2))
    assert message_of(refused, 400).startswith("input 0 is a MuSig2 key-path spend")
    not_ours = _sign(http, user["pub"], "user", utxo_lib.build("testnet", utxo_lib.keys()[1], EVERY_TESTNET_TYPE[:1]))
    assert "no input of this PSBT is for this key" in message_of(not_ours, 400)


def test_a_gateway_with_eth_keys_in_hsm_keeps_them_in_the_token(deployment: Deployment) -> None:
    deployment.register("gateway-token", ("generate_signing_key", "sign", "sign_hash", "get_key"))
    running = start_gateway(deployment, "gateway-token", deployment.service.fleet_document(), "--eth-keys-in-hsm")
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            before = _token_signing_keys(deployment)
            key = _generate(http, "hteth", "user")
            assert _token_signing_keys(deployment) == before + 1
            utxo = _generate(http, "tbtc", "user")  # a UTXO key stays a BIP32 root: PSBTs need derivation
            assert _token_signing_keys(deployment) == before + 1 and utxo["pub"].startswith("xpub")
            for _ in range(4):
                digest = secrets.token_bytes(32)
                answer = _sign(http, key["pub"], "user", "0x" + digest.hex())
                assert answer.status_code == 200, answer.text
                assert recovered_address(answer.json()["signature"], digest) == address_of_xpub(key["pub"])
            exported = http.get(f"/key/{quote(key['pub'], safe='')}", params={"source": "user"})
            assert message_of(exported, 403) == "this key was generated inside kmsq and cannot be exported"
    finally:
        running.stop()


def _token_signing_keys(deployment: Deployment) -> int:
    hsm = deployment.service.hsm
    assert isinstance(hsm, Hsm)
    return sum(1 for label in hsm.ec_signing_keys() if label.startswith("kmsq-ec-"))


def recovered_address(signature: str, digest: bytes) -> str:
    """The address eth-keys recovers from a ``0x`` + r + s + v signature of ``digest``."""
    raw = bytes.fromhex(signature[2:])
    assert len(raw) == 65 and raw[64] in (27, 28)
    vrs = (raw[64] - 27, int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"))
    return str(Signature(vrs=vrs).recover_public_key_from_msg_hash(digest).to_checksum_address())


def address_of_xpub(xpub: str) -> str:
    return str(PublicKey.from_compressed_bytes(bip32.HDKey.from_string(xpub).key.sec()).to_checksum_address())


def test_a_signing_rule_refusal_is_a_403_with_its_message(
    deployment: Deployment, http: httpx.Client, utxo_lib: UtxoLib
) -> None:
    """What BitGo's KeyProviderClient turns into `... returned unexpected response [403]: <message>`."""
    import json

    from schemas.signing_rules import parse_rules
    from worker.signing_rule_rows import set_rules
    from worker.storage.db import transaction

    user = _generate(http, "tbtc", "user")
    xpubs = [user["pub"], *utxo_lib.keys()[1][1:]]
    with transaction(deployment.sessions) as db:
        set_rules(deployment.service.hsm, db, f"key:{user['pub']}", parse_rules(json.dumps({"max_payment": 1_000})))
    time.sleep(CACHE_SECONDS + 0.5)  # the workers read the rules again (the fresh-clone CI signed within the second)
    refused = _sign(http, user["pub"], "user", utxo_lib.build("testnet", xpubs, EVERY_TESTNET_TYPE[:1]))
    assert refused.headers["content-type"] == "application/json"
    assert message_of(refused, 403).startswith("signing rule max_payment of key:xpub")
