"""A flood of invalid messages on a pool's queue, through a real worker (issue 22, item 7c): messages whose
signature does not verify, and entries that are not kombu messages at all, are drained faster than valid
requests are served, and a valid request behind them is answered.

Timings belong in benchmarks: the figures (before and after the change, in the same runs) are in
docs/PERFORMANCE.md, and ``kmsq bench`` measures the shedding rate (S, against C). The bounds here are coarse
guards against what would make a flood expensive again (a database write or a signed reply per refused message),
as ratios to valid requests measured just before on the same worker, never absolute times: on this 2-core machine
the same run varies by 2-3x. What the change removed per refusal is
tested exactly, in process, in tests/test_rejection_cost.py.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from schemas.wire import namespace_key_prefix, pool_queue
from tasks.client import KmsClient
from tasks.futures import RequestFuture
from tasks.identity import Fleet
from tests.queue_fixtures import NAMESPACE, Deployment, WorkerProcess, start_worker
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction

GOOD = 200  # valid requests timed first: the baseline
BAD = 2_000  # invalid messages of each kind, pushed at once
# A message whose signature does not verify must cost less than half a served request (measured: 0.13-0.25 of
# one, 0.19-0.38 before the change), an entry that is not a kombu message less than a tenth (0.01-0.02: the
# transport drops it in the main process).
BAD_SIGNATURE_BOUND = BAD / GOOD / 2
JUNK_BOUND = BAD / GOOD / 10


@dataclass
class FloodPool:
    """A pool of its own, its worker and a client of a caller allowed generate_data_key."""

    name: str
    root_key: str
    worker: WorkerProcess
    client: KmsClient
    broker_url: str

    def queue_key(self) -> str:
        """The Redis list of the pool's queue (kombu's key, in this run's namespace)."""
        return namespace_key_prefix(NAMESPACE) + pool_queue(self.name)


@pytest.fixture(scope="module")
def flood_pool(deployment: Deployment) -> Iterator[FloodPool]:
    name = f"flood{uuid.uuid4().hex[:6]}"
    root_key = deployment.service.create_root_key("aes-256", name).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, name)
    identity = deployment.register(f"flooder{uuid.uuid4().hex[:6]}", ops=("generate_data_key",))
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": name})
    worker = start_worker(name, 2, deployment.env(), deployment.directory / f"worker-{name}.log")
    client = KmsClient(deployment.broker_url, identity, fleet, timeout=120, namespace=NAMESPACE)
    try:
        yield FloodPool(name, root_key, worker, client, deployment.broker_url)
    finally:
        client.close()
        worker.stop()


def staged(pool: FloodPool, count: int, *, forge: bool = True) -> list[bytes]:
    """``count`` task messages exactly as the client publishes them (kombu's JSON entries), their signature
    altered when ``forge``: captured from the client's own publish instead of being sent."""
    from tasks.app import broker_connection

    captured: list[bytes] = []
    client = pool.client
    amqp = client._app.amqp
    with broker_connection(pool.broker_url, NAMESPACE) as connection:
        producer = amqp.Producer(connection, auto_declare=False)
        channel = producer.channel

        def capture(queue: str, message: dict[str, Any], **_: Any) -> None:
            captured.append(json.dumps(message).encode())

        channel._put = capture
        for _ in range(count):
            request, args = client.build_request(
                {"op": "generate_data_key", "root_key_id": pool.root_key, "key_spec": "AES-256"}, pool.name
            )
            if forge:
                args[3] = ("B" if args[3][0] == "A" else "A") + args[3][1:]
            message = amqp.create_task_message(
                str(request.request_id), "kmsq.generate_data_key", args, {}, reply_to=request.reply_queue,
                ignore_result=True,
            )  # fmt: skip
            amqp.send_task_message(producer, "kmsq.generate_data_key", message, queue=pool_queue(pool.name))
    return captured


def junk(count: int) -> list[bytes]:
    """Entries that are not kombu messages (not JSON, JSON without kombu's fields)."""
    return [b"not json %d" % i if i % 2 else b'{"body": "%d"}' % i for i in range(count)]


def push(pool: FloodPool, entries: list[bytes]) -> None:
    """Puts every entry on the pool's queue at once (one pipeline), behind what is there."""
    import redis

    client = redis.Redis.from_url(pool.broker_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for start in range(0, len(entries), 1000):
                pipe.lpush(pool.queue_key(), *entries[start : start + 1000])
            pipe.execute()
    finally:
        client.close()


def one_valid(pool: FloodPool) -> float:
    """Seconds until a valid request sent now is answered."""
    began = time.perf_counter()
    pool.client.generate_data_key(pool.root_key)
    return time.perf_counter() - began


def good_requests(pool: FloodPool, count: int, in_flight: int = 8) -> float:
    """Seconds to serve ``count`` valid requests with ``in_flight`` outstanding."""
    began = time.perf_counter()
    pending: list[RequestFuture] = []
    for _ in range(count):
        pending.append(pool.client.submit_generate_data_key(pool.root_key))
        if len(pending) >= in_flight:
            pool.client.wait(pending.pop(0))
    for future in pending:
        pool.client.wait(future)
    return time.perf_counter() - began


def drained(pool: FloodPool, entries: list[bytes]) -> float:
    """Pushes ``entries`` and returns the seconds until a valid request sent right behind them is answered."""
    push(pool, entries)
    return one_valid(pool)


def warm(pool: FloodPool) -> None:
    good_requests(pool, 20)
    drained(pool, staged(pool, 50) + junk(50))


def test_a_flood_of_bad_signatures_is_drained_faster_than_valid_requests(flood_pool: FloodPool) -> None:
    warm(flood_pool)
    forged = staged(flood_pool, BAD)
    good = good_requests(flood_pool, GOOD)
    bad = drained(flood_pool, forged)
    ratio = bad / good
    print(f"\n{GOOD} valid requests: {good:.2f} s; {BAD} bad signatures + 1 valid: {bad:.2f} s; ratio {ratio:.2f}")
    assert ratio < BAD_SIGNATURE_BOUND, (good, bad, ratio)


def test_a_flood_of_junk_entries_is_drained_far_faster_than_valid_requests(flood_pool: FloodPool) -> None:
    warm(flood_pool)
    entries = junk(BAD)
    good = good_requests(flood_pool, GOOD)
    bad = drained(flood_pool, entries)
    ratio = bad / good
    print(f"\n{GOOD} valid requests: {good:.2f} s; {BAD} junk entries + 1 valid: {bad:.2f} s; ratio {ratio:.2f}")
    assert ratio < JUNK_BOUND, (good, bad, ratio)
