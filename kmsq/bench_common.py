"""What every measurement of ``kmsq bench`` shares: figures from latencies, CPU time by process group read from
/proc, and stopping a process the bench started."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsq.procfs import children_of, cpu_seconds, processes_named


def summarize(count: int, elapsed: float, latencies: list[float]) -> dict[str, Any]:
    """Throughput (items/s) and latency percentiles (ms) of one measurement."""
    ordered = sorted(latencies)

    def pct(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 3)

    return {
        "items": count,
        "elapsed_s": round(elapsed, 3),
        "per_s": round(count / elapsed, 1) if elapsed > 0 else None,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "median_ms": round(statistics.median(ordered) * 1000, 3) if ordered else None,
    }


def _redis_port(broker_url: str | None) -> str | None:
    from urllib.parse import urlsplit

    if not broker_url or not broker_url.startswith("redis://"):
        return None
    return str(urlsplit(broker_url).port or 6379)


class CpuMeter:
    """CPU time (user + system) by process group: the client (this process: the SDK, or the HTTP load for G),
    the worker's main process and its pool processes, extra groups (the gateway), the broker (Redis: the server
    on the broker's port; RabbitMQ: its Erlang VMs) and Postgres (its server and every backend, this run's or
    not) where /proc shows them."""

    def __init__(
        self,
        worker: subprocess.Popen[bytes] | None,
        broker_url: str | None = None,
        extra: dict[str, list[int]] | None = None,
    ) -> None:
        self.worker = worker
        self.redis_port = _redis_port(broker_url)
        self.rabbitmq = bool(broker_url) and str(broker_url).startswith(("amqp://", "amqps://"))
        self.extra = extra or {}

    def _groups(self) -> dict[str, list[int]]:
        groups = {"client": [os.getpid()]}
        if self.worker is not None:
            groups |= {"worker_main": [self.worker.pid], "worker_children": children_of(self.worker.pid)}
        groups |= self.extra
        if self.redis_port is not None:
            groups["redis"] = processes_named("redis-server", f":{self.redis_port}")
        if self.rabbitmq:  # the Erlang VMs of RabbitMQ on this host
            groups["rabbitmq"] = processes_named("beam.smp", "rabbit")
        groups["postgres"] = processes_named("postgres")
        return groups

    def snapshot(self) -> dict[str, dict[int, float]]:
        """Seconds of CPU so far, per group and process."""
        return {name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in self._groups().items()}

    def measure(self, items: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Runs ``run`` and adds ``cpu_ms_per_item`` (per group and in total) to its result. A process that
        started meanwhile counts whole; one that ended meanwhile is missed."""
        before = self.snapshot()
        result = run()
        after = self.snapshot()
        per = {
            name: round(sum(t - before.get(name, {}).get(pid, 0.0) for pid, t in pids.items()) * 1000 / items, 3)
            for name, pids in after.items()
        }
        return {**result, "cpu_ms_per_item": {**per, "total": round(sum(per.values()), 3)}}


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class MeasuredPool:
    """What ``kmsq bench`` and ``kmsq soak`` set up before measuring: a pool with an aes-256 root key and fleet
    keys, and a caller of their own allowed everything, whose identity file lives in ``$KMSQ_HOME/callers``."""

    settings: Any  # worker.config.Settings
    service: Any  # worker.runtime.KeyService (migrated)
    root_key_id: str
    identity: Any  # tasks.identity.CallerIdentity
    identity_file: Path
    fleet: Any  # tasks.identity.Fleet, with the pool as its default


def set_up_pool(command: str, pool: str, caller: str) -> MeasuredPool:
    """Prepares ``pool`` and ``caller`` on the configured Redis, Postgres and token (idempotent). Raises
    ConfigError when the broker is the embedded one or the database is SQLite, or when ``caller`` is
    registered with another key than its identity file's."""
    from tasks.identity import CallerIdentity, Fleet
    from worker.config import load_settings
    from worker.errors import ConfigError
    from worker.operators import authorize_process
    from worker.runtime import KeyService
    from worker.softhsm import ensure_embedded_token
    from worker.storage.db import migrate

    settings = load_settings()
    if settings.embedded_broker or settings.database_url.startswith("sqlite"):
        raise ConfigError(f"kmsq {command} measures against Redis and Postgres: set KMSQ_BROKER_URL and "
                          "KMSQ_DATABASE_URL")  # fmt: skip
    if settings.embedded_hsm:
        ensure_embedded_token(settings)
    svc = KeyService.from_settings(settings)
    migrate(svc.engine)
    authorize_process(settings)  # the rows it makes are approved by this host's operator keys (kmsq init's)
    roots = [k for k in svc.list_root_keys() if k.pool == pool and k.state == "enabled" and k.type == "aes-256"]
    root = roots[0] if roots else svc.create_root_key("aes-256", pool)
    svc.ensure_fleet_key(pool)
    identity_file = register_caller(settings, svc, caller)
    fleet = Fleet.from_document(svc.fleet_document() | {"default_pool": pool})
    return MeasuredPool(settings, svc, root.id, CallerIdentity.load(identity_file), identity_file, fleet)


def register_caller(settings: Any, svc: Any, caller: str) -> Path:
    """Makes ``caller``'s identity under ``$KMSQ_HOME/callers`` (unless it exists) and registers it for every
    operation, with plaintext, on every root key (unless it is), without lane or quotas; returns its identity
    file. Raises ConfigError when ``caller`` is registered with another key."""
    from schemas.operations import ALLOWABLE_OPS
    from tasks.identity import CallerIdentity
    from worker import callers
    from worker.errors import ConfigError
    from worker.storage.db import transaction

    directory = settings.home / "callers"
    identity_file: Path = directory / f"{caller}.key.json"
    if not identity_file.exists():
        CallerIdentity.generate(caller).write(directory)
    identity = CallerIdentity.load(identity_file)
    with transaction(svc.sessions) as db:
        known = {c.name: c for c in callers.list_callers(db)}
        if caller not in known:
            public = callers.read_public_identity(directory / f"{caller}.pub.json")
            callers.add_caller(svc.hsm, db, caller, public, list(ALLOWABLE_OPS), None, plaintext=True)
        elif known[caller].key_id != identity.key_id:
            raise ConfigError(f"caller {caller!r} is registered with another key than {identity_file}")
    return identity_file
