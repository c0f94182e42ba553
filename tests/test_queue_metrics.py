"""``kmsq worker --metrics-port``: Prometheus metrics summed over the pool processes (multiprocess mode), the
queue gauges read from the broker, and ``/healthz``; with ``--events``, Celery task events carry no secret."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tasks import metrics
from tasks.client import KmsClient, KmsError
from tasks.identity import Fleet
from tests.conftest import random_pub
from tests.gateway_fixtures import free_port
from tests.queue_fixtures import NAMESPACE, Deployment, WorkerProcess, kmsq_command, start_worker
from worker.config import is_rabbitmq
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction

pytestmark = pytest.mark.brokers
POOL = "mu"


@dataclass
class Mu:
    url: str
    client: KmsClient
    worker: WorkerProcess
    root: str


@pytest.fixture(scope="module")
def mu(deployment: Deployment) -> Iterator[Mu]:
    root = deployment.service.create_root_key("aes-256", POOL).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, POOL)
    port = free_port()
    worker = start_worker(POOL, 2, deployment.env(), deployment.directory / "worker-mu.log",
                          extra=("--metrics-port", str(port), "--events"))  # fmt: skip
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": POOL})
    client = KmsClient(deployment.broker_url, deployment.register("metered"), fleet, timeout=60, namespace=NAMESPACE)
    try:
        yield Mu(f"http://127.0.0.1:{port}", client, worker, root)
    finally:
        client.close()
        worker.stop()


def samples(url: str) -> dict[str, float]:
    """The scrape as {'name{labels}': value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def sample(scrape: dict[str, float], name: str, **labels: str) -> float:
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    found = [
        v for key, v in scrape.items() if key.split("{")[0] == name and wanted <= set(re.findall(r'\w+="[^"]*"', key))
    ]
    return sum(found)


def test_metrics_add_up_over_the_pool_processes(mu: Mu) -> None:
    futures = [mu.client.submit_generate_data_key(mu.root, with_plaintext=False) for _ in range(40)]
    for future in futures:
        mu.client.wait(future)
    mu.client.generate_data_keys(7, root_key_id=mu.root, with_plaintext=False)
    with pytest.raises(KmsError):
        mu.client.get_key(random_pub(), "user", pool=POOL)
    scrape = samples(mu.url)
    assert (
        sample(scrape, "kmsq_requests_total", pool=POOL, op="generate_data_key_without_plaintext", outcome="ok") == 40
    )
    assert sample(scrape, "kmsq_requests_total", pool=POOL, op="get_key", outcome="not_found") == 1
    assert sample(scrape, "kmsq_request_service_seconds_count", pool=POOL) == 42
    assert sample(scrape, "kmsq_request_queue_wait_seconds_count", pool=POOL) == 42
    assert sample(scrape, "kmsq_batch_items_sum", pool=POOL, op="generate_data_keys") == 7
    # per lane and per caller: the batch came through the bulk lane, the single requests through the interactive one
    assert sample(scrape, "kmsq_requests_total", pool=POOL, op="generate_data_keys", lane="bulk") == 1
    assert sample(scrape, "kmsq_requests_total", pool=POOL, lane="interactive") == 41
    assert (
        sample(scrape, "kmsq_caller_requests_total", pool=POOL, caller="metered", lane="interactive", outcome="ok")
        == 40
    )
    assert sample(scrape, "kmsq_caller_requests_total", pool=POOL, caller="metered", outcome="not_found") == 1
    assert sample(scrape, "kmsq_caller_items_total", pool=POOL, caller="metered", lane="bulk") == 7
    assert sample(scrape, "kmsq_caller_items_total", pool=POOL, caller="metered", lane="interactive") == 41
    assert sample(scrape, "kmsq_queue_depth", pool=POOL, lane="bulk") == 0
    assert sample(scrape, "kmsq_queue_depth", pool=POOL) == 0
    assert sample(scrape, "kmsq_queue_oldest_message_age_seconds", pool=POOL) == 0
    assert "kmsq_queue_oldest_message_age_seconds" in " ".join(scrape)  # (present, not summed from nothing)
    assert "kmsq_retries_total" not in " ".join(scrape) or sample(scrape, "kmsq_retries_total", pool=POOL) == 0
    health = httpx.get(mu.url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "pool": POOL, "process": "ok", "hsm": "ok", "database": "ok"}
    assert httpx.get(mu.url + "/nothing", timeout=10).status_code == 404


def test_the_oldest_message_of_a_backed_up_queue(mu: Mu) -> None:
    """The pool processes are stopped: the main process takes what it prefetches (one per process), the rest
    waits, and the age gauge grows from when the requests were sent (on RabbitMQ, a bound from those taken)."""
    children = mu.worker.children()
    assert len(children) == 2
    for pid in children:
        os.kill(pid, signal.SIGSTOP)
    try:
        sent = time.time()
        futures = [mu.client.submit_generate_data_key(mu.root, with_plaintext=False) for _ in range(8)]
        time.sleep(1.5)
        scrape = samples(mu.url)
        waited = time.time() - sent
    finally:
        for pid in children:
            os.kill(pid, signal.SIGCONT)
    assert sample(scrape, "kmsq_queue_depth", pool=POOL) >= 4
    assert 1.4 <= sample(scrape, "kmsq_queue_oldest_message_age_seconds", pool=POOL) <= waited + 0.5
    for future in futures:
        assert mu.client.wait(future)["encryptedKey"]
    scrape = samples(mu.url)
    assert sample(scrape, "kmsq_queue_depth", pool=POOL) == 0
    assert sample(scrape, "kmsq_queue_oldest_message_age_seconds", pool=POOL) == 0


def test_the_oldest_message_of_a_queue_nobody_serves(deployment: Deployment, full_caller: object) -> None:
    """A pool without a running worker: the sampler sees its depth and how long its oldest request waits."""
    from tasks.identity import CallerIdentity

    assert isinstance(full_caller, CallerIdentity)
    document = deployment.service.fleet_document()
    document["pools"]["idle"] = dict(document["pools"]["beta"], root_keys=[])
    with KmsClient(deployment.broker_url, full_caller, Fleet.from_document(document), timeout=1,
                   namespace=NAMESPACE) as kms:  # fmt: skip
        for _ in range(3):
            kms.submit({"op": "get_key", "pub": random_pub(), "source": "user"}, "idle")
        time.sleep(1.2)
        depth, age = metrics.queue_sampler(deployment.broker_url, NAMESPACE, "kms.idle")()
    if is_rabbitmq(deployment.broker_url):  # nothing taken from it, never seen empty: unknown, not a guess
        assert depth == 3 and age is None
    else:
        assert depth == 3 and age is not None and 1.0 <= age < 60


@pytest.mark.brokers("redis")  # Celery's events: the broker changes nothing there (CI time)
def test_task_events_carry_no_secret(deployment: Deployment, mu: Mu) -> None:
    """What Flower shows comes from these events: argsrepr is the short header, never the body or a key."""
    from tasks.app import make_app

    app = make_app(deployment.broker_url, namespace=NAMESPACE)
    seen: list[dict[str, object]] = []
    prv = "xprv" + secrets.token_hex(40)
    deployment.secrets.append(prv.encode())
    requests: list[dict[str, str]] = []

    def send() -> None:
        time.sleep(1)  # after the receiver subscribed (Redis pub/sub keeps nothing for late subscribers)
        mu.client.put_key(random_pub(), prv, "btc", "user", "tss", mu.root)
        requests.append(mu.client.generate_data_key(mu.root))

    sender = threading.Thread(target=send)
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})
        with receiver.consumer_context() as (consuming, _, _):
            sender.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(e.get("type") == "task-succeeded" for e in seen) < 2:
                try:
                    consuming.drain_events(timeout=1)
                except TimeoutError:
                    continue
    sender.join(timeout=60)
    key = requests[0]
    deployment.secrets.append(key["plaintextKey"].encode())
    kinds = {e.get("type") for e in seen}
    assert {"task-received", "task-started", "task-succeeded"} <= kinds, kinds
    text = json.dumps(seen, default=str)
    for secret in (prv, key["plaintextKey"]):
        assert secret not in text
    received = [e for e in seen if e.get("type") == "task-received"]
    assert received and all(len(str(e.get("args"))) < 200 and "<body:" in str(e.get("args")) for e in received)


