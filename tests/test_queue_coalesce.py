"""Coalesced single requests through real workers: each caller gets exactly what its single request would have
got (fields and errors, item by item), a lone request goes out at once, and a worker killed mid-batch loses no
coalesced request and answers none twice."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, select, text

from tasks.client import KmsClient, KmsError, RequestFuture
from tasks.coalesce import CoalescePolicy
from tasks.codec import Fields
from tasks.identity import Fleet
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment, WorkerProcess, start_worker
from tests.test_queue_exactly_once import wait_for_lock_waiter
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction
from worker.storage.models import PrivateKey, RequestRecord

POOL = "pi"
# Long enough that every request submitted in one loop joins the batch of the first one still in flight.
GROUPING = CoalescePolicy(linger=0.3)


@dataclass
class Pi:
    allowed: str  # the root key the restricted caller may use
    other: str  # one it may not
    worker: WorkerProcess
    fleet: Fleet
    single: KmsClient  # the restricted caller, no coalescing
    grouped: KmsClient  # the same caller, coalescing


@pytest.fixture(scope="module")
def pi(deployment: Deployment) -> Iterator[Pi]:
    """A pool of its own with one worker process (killed by a test), and a caller allowed one of its two root
    keys, with a coalescing and a plain client."""
    allowed = deployment.service.create_root_key("aes-256", POOL).id
    other = deployment.service.create_root_key("aes-256", POOL).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, POOL)
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": POOL})
    worker = start_worker(POOL, 1, deployment.env(), deployment.directory / "worker-pi.log")
    identity = deployment.register("coalesced", root_keys=[allowed])
    single = KmsClient(deployment.broker_url, identity, fleet, timeout=90, namespace=NAMESPACE)
    grouped = KmsClient(deployment.broker_url, identity, fleet, timeout=90, namespace=NAMESPACE, coalesce=GROUPING)
    try:
        yield Pi(allowed, other, worker, fleet, single, grouped)
    finally:
        grouped.close()
        single.close()
        worker.stop()


Start = Callable[[KmsClient], RequestFuture]


def outcome(future: RequestFuture | KmsError, client: KmsClient) -> object:
    """The fields, or the error as (code, message)."""
    try:
        if isinstance(future, KmsError):
            raise future
        return client.wait(future)
    except KmsError as e:
        return (e.code, e.message)


def start(client: KmsClient, begin: Start) -> RequestFuture | KmsError:
    """The request's future, or the error it was refused with before it was sent."""
    try:
        return begin(client)
    except KmsError as e:
        return e


def singles(client: KmsClient, starts: list[Start]) -> list[object]:
    """Each request sent and answered alone, one after another."""
    return [outcome(start(client, begin), client) for begin in starts]


def together(client: KmsClient, starts: list[Start]) -> list[object]:
    """All requests submitted at once through the coalescing client; checks that they went out in batches."""
    coalescer = client.coalescer
    assert coalescer is not None
    before = coalescer.items_coalesced
    futures = [start(client, begin) for begin in starts]
    out = [outcome(f, client) for f in futures]
    sent = sum(not isinstance(f, KmsError) for f in futures)
    assert coalescer.items_coalesced - before >= sent - 2, "the requests did not go out as a batch"
    return out


def decrypt(key: str) -> Start:
    return lambda c: c.submit_decrypt_data_key(key)


def rewrap(key: str) -> Start:
    return lambda c: c.submit_rewrap_data_key(key)


def generate(root: str, with_plaintext: bool = True) -> Start:
    return lambda c: c.submit_generate_data_key(root, with_plaintext)


def put(pub: str, prv: str, coin: str, source: str, root: str) -> Start:
    return lambda c: c.submit_put_key(pub, prv, coin, source, "tss", root)


def get(pub: str, source: str) -> Start:
    return lambda c: c.submit_get_key(pub, source, POOL)


def admin(deployment: Deployment, pi: Pi) -> KmsClient:
    """A client of a caller allowed every root key."""
    identity = deployment.register(f"admin-{secrets.token_hex(3)}")
    return KmsClient(deployment.broker_url, identity, pi.fleet, timeout=90, namespace=NAMESPACE)


def test_decrypt_and_rewrap_mixes_answer_item_by_item_as_singles(deployment: Deployment, pi: Pi) -> None:
    made = [pi.single.generate_data_key(pi.allowed) for _ in range(6)]
    deployment.secrets += [m["plaintextKey"].encode() for m in made]
    good = [m["encryptedKey"] for m in made]
    tampered = good[1][:-2] + ("AA" if not good[1].endswith("AA") else "BA")
    with admin(deployment, pi) as kms:
        forbidden = kms.generate_data_key(pi.other, with_plaintext=False)["encryptedKey"]
    keys = [good[0], tampered, "kmsq:v1:not-base64url!", good[2], forbidden, good[3], "x" * 9000, good[4]]
    for make in (decrypt, rewrap):
        starts = [make(k) for k in keys]
        alone, grouped = singles(pi.single, starts), together(pi.grouped, starts)
        assert grouped == alone
        answers = [g for g in grouped if isinstance(g, dict)]
        if make is decrypt:
            assert answers == [{"plaintextKey": made[i]["plaintextKey"]} for i in (0, 2, 3, 4)]
        else:  # a key under the current version comes back as it is
            assert answers == [{"encryptedKey": good[i]} for i in (0, 2, 3, 4)]
        refusals = [g for g in grouped if isinstance(g, tuple)]
        assert ("forbidden", f"root key {pi.other} is not allowed for this caller") in refusals
        assert ("invalid", "ciphertext failed integrity check") in refusals
        assert len(refusals) == 4


