"""``kmsq worker``: a Celery worker process group serving one pool's queue."""

from __future__ import annotations

import os

import click

from kmsq.commands.common import settings
from kmsq.output import one_line_errors
from schemas.wire import pool_queue


@click.command()
@click.option("--pool", default=None, help="HSM pool to serve (default: the configured default pool).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--loglevel", default="info", show_default=True)
@click.option("--benchmark-noop", is_flag=True, hidden=True, help="Also serve kmsq.noop (kmsq bench's baseline).")
@click.option("--benchmark-without-audit", is_flag=True, hidden=True,
              help="No audit chain (kmsq bench measures its cost; never in service).")  # fmt: skip
@one_line_errors
def worker(
    pool: str | None, concurrency: int, loglevel: str, benchmark_noop: bool, benchmark_without_audit: bool
) -> None:
    """Run a worker that consumes only the pool's queue kms.<pool>."""
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
    if config.embedded_broker:
        from kmsq import broker

        broker.start(config.home)
    os.environ["KMSQ_WORKER_POOL"] = pool
    if benchmark_noop:
        os.environ["KMSQ_WORKER_NOOP"] = "1"
    if benchmark_without_audit:
        os.environ["KMSQ_WORKER_NO_AUDIT"] = "1"
    from tasks.worker import app

    argv = [
        "worker",
        "--queues", pool_queue(pool),
        "--concurrency", str(concurrency),
        "--pool", "prefork",
        "--hostname", f"{pool}.{os.getpid()}@%h",
        "--loglevel", loglevel,
        "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip
    app.worker_main(argv)
