"""Batch operations end to end through real workers: one message, one transaction, one sealed reply, and
per-item errors that do not fail the rest of the batch."""

from __future__ import annotations

import base64
import secrets

import pytest
from sqlalchemy import select

from schemas.limits import MAX_BATCH_ITEMS
from tasks.client import KmsClient, KmsError
from tests.conftest import random_pub
from tests.queue_fixtures import Deployment
from worker.storage.models import PrivateKey, RequestRecord


@pytest.mark.parametrize("key_type", ["aes-256", "rsa-2048"])
def test_generate_and_decrypt_batches(deployment: Deployment, client: KmsClient, key_type: str) -> None:
    root = deployment.roots[("beta", key_type)]
    future = client.submit_generate_data_keys(50, root)
    items = client.wait(future)["items"]
    assert future.reply is not None and future.reply.pool == "beta" and len(future.reply.sealed) == 1
    assert len(items) == 50 and len({i["encryptedKey"] for i in items}) == 50
    assert all(len(base64.b64decode(i["plaintextKey"])) == 32 for i in items)
    deployment.secrets += [i["plaintextKey"].encode() for i in items[:5]]
    decrypted = client.decrypt_data_keys([i["encryptedKey"] for i in items])["items"]
    assert [d["plaintextKey"] for d in decrypted] == [i["plaintextKey"] for i in items]
    with deployment.sessions() as db:
        assert db.get(RequestRecord, ("full", future.request_id)) is not None  # one record for the batch


def test_generate_without_plaintext_batch(client: KmsClient) -> None:
    items = client.generate_data_keys(20, with_plaintext=False)["items"]
    assert all(set(i) == {"encryptedKey"} for i in items)
    assert all("plaintextKey" in d for d in client.decrypt_data_keys([i["encryptedKey"] for i in items])["items"])


def test_decrypt_batch_with_bad_items(client: KmsClient) -> None:
    good = client.generate_data_keys(3)["items"]
    tampered = good[1]["encryptedKey"][:-2] + ("AA" if not good[1]["encryptedKey"].endswith("AA") else "BA")
    keys = [good[0]["encryptedKey"], tampered, "not-a-key", good[2]["encryptedKey"]]
    items = client.decrypt_data_keys(keys)["items"]
    assert items[0] == {"plaintextKey": good[0]["plaintextKey"]}
    assert items[1] == {"error": "invalid", "message": "ciphertext failed integrity check"} == items[2]
    assert items[3] == {"plaintextKey": good[2]["plaintextKey"]}


def test_put_keys_batch_with_partial_failure(deployment: Deployment, client: KmsClient) -> None:
    existing = random_pub()
    client.put_key(existing, "xprv-existing", "btc", "user", "independent")
    repeated = random_pub()
    entries = [{"pub": random_pub(), "prv": "xprv" + secrets.token_hex(20), "coin": "btc", "source": "user",
                "type": "tss"} for _ in range(8)]  # fmt: skip
    deployment.secrets += [e["prv"].encode() for e in entries]
    entries[2] = entries[2] | {"pub": existing}  # stored before: conflict
    entries[4] = entries[4] | {"pub": repeated}
    entries[5] = entries[5] | {"pub": repeated}  # repeated within the batch: the second is a conflict
    entries[6] = entries[6] | {"coin": "not\na coin"}  # malformed: invalid
    before = deployment.count("private_keys")
    items = client.put_keys(entries, deployment.roots[("alpha", "rsa-2048")])["items"]
    codes = [item.get("error") for item in items]
    assert codes == [None, None, "conflict", None, None, "conflict", "invalid", None]
    assert deployment.count("private_keys") == before + 5
    for entry, item in zip(entries, items, strict=True):
        if item.get("error") is None:
            assert item == {k: entry[k] for k in ("pub", "coin", "source", "type")}
            assert client.get_key(entry["pub"], "user")["prv"] == entry["prv"]
    assert client.get_key(existing, "user")["prv"] == "xprv-existing"


def test_batch_limits_and_permissions(deployment: Deployment, client: KmsClient) -> None:
    with pytest.raises(KmsError) as too_many:
        client.generate_data_keys(MAX_BATCH_ITEMS + 1)
    assert too_many.value.code == "invalid"
    identity = deployment.register("batch-bare", ("generate_data_key_without_plaintext",), plaintext=False)
    with deployment.client(identity) as bare:
        assert len(bare.generate_data_keys(5, with_plaintext=False)["items"]) == 5
        for call in (lambda: bare.generate_data_keys(5), lambda: bare.decrypt_data_keys(["x"])):
            with pytest.raises(KmsError) as refused:
                call()
            assert refused.value.code == "forbidden"


def test_a_full_size_batch(deployment: Deployment, client: KmsClient) -> None:
    future = client.submit_generate_data_keys(MAX_BATCH_ITEMS, with_plaintext=True)
    items = client.wait(future)["items"]
    assert len({i["plaintextKey"] for i in items}) == MAX_BATCH_ITEMS
    with deployment.sessions() as db:
        records = db.scalars(select(RequestRecord).where(RequestRecord.request_id == future.request_id)).all()
        assert not db.scalars(select(PrivateKey.id).where(PrivateKey.pub == "")).all()
    assert len(records) == 1 and records[0].status == "ok"
