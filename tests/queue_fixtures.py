"""Fixtures for the queue path on real components: Redis (a test database number, shared with whatever else
uses it: this run works in a namespace of its own and deletes only its own keys), a fresh Postgres database,
the test run's SoftHSM2 token, and real ``kmsq worker`` processes started here.

Two pools share the token and the database (as two HSM pools would share Postgres): ``alpha`` (two worker
processes) and ``beta`` (one), each with an aes-256 and an rsa-2048 root key and its own fleet keys.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from kmsq.procfs import children_of
from schemas.operations import ALLOWABLE_OPS
from schemas.signing_rules import SigningRules
from schemas.wire import namespace_key_prefix
from tasks.client import KmsClient
from tasks.identity import CallerIdentity, Fleet
from tests.conftest import fresh_database, install_test_operator, missing_service
from worker import callers
from worker.config import Settings
from worker.fleet import ensure_fleet_key
from worker.hsm import Hsm
from worker.runtime import KeyService
from worker.signing_rule_rows import set_rules
from worker.storage.db import create_db_engine, migrate, session_factory, transaction

REDIS_URL = os.environ.get("KMSQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
# RabbitMQ's root URL (no vhost): each run, and each test that needs one, makes a vhost of its own and deletes it.
RABBITMQ_URL = os.environ.get("KMSQ_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
BROKERS = ("redis", "rabbitmq")
# This run's namespace: every Redis key of its workers and clients starts with "<NAMESPACE>:", so test runs
# (and anything else) sharing the Redis database never take each other's messages.
NAMESPACE = f"test-{uuid.uuid4().hex[:12]}"
POOLS = {"alpha": 2, "beta": 1}


def delete_namespace(url: str, namespace: str) -> int:
    """Deletes the Redis keys of ``namespace`` (and nothing else); returns how many there were."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=namespace_key_prefix(namespace) + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The test Redis database; this run's keys (its namespace) are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        missing_service("Redis at " + REDIS_URL)
    finally:
        client.close()
    yield REDIS_URL
    delete_namespace(REDIS_URL, NAMESPACE)


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120, check=False)


@contextmanager
def rabbitmq_vhost(name: str) -> Iterator[str]:
    """Makes the RabbitMQ vhost ``name`` (guest may use it), yields the broker's URL, and deletes the vhost with
    everything in it afterwards. Skips locally, fails on CI, when RabbitMQ or rabbitmqctl is missing."""
    from kombu.connection import Connection

    probe = Connection(RABBITMQ_URL, connect_timeout=3)
    try:
        probe.ensure_connection(max_retries=1)
    except Exception:
        missing_service("RabbitMQ at " + RABBITMQ_URL)
    finally:
        probe.release()
    made = _rabbitmqctl("add_vhost", name)
    if made.returncode != 0:
        missing_service(f"rabbitmqctl (add_vhost: {(made.stderr or made.stdout).strip()[-200:]})")
    try:
        allowed = _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        assert allowed.returncode == 0, allowed.stderr
        yield RABBITMQ_URL
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """RabbitMQ in this run's vhost (the run's namespace, :data:`NAMESPACE`), deleted afterwards."""
    with rabbitmq_vhost(NAMESPACE) as url:
        yield url


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``brokers`` run once per broker of :data:`BROKERS` (``brokers("rabbitmq")``: on those named);
    others on Redis."""
    if "broker" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("brokers")
        brokers = (tuple(marker.args) or BROKERS) if marker else BROKERS[:1]
        metafunc.parametrize("broker", brokers, indirect=True, scope="session")


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> str:
    """The broker a queue test runs on: ``redis`` or ``rabbitmq``."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture(scope="session")
def broker_url(broker: str, request: pytest.FixtureRequest) -> str:
    """The URL of :func:`broker` (for this run's namespace)."""
    return str(request.getfixturevalue("rabbitmq_url" if broker == "rabbitmq" else "redis_url"))


@pytest.fixture(scope="session")
def queue_db_url() -> Iterator[str]:
    """A fresh Postgres database for the queue tests, dropped afterwards."""
    with fresh_database("kmsq_queue") as url:
        yield url


def subprocess_env(settings: Settings, database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    """The environment of a ``kmsq`` subprocess on the test token, database and broker."""
    install_test_operator(settings.home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))}
    env.update(
        {
            "KMSQ_HOME": str(settings.home),
            "KMSQ_DATABASE_URL": database_url,
            "KMSQ_BROKER_URL": broker_url,
            "KMSQ_DEFAULT_POOL": "alpha",
            "KMSQ_CACHE_SECONDS": "1",
            "KMSQ_NAMESPACE": NAMESPACE,
            **extra,
        }
    )
    return env


def kmsq_command() -> list[str]:
    """argv prefix running this checkout's ``kmsq`` with the test interpreter."""
    return [sys.executable, "-m", "kmsq"]


