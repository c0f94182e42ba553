"""``kmsq soak``: many requests with a short retention, sampling what kmsq keeps (database, Redis, worker
memory) over time, to show that it stays flat once pruning has caught up: bounded by rate x retention.

It runs its own pool (``soak``) and worker with the retention of the run, a caller ``soak``, and keeps a
window of requests in flight (``generate_data_key`` without plaintext, the most common single request; single
messages, or coalesced as the gateway sends them). Samples every few seconds: the ``requests`` and
``audit_log`` tables' rows and bytes (with indexes and TOAST), the database's size, Redis's used memory and
the number of the namespace's keys, and the worker's RSS. Writes ``soak.json`` and ``soak.png``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kmsq.bench_common import CpuMeter, set_up_pool, stop_worker
from kmsq.procfs import children_of

POOL = "soak"


@dataclass(frozen=True)
class SoakConfig:
    """One soak run."""

    requests: int
    in_flight: int = 64
    coalesce: bool = False
    workers: int = 2
    ttl_seconds: int = 5  # each request's validity
    skew_seconds: int = 1
    grace_seconds: int = 5
    audit_retention_seconds: int = 60
    prune_interval_seconds: int = 1  # 0: the worker does not prune (the baseline of pruning's cost)
    sample_seconds: float = 5.0

    @property
    def record_lifetime(self) -> int:
        """Seconds a request record lives: its request's validity, the skew and the grace."""
        return self.ttl_seconds + self.skew_seconds + self.grace_seconds


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Sampler(threading.Thread):
    """Samples what kmsq keeps every ``interval`` seconds until stopped."""

    def __init__(self, engine: Any, broker_url: str, namespace: str | None, worker: subprocess.Popen[bytes],
                 done: Callable[[], int], interval: float) -> None:  # fmt: skip
        super().__init__(name="kmsq-soak-sampler", daemon=True)
        import redis

        from schemas.wire import namespace_key_prefix
        from tasks.app import split_broker_url

        self.engine = engine
        url, _ = split_broker_url(broker_url)
        self.redis = redis.Redis.from_url(url.replace("redis+socket://", "unix://"), socket_timeout=10)
        self.prefix = namespace_key_prefix(namespace)
        self.worker = worker
        self.done = done
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.begin = time.monotonic()

    def sample(self) -> dict[str, Any]:
        """One sample of every figure."""
        from sqlalchemy import text

        with self.engine.connect() as db:
            row = db.execute(text(
                "select (select count(*) from requests), pg_total_relation_size('requests'), "
                "(select count(*) from audit_log), pg_total_relation_size('audit_log'), "
                "pg_database_size(current_database())"
            )).one()  # fmt: skip
        keys = sum(1 for _ in self.redis.scan_iter(match=self.prefix + "*", count=1000)) if self.prefix else None
        pids = [self.worker.pid, *children_of(self.worker.pid)]
        return {
            "t": round(time.monotonic() - self.begin, 1),
            "requests_done": self.done(),
            "request_rows": row[0],
            "request_bytes": row[1],
            "audit_rows": row[2],
            "audit_bytes": row[3],
            "database_bytes": row[4],
            "redis_used_bytes": int(self.redis.info("memory")["used_memory"]),
            "redis_keys": keys,
            "worker_rss_kib": sum(_rss_kib(pid) for pid in pids),
        }

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(self.sample())
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        """Stops, takes a last sample and closes the Redis client."""
        self.stopped.set()
        self.join()
        self.samples.append(self.sample())
        self.redis.close()


def start_soak_worker(config: SoakConfig, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Starts ``kmsq worker --pool soak`` with the run's retention."""
    worker_env = {
        **env,
        "KMSQ_CLOCK_SKEW_SECONDS": str(config.skew_seconds),
        "KMSQ_REPLY_GRACE_SECONDS": str(config.grace_seconds),
        "KMSQ_AUDIT_RETENTION_SECONDS": str(config.audit_retention_seconds),
        "KMSQ_PRUNE_INTERVAL_SECONDS": str(config.prune_interval_seconds),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kmsq", "worker", "--pool", POOL, "--concurrency", str(config.workers),
             "--loglevel", "info"],
            stdout=out, stderr=subprocess.STDOUT, env=worker_env,
        )  # fmt: skip


