"""Each operation end to end: caller SDK → Redis → a real worker of the right pool → SoftHSM2 → Postgres → a
signed, sealed reply on the caller's reply queue."""

from __future__ import annotations

import asyncio
import base64
import secrets

import pytest
from sqlalchemy import select

from tasks.client import AsyncKmsClient, KmsClient, KmsError, KmsTimeout
from tasks.identity import CallerIdentity, Fleet
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment
from worker.storage.models import PrivateKey, RequestRecord

pytestmark = pytest.mark.brokers

ROOT_TYPES = ("aes-256", "rsa-2048")


def served_by(future: object, deployment: Deployment, pool: str) -> None:
    """Asserts that the reply came from a worker of ``pool`` (only they hold its fleet signing key)."""
    reply = getattr(future, "reply", None)
    assert reply is not None
    assert reply.pool == pool
    assert reply.worker_key_id == deployment.fleet.pools[pool].signing_key_id


@pytest.mark.parametrize("pool", ["alpha", "beta"])
@pytest.mark.parametrize("key_type", ROOT_TYPES)
def test_data_key_round_trip(deployment: Deployment, client: KmsClient, pool: str, key_type: str) -> None:
    root = deployment.roots[(pool, key_type)]
    future = client.submit_generate_data_key(root)
    key = client.wait(future)
    served_by(future, deployment, pool)
    plaintext = base64.b64decode(key["plaintextKey"], validate=True)
    assert len(plaintext) == 32
    assert key["encryptedKey"].startswith("kmsq:v1:")
    deployment.secrets += [plaintext, key["plaintextKey"].encode()]
    again = client.submit_decrypt_data_key(key["encryptedKey"])
    assert client.wait(again) == {"plaintextKey": key["plaintextKey"]}
    served_by(again, deployment, pool)


@pytest.mark.parametrize("pool", ["alpha", "beta"])
def test_generate_without_plaintext(deployment: Deployment, client: KmsClient, pool: str) -> None:
    key = client.generate_data_key(deployment.roots[(pool, "rsa-2048")], with_plaintext=False)
    assert set(key) == {"encryptedKey"}
    plaintext = client.decrypt_data_key(key["encryptedKey"])["plaintextKey"]
    assert len(base64.b64decode(plaintext)) == 32
    deployment.secrets.append(plaintext.encode())


@pytest.mark.parametrize("pool", ["alpha", "beta"])
@pytest.mark.parametrize("key_type", ROOT_TYPES)
def test_private_key_round_trip(deployment: Deployment, client: KmsClient, pool: str, key_type: str) -> None:
    root = deployment.roots[(pool, key_type)]
    pub, prv = random_pub(), "xprv9s21ZrQH143K" + secrets.token_urlsafe(48)
    deployment.secrets.append(prv.encode())
    future = client.submit_put_key(pub, prv, "btc", "backup", "tss", root)
    assert client.wait(future) == {"pub": pub, "coin": "btc", "source": "backup", "type": "tss"}
    served_by(future, deployment, pool)
    fetched = client.submit_get_key(pub, "backup", pool)
    assert client.wait(fetched) == {"pub": pub, "prv": prv, "coin": "btc", "source": "backup", "type": "tss"}
    served_by(fetched, deployment, pool)
    with deployment.sessions() as db:
        row = db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).one()
        assert (row.root_key, row.source) == (root, "backup")


def test_get_key_errors_and_conflict(deployment: Deployment, client: KmsClient) -> None:
    pub, prv = random_pub(), secrets.token_hex(32)
    deployment.secrets.append(prv.encode())
    client.put_key(pub, prv, "eth", "user", "independent")
    with pytest.raises(KmsError) as conflict:
        client.put_key(pub, "another-" + prv, "eth", "user", "independent")
    assert conflict.value.code == "conflict"
    with pytest.raises(KmsError) as missing:
        client.get_key(pub, "backup")
    assert missing.value.code == "not_found"
    assert client.get_key(pub, "user")["prv"] == prv


def test_a_root_key_of_another_pool_is_refused_by_the_wrong_worker(deployment: Deployment, client: KmsClient) -> None:
    beta_root = deployment.roots[("beta", "aes-256")]
    future = client.submit({"op": "generate_data_key", "root_key_id": beta_root}, "alpha")
    with pytest.raises(KmsError) as refused:
        client.wait(future)
    assert refused.value.code == "invalid"
    served_by(future, deployment, "alpha")


