"""Sharing a pool through real workers (docs/OPERATIONS.md, "Sharing a pool"): interactive requests overtake a
queue of bulk batches, a bulk-lane caller stays in its lane, a caller over its quota is refused with the wait and
nothing of the refused request is done, its later requests pass, the quota holds across two workers, and the
gateway answers 429 with Retry-After."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import select

from tasks.client import KmsClient, KmsError
from tasks.identity import CallerIdentity, Fleet
from tests.conftest import random_pub
from tests.gateway_fixtures import GATEWAY_OPS, start_gateway
from tests.queue_fixtures import NAMESPACE, Deployment, WorkerProcess, start_worker
from worker import callers
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction
from worker.storage.models import PrivateKey, RequestRecord

pytestmark = pytest.mark.brokers


@dataclass
class Pool:
    """A pool of the test's own: its root key and a fleet file with it as the default pool."""

    name: str
    root: str
    fleet: Fleet


def make_pool(deployment: Deployment, name: str) -> Pool:
    root = deployment.service.create_root_key("aes-256", name).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, name)
    return Pool(name, root, Fleet.from_document(deployment.service.fleet_document() | {"default_pool": name}))


def set_limits(deployment: Deployment, name: str, lane: str = "auto", requests: float | None = None,
               items: float | None = None) -> None:  # fmt: skip
    with transaction(deployment.sessions) as db:
        callers.set_caller_limits(deployment.service.hsm, db, name, lane, requests, items)


def client(deployment: Deployment, identity: CallerIdentity, pool: Pool, **options: object) -> KmsClient:
    return KmsClient(deployment.broker_url, identity, pool.fleet, timeout=60, namespace=NAMESPACE, **options)  # type: ignore[arg-type]


def served(worker: WorkerProcess) -> list[str]:
    """The operations of the requests a worker answered (its log's line per reply)."""
    return re.findall(r"kmsq\.(\w+) [0-9a-f-]{36} -> ", worker.log.read_text())


@pytest.fixture(scope="module")
def caller(deployment: Deployment) -> CallerIdentity:
    return deployment.register(f"lanes-{secrets.token_hex(3)}")


@pytest.mark.brokers("redis")
def test_a_worker_of_both_lanes_takes_interactive_work_first(deployment: Deployment, caller: CallerIdentity) -> None:
    """One pool process, six batches of 1,000 data keys queued in the bulk lane, then four single requests: all
    four are answered after the batch being served and at most one more, not in turns with the batches."""
    pool = make_pool(deployment, "lanes-all")
    worker = start_worker(pool.name, 1, deployment.env(), deployment.directory / "worker-lanes-all.log")
    try:
        with client(deployment, caller, pool) as kms:
            kms.generate_data_key(pool.root, with_plaintext=False)  # the process's session and rows are open
            batches = [kms.submit_generate_data_keys(1000, pool.root, with_plaintext=False) for _ in range(6)]
            time.sleep(0.1)  # the first batch is being served
            singles = [kms.submit_generate_data_key(pool.root, with_plaintext=False) for _ in range(4)]
            for future in [*singles, *batches]:
                kms.wait(future)
        # Each reply's issued_at is the worker's clock when it answered. Taken in turns (kombu's round robin), the
        # last single request would come after three more batches.
        answered = max(single.reply.issued_at for single in singles)  # type: ignore[union-attr]
        later = [b for b in batches if b.reply.issued_at > answered]  # type: ignore[union-attr]
        assert len(later) >= 4, [b.reply.issued_at for b in batches]  # type: ignore[union-attr]
    finally:
        worker.stop()


def test_workers_of_one_lane_each_serve_interactive_requests_beside_a_bulk_queue(
    deployment: Deployment, caller: CallerIdentity
) -> None:
    """A worker per lane (on RabbitMQ too, whose consumers have no queue order): the single request's reply comes
    while most of the bulk batches still wait."""
    pool = make_pool(deployment, "lanes-two")
    env = deployment.env()
    workers: list[WorkerProcess] = []
    try:
        for lane in ("interactive", "bulk"):
            log = deployment.directory / f"worker-{pool.name}-{lane}.log"
            workers.append(start_worker(pool.name, 1, env, log, extra=("--lane", lane, "--nice", "5")))
        with client(deployment, caller, pool) as kms:
            kms.generate_data_key(pool.root, with_plaintext=False)
            kms.generate_data_keys(2, pool.root, with_plaintext=False)
            batches = [kms.submit_generate_data_keys(1000, pool.root, with_plaintext=False) for _ in range(6)]
            time.sleep(0.1)
            single = kms.submit_generate_data_key(pool.root, with_plaintext=False)
            kms.wait(single)
            assert sum(1 for b in batches if b.done()) <= 2
            for batch in batches:
                assert len(kms.wait(batch)["items"]) == 1000
        interactive, bulk = (served(worker) for worker in workers)
        assert set(interactive) == {"generate_data_key_without_plaintext"} and set(bulk) == {"generate_data_keys"}
    finally:
        for worker in workers:
            worker.stop()