@pytest.mark.brokers("redis")
def test_flower_shows_the_tasks(deployment: Deployment, mu: Mu, tmp_path: Path) -> None:
    """`celery -A tasks.monitor:app flower` against the deployment: a request to the events-enabled pool shows
    up in Flower's task list, succeeded, with the short argsrepr only."""
    port = free_port()
    env = deployment.env(FLOWER_UNAUTHENTICATED_API="true")
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks.monitor:app", "flower", f"--port={port}",
             "--address=127.0.0.1", f"--db={tmp_path / 'flower.db'}"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        time.sleep(2)  # Flower subscribes to the events once it runs
        future = mu.client.submit_generate_data_key(mu.root)
        key = mu.client.wait(future)
        deployment.secrets.append(key["plaintextKey"].encode())
        task: dict[str, object] = {}
        while time.monotonic() < deadline + 30 and task.get("state") != "SUCCESS":
            tasks = httpx.get(url + "/api/tasks", timeout=5).json()
            task = tasks.get(str(future.request_id), {})
            time.sleep(0.3)
        assert task.get("state") == "SUCCESS", (task, log.read_text()[-2000:])
        assert task["name"] == "kmsq.generate_data_key" and "<body:" in str(task["args"])
        assert key["plaintextKey"] not in json.dumps(tasks)
    finally:
        flower.terminate()
        flower.wait(timeout=30)


def test_status_shows_workers_queues_root_keys_and_audit_heads(deployment: Deployment, mu: Mu) -> None:
    mu.client.generate_data_key(mu.root, with_plaintext=False)
    result = subprocess.run([*kmsq_command(), "status", "--json"], env=deployment.env(), capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    pools = {p["pool"]: p for p in report["pools"]}
    assert {"alpha", "beta", POOL} <= set(pools)
    assert len(pools[POOL]["workers"]) == 1 and pools[POOL]["workers"][0].startswith(f"{POOL}.")
    assert len(pools["alpha"]["workers"]) == 1 and pools[POOL]["queue_depth"] == 0
    assert pools[POOL]["bulk_queue_depth"] == 0  # the bulk lane's queue (mu's workers drained the batch there)
    assert [k["id"] for k in pools[POOL]["root_keys"]] == [mu.root]
    seq, _, digest = pools[POOL]["audit_head"].partition(":")
    assert int(seq) >= 1 and len(digest) == 64
    assert report["callers"]["total"] >= 2 and report["audit_head_global"]
    human = subprocess.run([*kmsq_command(), "status"], env=deployment.env(), capture_output=True, text=True,
                           timeout=120, check=False)  # fmt: skip
    assert human.returncode == 0 and POOL in human.stdout and "callers:" in human.stdout