def steady_state(samples: list[dict[str, Any]], config: SoakConfig) -> dict[str, Any]:
    """What the samples after warm-up show: each figure's range, its growth from the first to the second half
    of the steady state (1.0 = flat), and the bytes kept per request record and per request per second."""
    warm_after = max(3 * config.record_lifetime + 2 * config.audit_retention_seconds, samples[-1]["t"] * 0.2)
    steady = [s for s in samples[:-1] if s["t"] >= warm_after] or samples
    half = len(steady) // 2
    out: dict[str, Any] = {"warm_up_seconds": round(warm_after, 1), "samples": len(steady)}
    for name in ("request_rows", "request_bytes", "audit_rows", "audit_bytes", "database_bytes",
                 "redis_used_bytes", "worker_rss_kib"):  # fmt: skip
        values = [s[name] for s in steady]
        first, second = values[: max(1, half)], values[half:] or values
        out[name] = {
            "min": min(values),
            "max": max(values),
            "growth": round(max(second) / max(1, max(first)), 3),  # the second half's peak over the first's
        }
    rows = [s["request_rows"] for s in steady if s["request_rows"]]
    rate = _rate(steady)
    kept_for = config.record_lifetime + max(1, config.prune_interval_seconds)  # at most, waiting for a prune
    out["rate_per_s"] = round(rate, 1)
    out["bytes_per_request_row"] = round(sum(s["request_bytes"] for s in steady) / max(1, sum(rows)), 1)
    # Bytes the requests table holds per request/s of load, and per request made within a record's lifetime.
    mean_bytes = sum(s["request_bytes"] for s in steady) / len(steady)
    out["request_bytes_per_request_per_s"] = round(mean_bytes / max(rate, 1e-9), 1)
    out["request_bytes_per_request_kept"] = round(mean_bytes / max(rate * kept_for, 1e-9), 1)
    # One record per request when requests are single messages; one per batch when they are coalesced.
    out["expected_request_rows"] = None if config.coalesce else round(rate * kept_for, 1)
    return out


def _rate(samples: list[dict[str, Any]]) -> float:
    if len(samples) < 2 or samples[-1]["t"] <= samples[0]["t"]:
        return 0.0
    done = float(samples[-1]["requests_done"] - samples[0]["requests_done"])
    return done / float(samples[-1]["t"] - samples[0]["t"])