def test_a_bulk_lane_caller_is_refused_on_the_interactive_lane(deployment: Deployment) -> None:
    name = f"bulk-{secrets.token_hex(3)}"
    identity = deployment.register(name)
    set_limits(deployment, name, lane="bulk")
    pool = Pool("alpha", deployment.roots[("alpha", "aes-256")], deployment.fleet)
    with client(deployment, identity, pool) as kms:
        with pytest.raises(KmsError) as refused:
            kms.put_key(random_pub(), "xprv-" + secrets.token_hex(8), "btc", "user", "independent")
        assert refused.value.code == "forbidden" and "bulk lane (kms.alpha.bulk)" in refused.value.message
    with client(deployment, identity, pool, lane="bulk") as kms:
        prv = "xprv-" + secrets.token_hex(8)
        deployment.secrets.append(prv.encode())
        pub = random_pub()
        kms.put_key(pub, prv, "btc", "user", "independent")
        assert kms.get_key(pub, "user")["prv"] == prv


def test_a_caller_over_its_quota_is_refused_with_the_wait_and_nothing_is_done(deployment: Deployment) -> None:
    """A caller allowed one request every two seconds (a bucket of one) sends six put_keys at once: one passes
    (two if the six took long enough for a refill), the rest are refused with the wait, no record and no key."""
    name = f"metered-{secrets.token_hex(3)}"
    identity = deployment.register(name)
    set_limits(deployment, name, requests=0.5)
    pool = Pool("alpha", deployment.roots[("alpha", "aes-256")], deployment.fleet)
    with client(deployment, identity, pool) as kms:
        started = time.monotonic()
        sent = []
        for _ in range(6):
            pub, prv = random_pub(), "xprv-" + secrets.token_hex(16)
            deployment.secrets.append(prv.encode())
            sent.append((pub, prv, kms.submit_put_key(pub, prv, "btc", "user", "independent")))
        outcomes: list[KmsError | None] = []
        local: KmsError | None = None
        for _, _, future in sent:
            try:
                kms.wait(future)
                outcomes.append(None)
            except KmsError as e:
                outcomes.append(e)
                if local is None:  # within the wait the client does not send: it answers rate_limited itself
                    with pytest.raises(KmsError) as raised:
                        kms.get_key(random_pub(), "user")
                    local = raised.value
        elapsed = time.monotonic() - started
        assert local is not None and local.code == "rate_limited" and "not sent" in local.message
        refused = [(pub, prv, f, e) for (pub, prv, f), e in zip(sent, outcomes, strict=True) if e is not None]
        assert 1 <= 6 - len(refused) <= 1 + 0.5 * elapsed, (outcomes, elapsed)
        for _, _, _, error in refused:
            assert error.code == "rate_limited" and error.retry_after is not None and 0 < error.retry_after <= 2.0
            assert "requests per second quota" in error.message
        with deployment.sessions() as db:
            for pub, _, future, _ in refused:  # no record, no key
                assert db.get(RequestRecord, (name, future.request_id)) is None
                assert db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).first() is None
        time.sleep(3.5)  # more than a refill and the client's careful second
        pub, prv, _, _ = refused[0]
        kms.put_key(pub, prv, "btc", "user", "independent")  # the same key, later: passes
        time.sleep(2.1)
        assert kms.get_key(pub, "user")["prv"] == prv


def test_a_quota_holds_across_two_workers(deployment: Deployment) -> None:
    """Sixty requests of a caller allowed ten a second, taken by two workers at once: at most a bucket and what
    it refilled while they ran pass (with a bucket per worker twice as many would)."""
    name = f"shared-{secrets.token_hex(3)}"
    identity = deployment.register(name)
    set_limits(deployment, name, requests=10)
    pool = make_pool(deployment, "quota-two")
    env = deployment.env()
    workers = [start_worker(pool.name, 1, env, deployment.directory / f"worker-{pool.name}-{i}.log") for i in (1, 2)]
    try:
        with client(deployment, identity, pool) as kms:
            started = time.monotonic()
            futures = [kms.submit_generate_data_key(pool.root, with_plaintext=False) for _ in range(60)]
            passed = 0
            for future in futures:
                try:
                    kms.wait(future)
                    passed += 1
                except KmsError as e:
                    assert e.code == "rate_limited"
            elapsed = time.monotonic() - started
        assert 10 <= passed <= 10 + 10 * elapsed + 1, (passed, elapsed)
        assert all(served(worker) for worker in workers)  # both took part
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture(scope="module")
def metered_gateway(deployment: Deployment) -> Iterator[str]:
    name = f"gw-metered-{secrets.token_hex(3)}"
    deployment.register(name, GATEWAY_OPS)
    set_limits(deployment, name, requests=2)
    running = start_gateway(deployment, name, deployment.service.fleet_document(), "--timeout", "30")
    yield running.url
    running.stop()


@pytest.mark.brokers("redis")
def test_the_gateway_answers_429_with_retry_after(metered_gateway: str) -> None:
    with httpx.Client(base_url=metered_gateway, timeout=60) as http:
        answers = [http.post("/generateDataKey", json={"keyType": "AES-256"}) for _ in range(4)]
        assert [a.status_code for a in answers[:2]] == [200, 200]
        limited = answers[2]
        assert limited.status_code == 429 and limited.json() == {"message": "rate limited: retry later"}
        wait = int(limited.headers["Retry-After"])
        assert wait == 1
        time.sleep(wait)
        assert http.post("/generateDataKey", json={"keyType": "AES-256"}).status_code == 200
