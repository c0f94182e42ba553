"""Figure Q of ``kmsq bench``: sharing a pool (docs/OPERATIONS.md, "Sharing a pool").

Q1, lanes. A ``kmsq provision`` job (batches of 1,000 data keys, four in flight, a process of its own) runs at full
speed on the bench pool while this process sends interactive single requests at a steady rate (``generate_data_key``
and ``sign`` of an ETH hash, alternating, open loop). Measured in two deployments of the same pool, one after the
other: **shared**, one ``kmsq worker --lane all`` whose queue the job's batches share with the interactive requests
(the job sent with ``--lane interactive``: kmsq before lanes), and **lanes**, a ``--lane interactive`` worker of one
process beside a ``--lane bulk --nice 10`` worker (the job in the bulk lane). In each: the interactive latencies on
the idle pool, the job's keys per second alone, then both together; reported as the loaded p99 over the idle p99
and the job's rate with the interactive load over its rate alone. The target is p99 within 2x and the job at 0.8x.

Q2, quotas. The bench caller keeps eight ``generate_data_key`` requests in flight (closed loop), alone, then beside
a greedy caller (a process of its own) whose quota is 25 requests a second and which sends exactly that, then far
more while backing off as the SDK does, then far more without backing off, then at its quota and backing off once
more (:data:`SCHEDULE`). The quota holds when the greedy caller gets 25 a second and the rest is refused; the excess
costs the others nothing when the bench caller's mean rate beside the greedy caller over its quota is its mean rate
beside the one at its quota, within the run's noise (the two at-quota windows apart, and the two alone windows).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsq.bench_common import stop_worker

JOB_CALLER = "bench-job"
GREEDY_CALLER = "bench-greedy"
PROBE_RATE = 20.0  # interactive requests per second
GREEDY_QUOTA = 25.0  # the greedy caller's requests per second
IN_FLIGHT = 8
JOB_KEYS = 1_000_000  # the job; it is stopped after its windows (200,000 ran out in one at 9,000 keys/s)


@dataclass(frozen=True)
class Deployment:
    """The workers of one Q1 configuration: ``kmsq worker`` argument lists, and the lane the job is sent to."""

    name: str
    workers: tuple[tuple[str, ...], ...]
    job_lane: str


SHARED = Deployment("shared", (("--lane", "all", "--concurrency", "2"),), "interactive")
LANES = Deployment("lanes", (("--lane", "interactive", "--concurrency", "1"),
                             ("--lane", "bulk", "--concurrency", "2", "--nice", "10")), "bulk")  # fmt: skip
DEPLOYMENTS = (SHARED, LANES)


def start_workers(deployment: Deployment, pool: str, env: dict[str, str], log: Path) -> list[subprocess.Popen[bytes]]:
    """Starts the deployment's ``kmsq worker`` processes of ``pool`` (not waiting for them)."""
    processes = []
    for options in deployment.workers:
        with log.open("ab") as out:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "kmsq", "worker", "--pool", pool, "--loglevel", "warning", *options],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            ))  # fmt: skip
    return processes


def wait_served(client: Any, root_key: str, processes: list[subprocess.Popen[bytes]], log: Path) -> None:
    """Waits until both lanes answer (a single request and a batch), then warms every process up. Raises
    RuntimeError when a worker exits or nothing answers in 60 s."""
    deadline = time.monotonic() + 60
    for start in (
        lambda: client.submit_generate_data_key(root_key),
        lambda: client.submit_generate_data_keys(2, root_key),
    ):
        while True:
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"a bench worker exited; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bench workers did not answer; see {log}")
            with contextlib.suppress(TimeoutError):  # not up yet
                start().result(timeout=5)
                break
    for _ in range(20):
        client.wait(client.submit_generate_data_key(root_key))
        client.wait(client.submit_generate_data_keys(10, root_key))


def probe(client: Any, root_key: str, pub: str, seconds: float, rate: float = PROBE_RATE) -> dict[str, Any]:
    """Sends interactive single requests at ``rate`` per second for ``seconds`` (open loop: on schedule, whatever is
    outstanding), alternating ``generate_data_key`` and ``sign``. Returns their latencies (ms) per kind.

    The collector is kept off the bench's own heap meanwhile (``gc.freeze``): this process holds the bench's setup and
    the earlier figures' results, and a full collection over them stopped every thread of it for 90-150 ms, the
    requests it was sending included, which is the load generator's pause, not kmsq's latency. What the SDK
    allocates during the window is collected as in any caller."""
    gc.collect()
    gc.freeze()
    try:
        return _probe(client, root_key, pub, seconds, rate)
    finally:
        gc.unfreeze()