def plot(report: dict[str, Any], path: Path) -> None:
    """Four panels against time: request rows, database and table sizes, Redis memory, worker RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    (rows, sizes), (redis_panel, rss) = axes
    rows.plot(t, [s["request_rows"] for s in samples], label="request records")
    rows.plot(t, [s["audit_rows"] for s in samples], label="audit records")
    if report["steady"]["expected_request_rows"] is not None:
        rows.axhline(report["steady"]["expected_request_rows"], color="grey", linestyle="--",
                     label="rate x record lifetime")  # fmt: skip
    rows.set_ylabel("rows")
    rows.legend(fontsize=8)
    mib = 1024 * 1024
    sizes.plot(t, [s["database_bytes"] / mib for s in samples], label="database")
    sizes.plot(t, [s["request_bytes"] / mib for s in samples], label="requests (with indexes)")
    sizes.plot(t, [s["audit_bytes"] / mib for s in samples], label="audit_log (with indexes)")
    sizes.set_ylabel("MiB")
    sizes.legend(fontsize=8)
    redis_panel.plot(t, [s["redis_used_bytes"] / mib for s in samples], label="Redis used_memory")
    redis_panel.set_ylabel("MiB")
    redis_panel.set_xlabel("minutes")
    redis_panel.legend(fontsize=8)
    rss.plot(t, [s["worker_rss_kib"] / 1024 for s in samples], label="worker RSS (main + pool processes)")
    rss.set_ylabel("MiB")
    rss.set_xlabel("minutes")
    rss.legend(fontsize=8)
    for ax in (rows, sizes, redis_panel, rss):
        ax.set_ylim(bottom=0)
    config = report["config"]
    fig.suptitle(
        f"kmsq soak: {report['requests']:,} requests ({'coalesced' if config['coalesce'] else 'single messages'}), "
        f"record lifetime {config['ttl_seconds']}+{config['skew_seconds']}+{config['grace_seconds']} s, "
        f"audit retention {config['audit_retention_seconds']} s; {report['machine']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_soak(config: SoakConfig, out_dir: Path, log: Callable[[str], None],
             progress: Callable[[int], None]) -> dict[str, Any]:  # fmt: skip
    """Sets up the soak pool, caller and root key, runs the load while sampling, and writes soak.json and
    soak.png. Raises ConfigError (no Redis or Postgres configured) or RuntimeError (the worker failed)."""
    from kmsq.bench import machine, run_window
    from tasks.client import KmsClient
    from worker import audit_log
    from worker.errors import ConfigError
    from worker.storage.db import transaction

    measured = set_up_pool("soak", POOL, "soak")
    settings, svc, root_id = measured.settings, measured.service, measured.root_key_id
    others = sorted({k.pool for k in svc.list_root_keys()} - {POOL})
    if others:  # its worker prunes every caller's records and the audit events with the run's short retention
        svc.engine.dispose()
        raise ConfigError(
            f"kmsq soak prunes with a short retention: run it on a database of its own (this one also has pool(s) "
            f"{', '.join(others)})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    worker = start_soak_worker(config, out_dir / "soak-worker.log", env)
    counter = [0]
    client = KmsClient(
        settings.effective_broker_url, measured.identity, measured.fleet, timeout=120, namespace=settings.namespace,
        ttl_seconds=config.ttl_seconds, coalesce=config.coalesce,
    )  # fmt: skip
    sampler: Sampler | None = None
    try:
        log("waiting for the soak worker")
        deadline = time.monotonic() + 60
        while True:  # the first request answers once the worker is up
            try:
                client.generate_data_key(root_id, with_plaintext=False)
                break
            except Exception:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the soak worker did not start; see {out_dir / 'soak-worker.log'}") from None
        sampler = Sampler(svc.engine, settings.effective_broker_url, settings.namespace, worker,
                          lambda: counter[0], config.sample_seconds)  # fmt: skip
        sampler.start()
        log(f"{config.requests:,} requests, {config.in_flight} in flight")

        def progressed(done: int) -> None:
            counter[0] = done
            progress(done)

        meter = CpuMeter(worker, settings.effective_broker_url)
        result = meter.measure(config.requests, lambda: run_window(
            config.requests, config.in_flight,
            lambda _: client.submit_generate_data_key(root_id, with_plaintext=False), progress=progressed,
        ))  # fmt: skip
        sampler.stop()
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stopped.set()
        client.close()
        stop_worker(worker)
    with transaction(svc.sessions) as db:
        chain = audit_log.verify(svc.hsm, db, POOL)
    svc.engine.dispose()
    report: dict[str, Any] = {
        "machine": machine()["summary"],
        "config": asdict(config),
        "requests": config.requests,
        "elapsed_s": result["elapsed_s"],
        "per_s": result["per_s"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "cpu_ms_per_request": result["cpu_ms_per_item"],
        "audit_chain": {
            "ok": chain.ok,
            "records": chain.records,
            "pruned_through": chain.pruned_through,
            "problem": chain.problem,
        },
        "samples": sampler.samples if sampler is not None else [],
    }
    report["steady"] = steady_state(report["samples"], config)
    (out_dir / "soak.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, out_dir / "soak.png")
    return report
