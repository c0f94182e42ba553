"""A Postgres primary lost right after it answered (issue 24): with a synchronous standby no acknowledged commit is
gone after the promotion; with an asynchronous one some are (the reason the setting matters). Each test builds
its own primary and standby on this machine (kmsq.chaos.environment.Postgres: initdb, pg_basebackup, promote),
never touching the shared cluster. And the mode is named by kmsq status and a worker at start, which refuses
an unsafe one when KMSQ_REQUIRE_SYNC_STANDBY=1."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from kmsq.chaos.environment import Postgres
from tests.conftest import run_kmsq
from tests.queue_fixtures import delete_namespace, start_worker
from worker.storage.db import create_db_engine
from worker.storage.standby import replication_of

pytestmark = [pytest.mark.db]


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Postgres]:
    postgres = Postgres(tmp_path / "postgres", standby=request.param)
    try:
        postgres.create()
        yield postgres
    finally:
        postgres.stop_all()
        import shutil

        shutil.rmtree(postgres.home, ignore_errors=True)


def _writers(url: str, acked: list[int], stop: threading.Event, count: int = 4) -> list[threading.Thread]:
    """Threads inserting one row per transaction through ``url`` until ``stop``; a row is put in ``acked``
    only once its COMMIT returned. A failed attempt (the primary is gone) is tried again with a new row."""
    engine = create_db_engine(url)
    lock = threading.Lock()
    numbers = iter(range(1, 10**9))

    def write() -> None:
        while not stop.is_set():
            with lock:
                n = next(numbers)
            try:
                with engine.begin() as conn:
                    conn.execute(text("INSERT INTO acked (n) VALUES (:n)"), {"n": n})
            except Exception:  # the primary is down or read-only: a new connection next time
                time.sleep(0.1)
                continue
            with lock:
                acked.append(n)

    return [threading.Thread(target=write, daemon=True) for _ in range(count)]


@pytest.mark.parametrize("cluster", ["sync", "async"], indirect=True)
def test_a_failover_loses_an_acknowledged_commit_only_with_an_asynchronous_standby(cluster: Postgres) -> None:
    engine = create_db_engine(cluster.url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE acked (n bigint PRIMARY KEY)"))
    assert replication_of(engine).mode == cluster.standby
    engine.dispose()
    acked: list[int] = []
    stop = threading.Event()
    threads = _writers(cluster.url, acked, stop)
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    before = len(acked)
    took = cluster.fail_over()
    time.sleep(2)  # the writers go on through the promoted node (the same URL)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    engine = create_db_engine(cluster.url)
    with engine.connect() as conn:
        port = conn.execute(text("SELECT inet_server_port()")).scalar()
        stored = set(conn.execute(text("SELECT n FROM acked")).scalars())
    after = replication_of(engine)
    engine.dispose()
    lost = [n for n in acked if n not in stored]
    assert port == cluster.ports[1] and took < 60, (port, took)
    assert before > 50 and len(acked) > before + 20, (before, len(acked))  # writes before and after the failover
    assert after.mode == cluster.standby, after  # the old primary's node is the new standby
    if cluster.standby == "sync":
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged commits lost"
    else:
        assert lost, f"none of {len(acked)} acknowledged commits lost: the fault did not catch the standby behind"


@pytest.mark.parametrize("cluster", ["async"], indirect=True)
def test_status_and_worker_name_the_mode_and_a_worker_can_require_a_synchronous_standby(
    cluster: Postgres, tmp_path: Path, redis_url: str
) -> None:
    home, namespace = tmp_path / "home", f"standby-{uuid.uuid4().hex[:10]}"
    env = {"KMSQ_DATABASE_URL": cluster.url, "KMSQ_BROKER_URL": redis_url, "KMSQ_NAMESPACE": namespace}
    try:
        assert run_kmsq(home, "init", env=env).returncode == 0
        status = json.loads(run_kmsq(home, "status", "--json", env=env).stdout)["database_replication"]
        assert status["mode"] == "async" and status["standbys"] == ["node1:async"], status
        assert "database replication: async" in run_kmsq(home, "status", env=env).stdout

        refused = run_kmsq(home, "worker", env=env | {"KMSQ_REQUIRE_SYNC_STANDBY": "1"})
        assert refused.returncode == 3 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr[-2000:]
        assert "KMSQ_REQUIRE_SYNC_STANDBY is set and the database is not replicated synchronously (mode async)" in (
            refused.stderr
        )

        with psycopg.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:  # fmt: skip
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 20
        while json.loads(run_kmsq(home, "status", "--json", env=env).stdout)["database_replication"]["mode"] != "sync":
            assert time.monotonic() < deadline, "the primary never reported its standby as synchronous"
            time.sleep(0.5)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))}
        worker = start_worker("default", 1, full_env | env | {"KMSQ_HOME": str(home), "KMSQ_REQUIRE_SYNC_STANDBY": "1"},
                              tmp_path / "worker.log")  # fmt: skip
        assert worker.stop() == 0
        assert "database replication: sync (node1:sync)" in (tmp_path / "worker.log").read_text()
    finally:
        delete_namespace(redis_url, namespace)


def test_a_primary_without_a_standby_says_none(postgres_url: str) -> None:
    engine = create_db_engine(postgres_url)
    try:
        found = replication_of(engine)
    finally:
        engine.dispose()
    assert found.mode == "none" and found.standbys == ()
    assert found.line().startswith("database replication: none: no standby")
