"""``kmsq worker``: a Celery worker process group serving one pool's queue."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from kmsq.commands.common import settings
from kmsq.output import one_line_errors
from schemas.wire import LANES, lane_of_queue

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.storage.standby import DatabaseReplication

HEALTH_CACHE_SECONDS = 2.0


@click.command()
@click.option("--pool", default=None, help="HSM pool to serve (default: the configured default pool).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--loglevel", default="info", show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics (/metrics) and /healthz on this port.")  # fmt: skip
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
@click.option("--events", is_flag=True, help="Send Celery task events (for Flower); they carry no secret.")
@click.option(
    "--lane",
    type=click.Choice(["all", *LANES]),
    default="all",
    show_default=True,
    help="The lanes to serve: all (interactive first) or one (docs/OPERATIONS.md, Sharing a pool).",
)
@click.option("--nice", type=click.IntRange(0, 19), default=0, show_default=True,
              help="Lower its CPU priority by this much (a bulk worker beside interactive ones).")  # fmt: skip
@one_line_errors
def worker(
    pool: str | None, concurrency: int, loglevel: str, metrics_port: int | None, metrics_host: str, events: bool,
    lane: str, nice: int,
) -> None:  # fmt: skip
    """Run a worker that consumes only the pool's queues: kms.<pool> (interactive) and kms.<pool>.bulk."""
    if nice:
        os.nice(nice)  # before the pool processes fork: they inherit it
    run_worker(pool, concurrency, loglevel, metrics_port, metrics_host, events,
               lanes=LANES if lane == "all" else (lane,))  # fmt: skip


def run_worker(
    pool: str | None,
    concurrency: int,
    loglevel: str,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    events: bool = False,
    extend: Callable[[Any], None] | None = None,
    lanes: tuple[str, ...] = LANES,
) -> None:
    """Runs a worker of ``pool`` (default: the configured default pool) and its ``lanes`` until it is stopped.
    ``extend`` is given
    the :class:`tasks.worker.PoolWorker` before it starts (kmsq bench's baseline adds its no-op task there, in
    its own entry point: ``kmsq worker`` has none). Raises ConfigError when the pool has no fleet key."""
    from sqlalchemy import select

    from worker.errors import ConfigError
    from worker.storage.db import create_db_engine, session_factory, transaction
    from worker.storage.models import FleetKey

    config = settings()
    pool = pool or config.default_pool
    # Checked in this (parent) process without touching the HSM: children open their own sessions.
    engine = create_db_engine(config.database_url)
    try:
        with transaction(session_factory(engine)) as db:
            has_fleet_key = db.scalars(select(FleetKey.pool).where(FleetKey.pool == pool)).first() is not None
    finally:
        engine.dispose()
    if not has_fleet_key:
        raise ConfigError(f"pool {pool!r} has no fleet key (run: kmsq fleet-key create --pool {pool})")
    database = _database_replication(config)
    _preflight(config, pool)
    click.echo(database.line(), err=True)  # once it can serve: a refusal stays one line
    if config.embedded_broker:
        from kmsq import broker

        broker.start(config.home)
    if metrics_port is not None:
        from tasks import metrics

        metrics.prepare(config.home / "metrics" / f"{pool}-{os.getpid()}")  # before prometheus_client loads
    from tasks.worker import PoolWorker

    pool_worker = PoolWorker(config, pool, lanes)
    nodename = pool_worker.nodename = f"{pool}.{os.getpid()}@{socket.gethostname()}"
    if extend is not None:
        extend(pool_worker)

    if metrics_port is not None:
        from tasks import metrics

        samplers = {lane_of_queue(queue): metrics.queue_sampler(config.effective_broker_url, config.namespace, queue)
                    for queue in pool_worker.queues}  # fmt: skip
        metrics.serve(metrics_host, metrics_port, pool, _health(config), samplers)

    argv = [
        "worker",
        "--queues", ",".join(pool_worker.queues),
        "--concurrency", str(concurrency),
        "--pool", "prefork",
        "--hostname", nodename,
        "--loglevel", loglevel,
        "--without-gossip",
        "--without-mingle",
        *(["--task-events"] if events else []),
    ]  # fmt: skip
    pool_worker.app.worker_main(argv)


