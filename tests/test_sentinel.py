"""Broker failover through Redis Sentinel: a primary, a replica and three sentinels on loopback ports (redis-server
in sentinel mode, what the redis-sentinel package runs), a worker and a client on
``sentinel://…?master_name=…``; the primary is killed (SIGKILL) under load. Every request gets exactly one
outcome, through the client sending lost messages again with the same request id; the time to recover is
measured."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from tasks.client import KmsClient
from tasks.identity import Fleet
from tests.conftest import missing_service
from tests.gateway_fixtures import free_port
from tests.queue_fixtures import NAMESPACE, Deployment, start_worker
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction
from worker.storage.models import RequestRecord

pytestmark = pytest.mark.queue
MASTER = "kmsqtest"
POOL = "xi"
REQUESTS = 200


@dataclass
class Sentinels:
    primary: subprocess.Popen[bytes]
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    processes: list[subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports) + f"?master_name={MASTER}"

    def master_port(self) -> int | None:
        try:
            host_port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(MASTER)
        except redis.RedisError:
            return None
        return int(host_port[1]) if isinstance(host_port, tuple) else None


def _server(directory: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    log = (directory / "redis.log").open("wb")
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(directory), *extra],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def _wait(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


def _other_sentinels(port: int) -> int:
    master = redis.Redis(port=port).sentinel_master(MASTER)
    return int(master.get("num-other-sentinels", 0)) if isinstance(master, dict) else 0


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Sentinels]:
    try:
        subprocess.run(["redis-server", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        missing_service("redis-server")
    primary_port, replica_port = free_port(), free_port()
    primary = _server(tmp_path / "primary", primary_port)
    processes = [primary, _server(tmp_path / "replica", replica_port, "--replicaof", "127.0.0.1", str(primary_port))]
    ports = [free_port() for _ in range(3)]
    for i, port in enumerate(ports):
        conf = tmp_path / f"sentinel-{i}" / "sentinel.conf"
        conf.parent.mkdir()
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\nsentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        log = (conf.parent / "sentinel.log").open("wb")
        processes.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=log,
                                          stderr=subprocess.STDOUT))  # fmt: skip
    group = Sentinels(primary, primary_port, replica_port, ports, processes)
    try:
        replica = redis.Redis(port=replica_port)
        _wait(lambda: replica.info("replication").get("master_link_status") == "up", "the replica syncs")
        _wait(lambda: group.master_port() == primary_port, "the sentinels agree on the primary")
        _wait(lambda: _other_sentinels(ports[0]) >= 2, "the sentinels find each other")
        yield group
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def test_a_primary_killed_under_load_loses_no_request(deployment: Deployment, sentinels: Sentinels) -> None:
    root = deployment.service.create_root_key("aes-256", POOL).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, POOL)
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": POOL})
    env = deployment.env(KMSQ_BROKER_URL=sentinels.url)
    worker = start_worker(POOL, 2, env, deployment.directory / "worker-xi.log")
    identity = deployment.register("failover")
    killed_at: list[float] = []
    try:
        with KmsClient(sentinels.url, identity, fleet, timeout=180, resend_after=5, namespace=NAMESPACE) as kms:

            def one(i: int) -> tuple[str, float]:
                time.sleep(i * 0.03)  # spread over about 6 s: the kill lands in the middle
                future = kms.submit_generate_data_key(root, with_plaintext=False)
                kms.wait(future)
                return str(future.request_id), time.monotonic()

            def kill() -> None:
                time.sleep(2.5)
                sentinels.primary.kill()
                killed_at.append(time.monotonic())

            killer = threading.Thread(target=kill)
            killer.start()
            with ThreadPoolExecutor(max_workers=32) as pool:
                done = list(pool.map(one, range(REQUESTS)))
            killer.join()
            _wait(lambda: sentinels.master_port() == sentinels.replica_port, "the replica is promoted", 60)
            probe_started = time.monotonic()
            kms.generate_data_key(root, with_plaintext=False)  # a fresh request after the failover
            probe = time.monotonic() - probe_started
    finally:
        worker.stop()
    ids = [rid for rid, _ in done]
    assert len(set(ids)) == REQUESTS
    with deployment.sessions() as db:
        recorded = db.scalar(select(func.count()).select_from(RequestRecord).where(RequestRecord.request_id.in_(ids)))
        ok = db.scalar(select(func.count()).select_from(RequestRecord).where(
            RequestRecord.request_id.in_(ids), RequestRecord.status == "ok"))  # fmt: skip
    assert recorded == ok == REQUESTS  # one outcome each (the table's key), all of them ok
    after = sorted(t - killed_at[0] for _, t in done if t > killed_at[0])
    recovery = after[0] if after else probe
    print(f"failover: {len(after)} of {REQUESTS} answered after the kill; first answer {recovery:.1f} s after "
          f"the kill; a fresh request took {probe:.2f} s after the promotion")  # fmt: skip
    assert after, "no request was still in flight at the kill"