@dataclass
class WorkerProcess:
    """A ``kmsq worker`` started by a test."""

    pool: str
    process: subprocess.Popen[bytes]
    log: Path

    def children(self) -> list[int]:
        """The pids of the worker's pool processes (prefork children)."""
        return children_of(self.process.pid)

    def stop(self) -> int:
        """Warm shutdown; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_worker(
    pool: str, concurrency: int, env: dict[str, str], log: Path, timeout: float = 60, extra: tuple[str, ...] = ()
) -> WorkerProcess:
    """Starts ``kmsq worker --pool`` (with ``extra`` options) and waits until Celery reports it ready."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [*kmsq_command(), "worker", "--pool", pool, "--concurrency", str(concurrency), *extra],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    worker = WorkerProcess(pool, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"worker {pool} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        content = log.read_text(errors="replace")
        if " ready." in content and content.count("serves pool") >= concurrency:
            return worker
        time.sleep(0.1)
    worker.stop()
    raise AssertionError(f"worker {pool} not ready in {timeout} s:\n{log.read_text()[-3000:]}")


@dataclass
class Deployment:
    """Everything the queue tests share."""

    settings: Settings
    service: KeyService
    database_url: str
    broker_url: str
    roots: dict[tuple[str, str], str]  # (pool, type) -> root key id
    fleet: Fleet
    workers: dict[str, WorkerProcess]
    directory: Path
    caller_log: Path
    secrets: list[bytes] = field(default_factory=list)  # every plaintext secret the tests handled

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Sessions on the queue database."""
        return self.service.sessions

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for ``kmsq`` subprocesses."""
        return subprocess_env(self.settings, self.database_url, self.broker_url, **extra)

    def register(
        self,
        name: str,
        ops: tuple[str, ...] = ALLOWABLE_OPS,
        root_keys: list[str] | None = None,
        plaintext: bool = True,
    ) -> CallerIdentity:
        """Creates a caller identity and registers it (as an operator would)."""
        identity = CallerIdentity.generate(name)
        identity.write(self.directory / "callers")
        public = callers.read_public_identity(self.directory / "callers" / f"{name}.pub.json")
        with transaction(self.sessions) as db:
            callers.add_caller(self.service.hsm, db, name, public, list(ops), root_keys, plaintext)
        return identity

    def client(self, identity: CallerIdentity, **kwargs: object) -> KmsClient:
        """A client for ``identity`` on the test broker."""
        options: dict[str, object] = {"timeout": 60, "namespace": NAMESPACE, **kwargs}
        return KmsClient(self.broker_url, identity, self.fleet, **options)  # type: ignore[arg-type]

    def count(self, table: str) -> int:
        """Rows in a table of the queue database."""
        from sqlalchemy import table as sa_table

        with self.sessions() as db:
            return int(db.scalar(select(func.count()).select_from(sa_table(table))) or 0)


@pytest.fixture(scope="session")
def deployment(
    hsm_settings: Settings,
    hsm: Hsm,
    broker: str,
    broker_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Deployment]:
    """Root keys and fleet keys in two pools, and running workers for both, on :func:`broker` (each broker's
    deployment with a database of its own)."""
    if broker == "redis":
        yield from _deployment(hsm_settings, hsm, broker_url, request.getfixturevalue("queue_db_url"),
                               tmp_path_factory)  # fmt: skip
        return
    with fresh_database("kmsq_queue_rmq") as url:
        yield from _deployment(hsm_settings, hsm, broker_url, url, tmp_path_factory)


def _deployment(hsm_settings: Settings, hsm: Hsm, broker_url: str, queue_db_url: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:  # fmt: skip
    directory = tmp_path_factory.mktemp("queue")
    engine: Engine = create_db_engine(queue_db_url)
    migrate(engine)
    service = KeyService(hsm, session_factory(engine), default_pool="alpha")
    roots = {}
    for pool in POOLS:
        for key_type in ("aes-256", "rsa-2048"):
            roots[(pool, key_type)] = service.create_root_key(key_type, pool).id
        with transaction(service.sessions) as db:
            ensure_fleet_key(hsm, db, pool)
    with transaction(service.sessions) as db:  # as kmsq init does for one developer; tests set key rules on top
        set_rules(hsm, db, "default", SigningRules(none=True))
    fleet = Fleet.from_document(service.fleet_document())
    env = subprocess_env(hsm_settings, queue_db_url, broker_url)
    caller_log = directory / "caller.log"
    handler = logging.FileHandler(caller_log)
    logger = logging.getLogger("kmsq")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    workers: dict[str, WorkerProcess] = {}
    try:
        for pool, concurrency in POOLS.items():
            workers[pool] = start_worker(pool, concurrency, env, directory / f"worker-{pool}.log")
        yield Deployment(hsm_settings, service, queue_db_url, broker_url, roots, fleet, workers, directory, caller_log)
    finally:
        for worker in workers.values():
            worker.stop()
        logger.removeHandler(handler)
        handler.close()
        engine.dispose()


@pytest.fixture(scope="session")
def full_caller(deployment: Deployment) -> CallerIdentity:
    """A caller allowed every operation on every root key, with plaintext."""
    return deployment.register("full")


@pytest.fixture(scope="session")
def client(deployment: Deployment, full_caller: CallerIdentity) -> Iterator[KmsClient]:
    """A client of :func:`full_caller`."""
    with deployment.client(full_caller) as kms:
        yield kms
