"""Exactly-once effect under at-least-once delivery: a worker child killed mid-request, and duplicate
publishes of the same message."""

from __future__ import annotations

import os
import secrets
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, select, text

from schemas.wire import seal_private_key
from tasks.client import KmsClient
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment, WorkerProcess, start_worker
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction
from worker.storage.models import PrivateKey, RequestRecord

pytestmark = pytest.mark.brokers

POOL = "gamma"


@pytest.fixture(scope="module")
def gamma(deployment: Deployment) -> Iterator[tuple[WorkerProcess, KmsClient]]:
    """A pool of its own with one worker process, so that killing its child disturbs no other test."""
    from tasks.identity import Fleet

    deployment.service.create_root_key("aes-256", POOL)
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, POOL)
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": POOL})
    worker = start_worker(POOL, 1, deployment.env(), deployment.directory / "worker-gamma.log")
    identity = deployment.register("killer")
    client = KmsClient(deployment.broker_url, identity, fleet, timeout=90, namespace=NAMESPACE)
    try:
        yield worker, client
    finally:
        client.close()
        worker.stop()


def wait_for_lock_waiter(database_url: str, timeout: float = 30) -> None:
    """Waits until some session of the queue database is blocked on a lock."""
    engine = create_engine(database_url)
    try:
        deadline = time.monotonic() + timeout
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                ).scalar()
                if waiting:
                    return
                time.sleep(0.05)
    finally:
        engine.dispose()
    raise AssertionError("the worker never reached the locked table")


def test_a_worker_killed_mid_request_completes_it_exactly_once(
    deployment: Deployment, gamma: tuple[WorkerProcess, KmsClient]
) -> None:
    worker, client = gamma
    pub, prv = random_pub(), "xprv" + secrets.token_hex(24)
    deployment.secrets.append(prv.encode())
    blocker = create_engine(deployment.database_url)
    with blocker.connect() as conn:
        # Hold the private_keys table: the worker's transaction (request record inserted, HSM sealing done)
        # blocks on it, mid-request and uncommitted, until the lock goes away.
        conn.execute(text("LOCK TABLE private_keys IN ACCESS EXCLUSIVE MODE"))
        future = client.submit_put_key(pub, prv, "btc", "user", "independent")
        wait_for_lock_waiter(deployment.database_url)
        children = worker.children()
        assert len(children) == 1
        os.kill(children[0], signal.SIGKILL)
        # The message goes back to the queue (reject_on_worker_lost); a new child takes it and blocks again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not worker.children() or worker.children() == children):
            time.sleep(0.1)
        wait_for_lock_waiter(deployment.database_url)
        conn.rollback()  # release the lock
    blocker.dispose()
    assert client.wait(future) == {"pub": pub, "coin": "btc", "source": "user", "type": "independent"}
    assert future.reply is not None and future.reply.pool == POOL
    with deployment.sessions() as db:
        assert len(db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).all()) == 1
        records = db.scalars(select(RequestRecord).where(RequestRecord.request_id == future.request_id)).all()
        assert [r.status for r in records] == ["ok"]
    assert client.get_key(pub, "user")["prv"] == prv
    assert "WorkerLostError" in worker.log.read_text() or "SIGKILL" in worker.log.read_text()


def test_a_duplicated_message_has_one_effect_and_the_same_reply(
    deployment: Deployment, gamma: tuple[WorkerProcess, KmsClient]
) -> None:
    _, client = gamma
    pub, prv = random_pub(), "xprv" + secrets.token_hex(24)
    deployment.secrets.append(prv.encode())
    request_id = uuid.uuid4()
    sealed = seal_private_key(client.fleet.pools[POOL].transport_key, client.identity.caller, request_id, prv.encode())
    params = {"op": "put_key", "pub": pub, "prv": sealed, "coin": "ltc", "source": "backup", "type": "tss"}
    request, args = client.build_request(params, POOL, request_id)
    replies = []
    for _ in range(3):  # three deliveries of one message, answered one after another
        future = client.expect(request_id)
        client.send(request, args)
        assert client.wait(future)["pub"] == pub
        assert future.reply is not None
        replies.append(future.reply)
    assert replies[0] == replies[1] == replies[2]  # the stored reply, byte for byte (same issued_at)
    with deployment.sessions() as db:
        assert len(db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).all()) == 1
        assert len(db.scalars(select(RequestRecord).where(RequestRecord.request_id == str(request_id))).all()) == 1


def test_concurrent_duplicates_have_one_effect(deployment: Deployment, client: KmsClient) -> None:
    """Two alpha worker processes receive the same message at once: one key, one record, two equal replies."""
    pub, prv = random_pub(), "xprv" + secrets.token_hex(24)
    deployment.secrets.append(prv.encode())
    request_id = uuid.uuid4()
    sealed = seal_private_key(
        client.fleet.pools["alpha"].transport_key, client.identity.caller, request_id, prv.encode()
    )
    params = {"op": "put_key", "pub": pub, "prv": sealed, "coin": "ltc", "source": "user", "type": "tss"}
    with deployment.client(client.identity, reply_queue="dups") as listener:
        request, args = listener.build_request(params, "alpha", request_id)
        first = listener.expect(request_id)
        client.publish("kmsq.put_key", args, str(request_id), "alpha", request.reply_queue)
        client.publish("kmsq.put_key", args, str(request_id), "alpha", request.reply_queue)
        assert listener.wait(first)["pub"] == pub
        deadline = time.monotonic() + 30
        second: dict[str, object] = {}
        while time.monotonic() < deadline and not second:
            second = dict(listener.take_unclaimed())
            time.sleep(0.05)
    assert str(request_id) in second
    with deployment.sessions() as db:
        assert len(db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).all()) == 1


def test_a_batch_redelivered_after_kill_is_executed_once(
    deployment: Deployment, gamma: tuple[WorkerProcess, KmsClient]
) -> None:
    worker, client = gamma
    entries = [{"pub": random_pub(), "prv": "xprv" + secrets.token_hex(20), "coin": "btc", "source": "backup",
                "type": "tss"} for _ in range(25)]  # fmt: skip
    deployment.secrets += [e["prv"].encode() for e in entries]
    blocker = create_engine(deployment.database_url)
    with blocker.connect() as conn:
        conn.execute(text("LOCK TABLE private_keys IN ACCESS EXCLUSIVE MODE"))
        future = client.submit_put_keys(entries)
        wait_for_lock_waiter(deployment.database_url)
        children = worker.children()
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not worker.children() or worker.children() == children):
            time.sleep(0.1)
        wait_for_lock_waiter(deployment.database_url)
        conn.rollback()
    blocker.dispose()
    items = client.wait(future)["items"]
    assert [i.get("error") for i in items] == [None] * 25
    pubs = [e["pub"] for e in entries]
    with deployment.sessions() as db:
        assert len(db.scalars(select(PrivateKey.id).where(PrivateKey.pub.in_(pubs))).all()) == 25
        assert len(db.scalars(select(RequestRecord).where(RequestRecord.request_id == future.request_id)).all()) == 1
    fetched = client.wait(client.submit_get_key(entries[7]["pub"], "backup"))
    assert fetched["prv"] == entries[7]["prv"]