def _database_replication(config: Settings) -> DatabaseReplication:
    """Returns how the database is replicated (worker.storage.standby). Raises ConfigError when
    KMSQ_REQUIRE_SYNC_STANDBY is set and the primary has no synchronous standby streaming."""
    from sqlalchemy.exc import OperationalError

    from worker.errors import ConfigError
    from worker.storage.db import create_db_engine
    from worker.storage.standby import DatabaseReplication, replication_of

    engine = create_db_engine(config.database_url)
    try:
        found = replication_of(engine)
    except OperationalError as e:  # gone since the fleet key was read: the preflight says so next
        found = DatabaseReplication("unknown", detail=type(e).__name__)
    finally:
        engine.dispose()
    if config.require_sync_standby and found.mode != "sync":
        raise ConfigError(f"KMSQ_REQUIRE_SYNC_STANDBY is set and the database is not replicated synchronously "
                          f"(mode {found.mode}): a commit could be lost with its primary (docs/OPERATIONS.md, "
                          "'The database')")  # fmt: skip
    return found


def _open_as_a_pool_process(config: Settings, pool: str) -> tuple[str, str] | None:
    """What a pool process does first (its HSM session, the policy rows, the pool's fleet key); returns the
    error's class and message, or None. Run in a spawned process: this parent must not open the token."""
    from tasks.worker import PoolWorker
    from worker.errors import ServiceError
    from worker.operators import read_pinned

    try:
        _take_what_waits(config)
        read_pinned(config.operator_set_file)  # before the token and the database: the pin is this host's own
        try:
            ctx = PoolWorker(config, pool).context()
        except ServiceError:  # (no row verifies without the operators: say that, when it is why)
            _operators_verify_if_reachable(config)
            raise
        _operators_verify(config, ctx.sessions)
        _needs(ctx.hsm, ctx.sessions, pool)
    except ServiceError as e:
        return type(e).__name__, e.message
    return None


def _operators_verify(config: Settings, sessions: Any) -> None:
    """Raises ConfigError unless the database's chain of operator sets verifies from the set this host pins
    (docs/DUAL_CONTROL.md): without, the worker would refuse every policy row."""
    from worker.approvals import ApprovalError, load_operator_sets
    from worker.errors import ConfigError
    from worker.operators import read_pinned

    pinned = read_pinned(config.operator_set_file)
    try:
        with sessions() as db:
            load_operator_sets(db, pinned.digest)
    except ApprovalError as e:
        raise ConfigError(f"the operators ({pinned.describe()}, pinned in {config.operator_set_file}): {e}") from None


def _operators_verify_if_reachable(config: Settings) -> None:
    """:func:`_operators_verify` on a database connection of its own; nothing when the database cannot be used."""
    from sqlalchemy.exc import SQLAlchemyError

    from worker.storage.db import create_db_engine, session_factory

    try:
        engine = create_db_engine(config.database_url)
    except Exception:  # the original error says why
        return
    try:
        _operators_verify(config, session_factory(engine))
    except SQLAlchemyError:
        return
    finally:
        engine.dispose()


