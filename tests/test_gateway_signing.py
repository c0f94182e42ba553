"""External signing through ``kmsq gateway`` as the Advanced Wallet Manager's ``KeyProviderClient`` calls it
(``SIGNING_MODE=external``), over real HTTP to real workers on SoftHSM2 and Postgres: ``POST /key/generate``
and ``POST /sign`` with its bodies and codes, ETH signatures checked with eth-keys, a generated key never
exported (403), and the audit naming the payload's digest, never the payload."""

from __future__ import annotations

import hashlib
import secrets
from urllib.parse import quote

import httpx
from embit import bip32
from eth_keys.datatypes import PublicKey, Signature
from sqlalchemy import select

from tests.gateway_fixtures import message_of
from tests.queue_fixtures import Deployment
from worker.storage.models import AuditRecord, PrivateKey


def _generate(http: httpx.Client, coin: str = "hteth", source: str = "user") -> dict[str, str]:
    answer = http.post("/key/generate", json={"coin": coin, "source": source, "type": "independent"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"pub", "coin", "source", "type"} and body["pub"].startswith("xpub")
    assert (body["coin"], body["source"], body["type"]) == (coin, source, "independent")
    return dict(body)


def test_generate_then_sign_an_eth_operation_hash(deployment: Deployment, http: httpx.Client) -> None:
    key = _generate(http, "hteth", "backup")
    address = PublicKey.from_compressed_bytes(bip32.HDKey.from_string(key["pub"]).key.sec()).to_checksum_address()
    digest = secrets.token_bytes(32)
    payload = "0x" + digest.hex()
    answer = http.post("/sign", json={"pub": key["pub"], "source": "backup", "signablePayload": payload,
                                      "algorithm": "ecdsa"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert set(answer.json()) == {"signature"}
    raw = bytes.fromhex(answer.json()["signature"][2:])
    assert len(raw) == 65 and raw[64] in (27, 28)
    signature = Signature(vrs=(raw[64] - 27, int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")))
    assert signature.recover_public_key_from_msg_hash(digest).to_checksum_address() == address
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
