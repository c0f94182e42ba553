"""Retention on real workers, Postgres and Redis: a worker prunes request records by itself under load without
losing a reply still within retention, nor one whose expires_at a database writer lowered, and a reply queue
nobody reads disappears with its replies after its TTL while the stored reply still answers get_result."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import select

from schemas.wire import namespace_key_prefix, task_name
from tasks.client import KmsClient
from tasks.codec import KmsCodec
from tasks.identity import Fleet
from tests.queue_fixtures import NAMESPACE, Deployment, WorkerProcess, start_worker
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction
from worker.storage.models import RequestRecord

POOL = "sigma"
TTL = 3  # each request's own validity (s)
SKEW = 1
GRACE = 2  # a record goes TTL + SKEW + GRACE = 6 s after its request was made
REPLY_QUEUE_TTL = 2


@dataclass
class Sigma:
    worker: WorkerProcess
    fleet: Fleet
    client: KmsClient
    codec_for: KmsCodec  # the same caller, for requests whose replies go to a queue nobody reads


@pytest.fixture(scope="module")
def sigma(deployment: Deployment) -> Iterator[Sigma]:
    """A pool of its own whose worker keeps records 6 s, prunes every second and gives reply queues a 2 s TTL."""
    deployment.service.create_root_key("aes-256", POOL)
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, POOL)
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": POOL})
    env = deployment.env(
        KMSQ_CLOCK_SKEW_SECONDS=str(SKEW), KMSQ_REPLY_GRACE_SECONDS=str(GRACE), KMSQ_PRUNE_INTERVAL_SECONDS="1",
        KMSQ_PRUNE_BATCH="50", KMSQ_REPLY_QUEUE_TTL_SECONDS=str(REPLY_QUEUE_TTL),
    )  # fmt: skip
    worker = start_worker(POOL, 2, env, deployment.directory / "worker-sigma.log")
    identity = deployment.register("retained")
    client = KmsClient(deployment.broker_url, identity, fleet, timeout=60, namespace=NAMESPACE, ttl_seconds=TTL)
    try:
        yield Sigma(worker, fleet, client, KmsCodec(identity, fleet, reply_queue=f"nobody-{uuid.uuid4().hex[:8]}"))
    finally:
        client.close()
        worker.stop()


def _records(deployment: Deployment) -> dict[str, datetime]:
    with deployment.sessions() as db:
        rows = db.execute(
            select(RequestRecord.request_id, RequestRecord.expires_at).where(RequestRecord.caller == "retained")
        ).all()
    return {rid: expires for rid, expires in rows}


def test_pruning_under_load_loses_no_reply_within_retention(deployment: Deployment, sigma: Sigma) -> None:
    sent: dict[str, dict[str, object]] = {}  # request id -> its fields
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:
        while not stop.is_set():
            future = sigma.client.submit_generate_data_key(with_plaintext=False)
            try:
                sent[future.request_id] = sigma.client.wait(future)
            except Exception as e:  # recorded, asserted below
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    checked = 0
    try:
        deadline = time.monotonic() + 13  # two retention periods, with pruning every second
        while time.monotonic() < deadline:
            time.sleep(0.5)
            recent = list(sent)[-5:]
            for rid in recent:  # replies made within the last seconds: inside retention, get_result answers
                assert sigma.client.get_result(rid) == sent[rid]
                checked += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not failures, failures[:3]
    assert len(sent) > 100 and checked > 50
    now = datetime.now(UTC)
    kept = _records(deployment)
    cutoff = now - timedelta(seconds=SKEW + GRACE)
    overdue = [rid for rid, expires in kept.items() if expires < cutoff - timedelta(seconds=3)]
    assert not overdue, f"{len(overdue)} records past retention were not pruned"
    assert len(kept) < len(sent) * 0.75, "pruning did not keep up with the load"
    for rid in list(sent)[-20:]:  # the newest replies (within retention): all still stored
        assert rid in kept, "a record within retention was pruned"
    assert "pruned" in sigma.worker.log.read_text()


def test_a_reply_queue_nobody_reads_disappears_after_its_ttl(deployment: Deployment, sigma: Sigma) -> None:
    request, args = sigma.codec_for.build_request({"op": "generate_data_key_without_plaintext"}, POOL)
    rid = str(request.request_id)
    sigma.client.publish(task_name("generate_data_key_without_plaintext"), args, rid, POOL, request.reply_queue)
    key = namespace_key_prefix(NAMESPACE) + request.reply_queue
    broker = redis.Redis.from_url(deployment.broker_url)
    try:
        deadline = time.monotonic() + 30
        while broker.llen(key) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.llen(key) == 1, "the reply did not arrive on its queue"
        assert 0 < broker.pttl(key) <= REPLY_QUEUE_TTL * 1000
        time.sleep(REPLY_QUEUE_TTL + 0.5)
        assert not broker.exists(key), "the unread reply queue is still there"
        leftovers = [k for k in broker.scan_iter(match=namespace_key_prefix(NAMESPACE) + "*", count=1000)
                     if request.reply_queue.encode() in k]  # fmt: skip
        assert leftovers == [], "kmsq kept something of the expired reply queue in Redis"
    finally:
        broker.close()
    # The reply itself is still stored (within retention): get_result answers it.
    assert "encryptedKey" in sigma.client.get_result(rid)


def test_a_stopped_worker_leaves_no_remote_control_binding(deployment: Deployment, sigma: Sigma) -> None:
    worker = start_worker(POOL, 1, deployment.env(), deployment.directory / "worker-sigma-2.log")
    node = f"{POOL}.{worker.process.pid}@".encode()
    key = namespace_key_prefix(NAMESPACE) + "_kombu.binding.celery.pidbox"
    broker = redis.Redis.from_url(deployment.broker_url)
    try:
        assert any(node in member for member in broker.smembers(key)), "the running worker has no binding"
        assert worker.stop() == 0
        assert not any(node in member for member in broker.smembers(key)), "the stopped worker's binding stayed"
        assert any(f"{POOL}.{sigma.worker.process.pid}@".encode() in m for m in broker.smembers(key))  # others stay
    finally:
        broker.close()


def _reply_on(broker: redis.Redis, queue: str) -> dict[str, str]:
    """Waits for the next reply put on ``queue`` and returns its ReplyEnvelope (the kombu message's body)."""
    popped = broker.brpop([namespace_key_prefix(NAMESPACE) + queue], timeout=30)
    assert popped is not None, f"no reply on {queue}"
    message = json.loads(popped[1])
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    envelope: dict[str, str] = json.loads(body)
    return envelope


def test_a_lowered_expiry_does_not_make_a_worker_prune_a_record_and_run_its_request_twice(
    deployment: Deployment, sigma: Sigma
) -> None:
    """Issue 22, item 6, on real workers and Postgres: a database writer sets a record's expires_at in the
    past; the worker's pruner (every second) keeps it, because it trusts only the time the writing worker signed,
    and the same message delivered again gets the stored reply instead of running a second time."""
    codec = KmsCodec(sigma.codec_for.identity, sigma.fleet, reply_queue=f"twice-{uuid.uuid4().hex[:8]}", ttl_seconds=60)
    request, args = codec.build_request({"op": "generate_data_key_without_plaintext"}, POOL)
    rid = str(request.request_id)
    task = task_name("generate_data_key_without_plaintext")
    broker = redis.Redis.from_url(deployment.broker_url)
    try:
        sigma.client.publish(task, args, rid, POOL, request.reply_queue)
        first = _reply_on(broker, request.reply_queue)
        with transaction(deployment.sessions) as db:
            record = db.get(RequestRecord, ("retained", rid))
            assert record is not None and json.loads(record.reply) == first
            record.expires_at = datetime(2000, 1, 1, tzinfo=UTC)
        control = sigma.client.submit_generate_data_key(with_plaintext=False)  # expires normally: pruned in ~6 s
        sigma.client.wait(control)
        deadline = time.monotonic() + 30
        while control.request_id in _records(deployment) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert control.request_id not in _records(deployment), "the pruner did not run"
        assert rid in _records(deployment), "the worker pruned a record by its edited expires_at"
        sigma.client.publish(task, args, rid, POOL, request.reply_queue)  # the same message again
        assert _reply_on(broker, request.reply_queue) == first  # the stored reply: the request ran once
    finally:
        broker.close()
    with deployment.sessions() as db:
        record = db.get(RequestRecord, ("retained", rid))
        assert record is not None and json.loads(record.reply) == first