def shape(answer: object) -> object:
    """New keys differ from one run to the next; their field names do not."""
    return sorted(answer) if isinstance(answer, dict) else answer


def test_generate_groups_per_root_key_and_a_refused_root_key_fails_each_of_its_requests(pi: Pi) -> None:
    starts = [generate(pi.allowed), generate(pi.other), generate(pi.allowed, with_plaintext=False)] * 6
    alone = singles(pi.single, starts)
    futures = [begin(pi.grouped) for begin in starts]
    grouped = [outcome(f, pi.grouped) for f in futures]
    assert [shape(g) for g in grouped] == [shape(a) for a in alone]
    assert grouped[1] == ("forbidden", f"root key {pi.other} is not allowed for this caller")
    assert shape(grouped[0]) == ["encryptedKey", "plaintextKey"] and shape(grouped[2]) == ["encryptedKey"]
    for made in grouped[0::3]:
        assert isinstance(made, dict)
        assert pi.single.decrypt_data_key(made["encryptedKey"]) == {"plaintextKey": made["plaintextKey"]}
    assert len({f.request_id for f in futures[0::3]}) <= 2  # the first alone, the later ones in one message


def test_put_and_get_mixes_answer_item_by_item_as_singles(deployment: Deployment, pi: Pi) -> None:
    existing = random_pub()
    pi.single.put_key(existing, "xprv-existing-pi", "btc", "user", "tss", pi.allowed)
    deployment.secrets.append(b"xprv-existing-pi")
    conflict = outcome(pi.single.submit_put_key(existing, "xprv-again", "btc", "user", "tss", pi.allowed), pi.single)
    assert conflict[0] == "conflict"  # type: ignore[index]
    fresh = [(random_pub(), "xprv" + secrets.token_hex(20)) for _ in range(6)]
    deployment.secrets += [prv.encode() for _, prv in fresh]
    puts = [put(p, v, "sol:usdc", "backup", pi.allowed) for p, v in fresh]
    puts.insert(3, put(existing, "xprv-again", "btc", "user", pi.allowed))
    put_out = together(pi.grouped, puts)
    assert put_out[3] == conflict
    assert [o for i, o in enumerate(put_out) if i != 3] == [
        {"pub": p, "coin": "sol:usdc", "source": "backup", "type": "tss"} for p, _ in fresh
    ]
    with pytest.raises(KmsError) as bad:  # refused before anything is sent, as a single is
        pi.grouped.submit_put_key(random_pub(), "xprv", "not\na coin", "user", "tss", pi.allowed)
    with pytest.raises(KmsError) as bad_alone:
        pi.single.submit_put_key(random_pub(), "xprv", "not\na coin", "user", "tss", pi.allowed)
    assert (bad.value.code, bad.value.message) == (bad_alone.value.code, bad_alone.value.message)

    hidden = random_pub()
    with admin(deployment, pi) as kms:
        kms.put_key(hidden, "xprv-hidden-pi", "btc", "user", "tss", pi.other)
    deployment.secrets.append(b"xprv-hidden-pi")
    gets = [get(p, "backup") for p, _ in fresh[:3]]
    gets += [get(random_pub(), "user"), get(hidden, "user"), get(existing, "backup"), get(existing, "user")]
    alone, grouped = singles(pi.single, gets), together(pi.grouped, gets)
    assert grouped == alone
    assert grouped[:3] == [
        {"prv": v, "pub": p, "coin": "sol:usdc", "source": "backup", "type": "tss"} for p, v in fresh[:3]
    ]
    assert grouped[3] == ("not_found", "no private key for this pub and source") == grouped[5]
    assert grouped[4] == ("forbidden", f"root key {pi.other} is not allowed for this caller")
    assert grouped[6] == {"prv": "xprv-existing-pi", "pub": existing, "coin": "btc", "source": "user", "type": "tss"}


def test_a_lone_request_is_sent_at_once(deployment: Deployment, pi: Pi) -> None:
    """With nothing in flight a request does not wait for company: with a linger far beyond the client's
    timeout, it is answered, alone, and nothing waits in a group."""
    identity = deployment.register("lonely")
    lazy = CoalescePolicy(linger=1.0)
    with KmsClient(deployment.broker_url, identity, pi.fleet, timeout=0.9, namespace=NAMESPACE, coalesce=lazy) as kms:
        assert kms.coalescer is not None
        for _ in range(3):
            future = kms.submit_generate_data_key(pi.allowed, with_plaintext=False)
            assert not kms.coalescer._groups  # sent, not waiting
            assert "encryptedKey" in kms.wait(future)
        assert kms.coalescer.batches_sent == 0