def _probe(client: Any, root_key: str, pub: str, seconds: float, rate: float) -> dict[str, Any]:
    import secrets

    latencies: dict[str, list[float]] = {"generate_data_key": [], "sign": []}
    errors: list[str] = []
    futures: list[Future[Any]] = []
    lock = threading.Lock()
    start = time.monotonic()
    for i in range(int(seconds * rate)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        kind = "sign" if i % 2 else "generate_data_key"
        sent = time.monotonic()
        if kind == "sign":
            future = client.submit_sign(pub, "user", "0x" + secrets.token_hex(32), "ecdsa", client.pool_for(root_key))
        else:
            future = client.submit_generate_data_key(root_key)

        def done(f: Future[Any], kind: str = kind, sent: float = sent) -> None:
            elapsed = (time.monotonic() - sent) * 1000
            with lock:
                if f.exception() is None:
                    latencies[kind].append(elapsed)
                else:
                    errors.append(type(f.exception()).__name__)

        future.add_done_callback(done)
        futures.append(future)
    for future in futures:
        with contextlib.suppress(Exception):  # counted by its callback
            client.wait(future)
    out: dict[str, Any] = {"rate_per_s": rate, "seconds": seconds, "errors": len(errors)}
    for kind, values in latencies.items():
        out[kind] = _percentiles(values)
    return out


def _percentiles(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"count": len(ordered), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ordered[-1], 2)}