def _needs(keystore: Any, sessions: Any, pool: str) -> None:
    """Raises ConfigError naming what the token lacks that the pool's root keys (or key custody) need."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from worker import hsm_custody, replication
    from worker.errors import ConfigError
    from worker.hsm import Hsm
    from worker.storage.db import transaction
    from worker.storage.models import RootKey

    if not isinstance(keystore, Hsm):
        return
    with transaction(sessions) as db:
        types = set(db.scalars(select(RootKey.type).where(RootKey.pool == pool, RootKey.state == "enabled")))
    lacking = hsm_custody.missing(hsm_custody.probe(keystore), types, hsm_custody.takes_part(keystore))
    try:
        with transaction(sessions) as db:
            replication.record_check(db, keystore.token_serial(), lacking, f"worker {pool}"[:32])
    except SQLAlchemyError as e:  # a record for kmsq status: not a reason to refuse, nor to hide what is missing
        logging.getLogger("kmsq.worker").warning("the token check was not recorded: %s", type(e).__name__)
    if lacking:
        raise ConfigError("the token lacks " + ", ".join(f"{c.name} ({c.needed_for})" for c in lacking)
                          + " (kmsq hsm check)")  # fmt: skip


def _take_what_waits(config: Settings) -> None:
    """Replicates once (worker.replication) when the token takes part: keys and the policy anchor another token
    wrapped for this one while it was down are taken before the worker serves (with a stale anchor it would
    refuse every request)."""
    from worker import hsm_custody, policy_anchor, replication
    from worker.hsm import Hsm
    from worker.runtime import KeyService
    from worker.storage.db import transaction

    service = KeyService.from_settings(config)
    try:
        token = service.hsm
        if isinstance(token, Hsm) and hsm_custody.takes_part(token):
            with transaction(service.sessions) as db:
                replication.replicate(token, db, policy_anchor.deployment_id(db))
    finally:
        service.engine.dispose()


def _preflight(config: Settings, pool: str) -> None:
    """Opens the HSM and the pool's fleet key as a pool process would, in a process of its own (about 1.5 s; it
    exits before the worker starts, so the worker's children are its pool processes only), so that a worker that
    could not serve never says "ready" and takes requests it cannot answer (a wrong KMSQ_PKCS11_MODULE used to do
    that: callers waited their whole timeout). Raises ConfigError, or TransientError when the token or the
    database does not answer now."""
    import json
    import subprocess
    import sys

    from worker.errors import ConfigError, TransientError

    code = "import sys; from kmsq.commands.worker import preflight_main; preflight_main(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, pool], capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    try:
        failed = json.loads(lines[-1]) if lines else None
    except ValueError:
        failed = None
    if done.returncode != 0 or not isinstance(failed, dict):
        raise ConfigError(f"a worker of pool {pool!r} cannot serve: its check did not run ({done.returncode})")
    if failed.get("ok"):
        return
    error = TransientError if str(failed.get("kind", "")).endswith("Unavailable") else ConfigError
    raise error(f"a worker of pool {pool!r} cannot serve: {failed.get('message')}")


def preflight_main(pool: str) -> None:
    """The check of :func:`_preflight`, in its own process: prints one JSON line, ``{"ok": true}`` or the error's
    ``kind`` and ``message``."""
    import json

    failed = _open_as_a_pool_process(settings(), pool)
    print(json.dumps({"ok": True} if failed is None else {"kind": failed[0], "message": failed[1]}))


def _health(config: Settings) -> Callable[[], dict[str, str]]:
    """The /healthz checks of the worker's main process: the token answers, the database answers (each
    result kept for HEALTH_CACHE_SECONDS, so that frequent probes cost nothing)."""
    from sqlalchemy import text

    from worker.runtime import hsm_from_settings
    from worker.storage.db import create_db_engine

    hsm = hsm_from_settings(config)
    engine = create_db_engine(config.database_url)
    lock = threading.Lock()
    cached: dict[str, tuple[float, str]] = {}

    def probe(name: str, check: Callable[[], object]) -> str:
        hit = cached.get(name)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        try:
            check()
            result = "ok"
        except Exception as e:  # reported, never raised: this is the health check
            result = f"unavailable ({type(e).__name__})"
        cached[name] = (time.monotonic() + HEALTH_CACHE_SECONDS, result)
        return result

    def database() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def health() -> dict[str, str]:
        with lock:
            return {"process": "ok", "hsm": probe("hsm", hsm.check), "database": probe("database", database)}

    return health