def test_a_worker_killed_mid_batch_loses_no_coalesced_request_and_runs_none_twice(
    deployment: Deployment, pi: Pi
) -> None:
    keys = [(random_pub(), "xprv" + secrets.token_hex(24)) for _ in range(40)]
    deployment.secrets += [prv.encode() for _, prv in keys]
    blocker = create_engine(deployment.database_url)
    with blocker.connect() as conn:
        # The worker's transaction blocks on the table mid-request, uncommitted, until the lock goes away.
        conn.execute(text("LOCK TABLE private_keys IN ACCESS EXCLUSIVE MODE"))
        futures = [pi.grouped.submit_put_key(p, v, "btc", "user", "independent", pi.allowed) for p, v in keys]
        wait_for_lock_waiter(deployment.database_url)
        children = pi.worker.children()
        assert len(children) == 1
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not pi.worker.children() or pi.worker.children() == children):
            time.sleep(0.1)
        wait_for_lock_waiter(deployment.database_url)
        conn.rollback()
    blocker.dispose()
    assert [pi.grouped.wait(f) for f in futures] == [
        {"pub": p, "coin": "btc", "source": "user", "type": "independent"} for p, _ in keys
    ]
    request_ids = {f.request_id for f in futures}
    assert len(request_ids) < len(keys)  # they went in batches
    with deployment.sessions() as db:
        rows = db.scalars(select(PrivateKey.pub).where(PrivateKey.pub.in_([p for p, _ in keys]))).all()
        assert sorted(rows) == sorted(p for p, _ in keys)  # each once
        records = db.scalars(select(RequestRecord).where(RequestRecord.request_id.in_(request_ids))).all()
        assert sorted(r.status for r in records) == ["ok"] * len(request_ids)
    assert pi.single.get_key(keys[-1][0], "user", POOL)["prv"] == keys[-1][1]


def test_a_lost_batch_message_is_sent_again_with_its_request_id_and_runs_once(deployment: Deployment) -> None:
    """A pool whose queue loses its messages (a broker failover to a replica that had not received them): the
    coalescing client with ``resend_after`` sends each message again, the batch with its own request id, and
    each request takes effect once."""
    import redis

    from schemas.wire import namespace_key_prefix, pool_queue

    pool = "rho"
    root = deployment.service.create_root_key("aes-256", pool).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, pool)
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": pool})
    identity = deployment.register("resender")
    keys = [(random_pub(), "xprv" + secrets.token_hex(24)) for _ in range(12)]
    deployment.secrets += [prv.encode() for _, prv in keys]
    queue = namespace_key_prefix(NAMESPACE) + pool_queue(pool)
    broker = redis.Redis.from_url(deployment.broker_url)
    with KmsClient(deployment.broker_url, identity, fleet, timeout=90, namespace=NAMESPACE, resend_after=1.0,
                   coalesce=CoalescePolicy(linger=0.2)) as kms:  # fmt: skip
        futures = [kms.submit_put_key(p, v, "btc", "user", "tss", root) for p, v in keys]
        deadline = time.monotonic() + 10
        while broker.llen(queue) < 2:  # the first request alone, the others in one batch
            assert time.monotonic() < deadline, "the messages never reached the queue"
            time.sleep(0.05)
        assert broker.delete(queue) == 1  # lost
        worker = start_worker(pool, 1, deployment.env(), deployment.directory / "worker-rho.log")
        try:
            assert [kms.wait(f) for f in futures] == [
                {"pub": p, "coin": "btc", "source": "user", "type": "tss"} for p, _ in keys
            ]
        finally:
            worker.stop()
    request_ids = {f.request_id for f in futures}
    assert len(request_ids) == 2
    with deployment.sessions() as db:
        rows = db.scalars(select(PrivateKey.pub).where(PrivateKey.pub.in_([p for p, _ in keys]))).all()
        assert sorted(rows) == sorted(p for p, _ in keys)
        records = db.scalars(select(RequestRecord).where(RequestRecord.request_id.in_(request_ids))).all()
        assert sorted(r.status for r in records) == ["ok", "ok"]


def test_the_async_client_over_a_coalescing_client_coalesces(deployment: Deployment, pi: Pi) -> None:
    import asyncio

    from tasks.client import AsyncKmsClient

    coalescer = pi.grouped.coalescer
    assert coalescer is not None
    before = coalescer.items_coalesced

    async def many() -> list[Fields]:
        akms = AsyncKmsClient(pi.grouped)
        made = await asyncio.gather(*(akms.generate_data_key(pi.allowed) for _ in range(40)))
        back = await asyncio.gather(*(akms.decrypt_data_key(m["encryptedKey"]) for m in made))
        assert [b["plaintextKey"] for b in back] == [m["plaintextKey"] for m in made]
        return list(made)

    made = asyncio.run(many())
    deployment.secrets += [m["plaintextKey"].encode() for m in made[:3]]
    assert len({m["encryptedKey"] for m in made}) == 40
    assert coalescer.items_coalesced - before >= 2 * 40 - 4  # all but the first of each kind, in batches