class Job:
    """A ``kmsq provision`` job in a process of its own, counted by the lines of its output."""

    def __init__(self, env: dict[str, str], out: Path, lane: str, count: int) -> None:
        self.out = out
        out.unlink(missing_ok=True)
        out.with_name(out.name + ".job").unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kmsq", "provision", "--count", str(count), "--batch", "1000", "--in-flight", "4",
             "--lane", lane, "--out", str(out), "--json"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def keys(self) -> int:
        """Keys written so far (each finished batch is appended whole)."""
        try:
            with self.out.open("rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except FileNotFoundError:
            return 0

    def rate_over(self, seconds: float, meanwhile: Callable[[], Any] | None = None) -> tuple[float, Any]:
        """Keys per second over ``seconds`` (while ``meanwhile`` runs, when given, for its result)."""
        before, started = self.keys(), time.monotonic()
        result = None
        if meanwhile is None:
            time.sleep(seconds)
        else:
            result = meanwhile()
        if self.process.poll() is not None:
            raise RuntimeError("the provisioning job ended during a window: give it more keys")
        return round((self.keys() - before) / (time.monotonic() - started), 1), result

    def stop(self) -> None:
        """Interrupts the job (it is resumable; nothing else needs it)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def measure_lanes(
    client: Any, root_key: str, pool: str, env: dict[str, str], job_env: dict[str, str], out_dir: Path,
    seconds: float, log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Q1 in each deployment of :data:`DEPLOYMENTS`. Returns their figures and ratios."""
    pub: str | None = None
    out: dict[str, Any] = {"probe_rate_per_s": PROBE_RATE, "window_s": seconds}
    worker_log = out_dir / "bench-lanes-worker.log"
    for deployment in DEPLOYMENTS:
        log(f"Q1 {deployment.name}: {', '.join(' '.join(w) for w in deployment.workers)}")
        processes = start_workers(deployment, pool, env, worker_log)
        job: Job | None = None
        try:
            wait_served(client, root_key, processes, worker_log)
            if pub is None:  # the key the interactive sign requests use
                pub = str(client.generate_signing_key("hteth", "user", "independent", root_key)["pub"])
            signer = pub
            idle = probe(client, root_key, signer, seconds)
            job = Job(job_env, out_dir / f"bench-lanes-{deployment.name}.jsonl", deployment.job_lane,
                      count=JOB_KEYS)  # fmt: skip
            time.sleep(3)  # at full speed
            alone, _ = job.rate_over(seconds)
            with_probe, loaded = job.rate_over(seconds, functools.partial(probe, client, root_key, signer, seconds))
        finally:
            if job is not None:
                job.stop()
                job.out.unlink(missing_ok=True)  # (its keys are not needed: only how fast they came)
            for process in processes:
                stop_worker(process)
        out[deployment.name] = {
            "idle": idle, "loaded": loaded, "job_keys_per_s_alone": alone,
            "job_keys_per_s_with_interactive": with_probe,
            "ratios": {
                **{f"{kind}_p99_loaded_over_idle": _ratio(loaded[kind].get("p99_ms"), idle[kind].get("p99_ms"))
                   for kind in ("generate_data_key", "sign")},
                "job_with_interactive_over_alone": _ratio(with_probe, alone),
            },
        }  # fmt: skip
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def closed_loop(start: Callable[[], Future[Any]], seconds: float, honor_wait: bool = True) -> dict[str, Any]:
    """``IN_FLIGHT`` requests made by ``start`` outstanding for ``seconds``; with ``honor_wait`` a ``rate_limited``
    refusal makes its slot wait the refusal's ``retry_after``. Returns the passes and refusals per second."""
    from tasks.client import KmsError

    counts = {"ok": 0, "rate_limited": 0, "other": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def slot() -> None:
        while time.monotonic() < deadline:
            try:
                start().result(timeout=120)
                outcome, wait = "ok", 0.0
            except KmsError as e:
                outcome = e.code if e.code == "rate_limited" else "other"
                wait = (e.retry_after or 0.0) if honor_wait else 0.0
            with lock:
                counts[outcome] += 1
            if wait:
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    started = time.monotonic()
    threads = [threading.Thread(target=slot) for _ in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    return {key: round(value / elapsed, 1) for key, value in counts.items()} | {"seconds": round(elapsed, 1)}


def open_loop(start: Callable[[], Future[Any]], seconds: float, rate: float) -> dict[str, Any]:
    """``start`` called ``rate`` times a second for ``seconds``; returns the passes and refusals per second."""
    futures = []
    began = time.monotonic()
    for i in range(int(seconds * rate)):
        delay = began + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append(start())
    counts = {"ok": 0, "rate_limited": 0, "other": 0}
    for future in futures:
        error = future.exception(timeout=120)
        counts["ok" if error is None else getattr(error, "code", "other")] += 1
    elapsed = time.monotonic() - began
    return {key: round(value / elapsed, 1) for key, value in counts.items()} | {"seconds": round(elapsed, 1)}


GREEDY_MODES = {
    "at_quota": "sends exactly its quota (open loop through the SDK)",
    "backs_off": f"{IN_FLIGHT} in flight through the SDK, waiting each refusal's retry_after (the SDK refuses locally "
    "meanwhile)",
    "hammers": f"{IN_FLIGHT} in flight, signed and sent without the SDK's back-off, never waiting",
}


# Q2's windows beside the greedy caller, in order: (mode, key in the report). The at-quota baseline and the SDK's
# back-off are each measured twice, interleaved, so that a drift of the machine over the windows (10-17% between the
# first and last "alone" windows of a run) weighs on both sides of their ratio alike.
SCHEDULE = (("at_quota", "at_quota"), ("backs_off", "backs_off"), ("hammers", "hammers"),
            ("at_quota", "at_quota_again"), ("backs_off", "backs_off_again"))  # fmt: skip


def greedy_load(mode: str, seconds: float, root_key: str, start_at: float) -> dict[str, Any]:
    """The greedy caller's load in ``mode`` (a key of :data:`GREEDY_MODES`), from the epoch time ``start_at``, as
    the caller of ``KMSQ_IDENTITY`` (run in a process of its own: ``python -m kmsq.bench_lanes``)."""
    from kmsq.commands.common import open_client

    with open_client(None, None, 120.0) as client:
        pool = client.pool_for(root_key)
        params = {"op": "generate_data_key", "root_key_id": root_key, "key_spec": "AES-256"}

        def through_sdk() -> Future[Any]:
            future: Future[Any] = client.submit_generate_data_key(root_key)
            return future

        def raw() -> Future[Any]:
            future: Future[Any] = client.submit(dict(params), pool)
            return future

        time.sleep(max(0.0, start_at - time.time()))
        if mode == "at_quota":
            return open_loop(through_sdk, seconds, GREEDY_QUOTA)
        if mode == "backs_off":
            return closed_loop(through_sdk, seconds)
        return closed_loop(raw, seconds, honor_wait=False)


def measure_quotas(
    client: Any, greedy_env: dict[str, str], root_key: str, pool: str, env: dict[str, str], out_dir: Path,
    seconds: float, log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Q2 with a ``--lane all`` worker of two processes: the bench caller alone, then beside the greedy caller (a
    process of its own, its quota :data:`GREEDY_QUOTA`) in each of :data:`GREEDY_MODES`."""
    import json

    worker_log = out_dir / "bench-lanes-worker.log"
    processes = start_workers(SHARED, pool, env, worker_log)

    def mine() -> Future[Any]:
        future: Future[Any] = client.submit_generate_data_key(root_key)
        return future

    try:
        wait_served(client, root_key, processes, worker_log)
        log("Q2 the bench caller alone")
        alone = closed_loop(mine, seconds)
        results: dict[str, Any] = {"alone": alone, "greedy_quota_per_s": GREEDY_QUOTA, "greedy_modes": GREEDY_MODES}
        for mode, key in SCHEDULE:
            log(f"Q2 the bench caller beside a greedy caller that {GREEDY_MODES[mode]}")
            start_at = time.time() + 3  # the greedy process's client is connected by then
            other = subprocess.Popen(
                [sys.executable, "-m", "kmsq.bench_lanes", mode, str(seconds), root_key, str(start_at)],
                env=greedy_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(max(0.0, start_at - time.time()))
            measured = closed_loop(mine, seconds)
            output, _ = other.communicate(timeout=seconds + 120)
            results[key] = {"bench_caller": measured, "greedy_caller": json.loads(output),
                            "bench_caller_over_alone": _ratio(measured["ok"], alone["ok"])}  # fmt: skip
        log("Q2 the bench caller alone again")
        results["alone_again"] = closed_loop(mine, seconds)

        def bench_ok(mode: str) -> float:  # the mean of the mode's windows
            windows = [results[key]["bench_caller"]["ok"] for m, key in SCHEDULE if m == mode]
            return float(sum(windows)) / len(windows)

        base = bench_ok("at_quota")
        results["at_quota_windows_apart"] = _ratio(results["at_quota"]["bench_caller"]["ok"],
                                                   results["at_quota_again"]["bench_caller"]["ok"])  # fmt: skip
        for mode in ("backs_off", "hammers"):
            results[mode]["bench_caller_over_at_quota"] = _ratio(bench_ok(mode), base)
    finally:
        for process in processes:
            stop_worker(process)
    return results


def measure_sharing(
    parts: tuple[Any, ...], seconds: float, out_dir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Q: Q1 and Q2 on the bench pool. ``parts``: the settings, the key service, the bench caller's identity, the
    fleet, the root key, the pool and the environment of the bench's workers."""
    import json

    from kmsq.bench_common import register_caller
    from tasks.client import KmsClient
    from worker import callers
    from worker.storage.db import transaction

    settings, svc, identity, fleet, root_key, pool, env = parts
    job_identity = register_caller(settings, svc, JOB_CALLER)
    greedy_identity = register_caller(settings, svc, GREEDY_CALLER)
    with transaction(svc.sessions) as db:  # before any worker runs: none has the row cached without it
        callers.set_caller_limits(svc.hsm, db, GREEDY_CALLER, "auto", GREEDY_QUOTA, None)
    fleet_file = out_dir / "bench-lanes-fleet.json"
    fleet_file.write_text(json.dumps(svc.fleet_document() | {"default_pool": pool}) + "\n", encoding="utf-8")
    job_env = {**env, "KMSQ_IDENTITY": str(job_identity), "KMSQ_FLEET": str(fleet_file)}
    greedy_env = {**env, "KMSQ_IDENTITY": str(greedy_identity), "KMSQ_FLEET": str(fleet_file)}
    with KmsClient(settings.effective_broker_url, identity, fleet, timeout=120, namespace=settings.namespace) as client:
        lanes = measure_lanes(client, root_key, pool, env, job_env, out_dir, seconds, log)
        quotas = measure_quotas(client, greedy_env, root_key, pool, env, out_dir, seconds, log)
    return {"Q1_lanes": lanes, "Q2_quotas": quotas, "summary": summarize_sharing(lanes, quotas)}


def summarize_sharing(lanes: dict[str, Any], quotas: dict[str, Any]) -> dict[str, Any]:
    """The figures against their targets, one line each."""
    out: dict[str, Any] = {}
    for name in ("shared", "lanes"):
        ratios = lanes[name]["ratios"]
        out[name] = {**ratios, "meets_targets": all(
            value is not None and value <= 2.0 for key, value in ratios.items() if key.endswith("over_idle")
        ) and (ratios["job_with_interactive_over_alone"] or 0) >= 0.8}  # fmt: skip
    out["quota"] = {
        "bench_caller_beside_greedy_backing_off_over_at_quota": quotas["backs_off"]["bench_caller_over_at_quota"],
        "bench_caller_beside_greedy_hammering_over_at_quota": quotas["hammers"]["bench_caller_over_at_quota"],
        "at_quota_windows_apart": quotas["at_quota_windows_apart"],
        "greedy_passes_per_s": {mode: quotas[mode]["greedy_caller"]["ok"] for mode in GREEDY_MODES},
    }
    return out


def main(argv: list[str]) -> None:
    """``python -m kmsq.bench_lanes MODE SECONDS ROOT_KEY START_AT``: the greedy caller of Q2; prints its counts."""
    import json

    mode, seconds, root_key, start_at = argv
    if mode not in GREEDY_MODES:
        raise SystemExit(f"mode must be one of {', '.join(GREEDY_MODES)}")
    print(json.dumps(greedy_load(mode, float(seconds), root_key, float(start_at))))


if __name__ == "__main__":
    main(sys.argv[1:])
