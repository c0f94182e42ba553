"""What every measurement of ``kmsq bench`` shares: figures from latencies, CPU time by process group read from
/proc, and stopping a process the bench started."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def _cpu_seconds(pid: int) -> float:
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue
    return found


def _processes(name: str, argument: str | None = None) -> list[int]:
    """Processes called ``name`` (with ``argument`` in their command line, when given)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != name:
                    continue
                if argument is None or argument in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _redis_port(broker_url: str | None) -> str | None:
    from urllib.parse import urlsplit

    if not broker_url or not broker_url.startswith("redis://"):
        return None
    return str(urlsplit(broker_url).port or 6379)


class CpuMeter:
    """CPU time (user + system) by process group: the client (this process: the SDK, or the HTTP load for G),
    the worker's main process and its pool processes, extra groups (the gateway), and Redis (the server on the
    broker's port) and Postgres (its server and every backend, this run's or not) where /proc shows them."""

    def __init__(
        self,
        worker: subprocess.Popen[bytes] | None,
        broker_url: str | None = None,
        extra: dict[str, list[int]] | None = None,
    ) -> None:
        self.worker = worker
        self.redis_port = _redis_port(broker_url)
        self.extra = extra or {}

    def _groups(self) -> dict[str, list[int]]:
        groups = {"client": [os.getpid()]}
        if self.worker is not None:
            groups |= {"worker_main": [self.worker.pid], "worker_children": _children(self.worker.pid)}
        groups |= self.extra
        if self.redis_port is not None:
            groups["redis"] = _processes("redis-server", f":{self.redis_port}")
        groups["postgres"] = _processes("postgres")
        return groups

    def snapshot(self) -> dict[str, dict[int, float]]:
        """Seconds of CPU so far, per group and process."""
        return {name: {pid: _cpu_seconds(pid) for pid in pids} for name, pids in self._groups().items()}

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