def test_get_result_returns_the_stored_reply(deployment: Deployment, client: KmsClient) -> None:
    future = client.submit_generate_data_key()
    first = client.wait(future)
    deployment.secrets.append(first["plaintextKey"].encode())
    assert client.get_result(future.request_id) == first
    with pytest.raises(KmsError) as missing:
        client.get_result("00000000-0000-4000-8000-000000000000")
    assert missing.value.code == "not_found"


def test_many_requests_in_flight(deployment: Deployment, client: KmsClient) -> None:
    futures = [client.submit_generate_data_key(deployment.roots[("alpha", "aes-256")]) for _ in range(60)]
    keys = [client.wait(f) for f in futures]
    assert len({k["encryptedKey"] for k in keys}) == 60
    assert len({k["plaintextKey"] for k in keys}) == 60
    deployment.secrets += [k["plaintextKey"].encode() for k in keys]
    with deployment.sessions() as db:
        ids = [f.request_id for f in futures]
        stored = db.scalars(select(RequestRecord.status).where(RequestRecord.request_id.in_(ids))).all()
    assert stored == ["ok"] * 60


def test_async_client(deployment: Deployment, client: KmsClient) -> None:
    async def run() -> None:
        kms = AsyncKmsClient(client)
        keys = await asyncio.gather(*(kms.generate_data_key() for _ in range(20)))
        plain = await asyncio.gather(*(kms.decrypt_data_key(k["encryptedKey"]) for k in keys))
        assert [p["plaintextKey"] for p in plain] == [k["plaintextKey"] for k in keys]
        deployment.secrets.extend(k["plaintextKey"].encode() for k in keys)
        pub, prv = random_pub(), secrets.token_hex(32)
        deployment.secrets.append(prv.encode())
        await kms.put_key(pub, prv, "btc", "user", "independent")
        assert (await kms.get_key(pub, "user"))["prv"] == prv
        batch = (await kms.generate_data_keys(3))["items"]
        deployment.secrets.extend(k["plaintextKey"].encode() for k in batch)
        opened = await kms.decrypt_data_keys([k["encryptedKey"] for k in batch])
        assert [i["plaintextKey"] for i in opened["items"]] == [k["plaintextKey"] for k in batch]
        items = [{"pub": random_pub(), "prv": secrets.token_hex(32), "coin": "btc", "source": "user",
                  "type": "tss"} for _ in range(2)]  # fmt: skip
        deployment.secrets.extend(i["prv"].encode() for i in items)
        stored = await kms.put_keys(items)
        assert [i["pub"] for i in stored["items"]] == [i["pub"] for i in items]

    asyncio.run(run())


def test_a_restarted_client_receives_replies_from_its_durable_queue(deployment: Deployment, client: KmsClient) -> None:
    identity = client.identity
    first = deployment.client(identity, reply_queue="durable")
    request, args = first.build_request({"op": "generate_data_key"}, "alpha")
    first.close()  # the caller goes away before the reply arrives
    publisher = deployment.client(identity, reply_queue="publisher")
    publisher.publish("kmsq.generate_data_key", args, str(request.request_id), "alpha", request.reply_queue)
    publisher.close()
    with deployment.client(identity, reply_queue="durable") as second:
        key = second.wait(second.expect(request.request_id))
    assert len(base64.b64decode(key["plaintextKey"])) == 32
    deployment.secrets.append(key["plaintextKey"].encode())


def test_a_timed_out_request_is_forgotten(deployment: Deployment, full_caller: CallerIdentity) -> None:
    """No worker serves the pool: the caller times out, and neither the sync nor the async client keeps the
    request pending (a long-running caller such as the gateway would otherwise grow without bound)."""
    document = deployment.service.fleet_document()
    document["pools"]["ghost"] = dict(document["pools"]["beta"], root_keys=[])
    ghost = Fleet.from_document(document)
    with KmsClient(deployment.broker_url, full_caller, ghost, timeout=0.5, namespace=NAMESPACE) as kms:
        future = kms.submit({"op": "get_key", "pub": random_pub(), "source": "user"}, "ghost")
        with pytest.raises(KmsTimeout):
            kms.wait(future)
        assert future.cancelled() and not kms._pending

        async def wait_async() -> None:
            with pytest.raises(KmsTimeout):
                await AsyncKmsClient(kms).get_key(random_pub(), "user", pool="ghost")

        asyncio.run(wait_async())
        assert not kms._pending
