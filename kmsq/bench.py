"""``kmsq bench``: one run, one machine, real Redis, Postgres and SoftHSM2, every figure side by side.

A  raw HSM loop: generate an AES-256 key, wrap it, read it, destroy it; one process, no queue, no database
B  a no-op Celery task round trip through the same broker, worker settings and reply path
C  single-request generate_data_key end to end (sign, queue, verify, HSM, Postgres, seal, reply, unseal)
D  generate_data_keys batches end to end, batch sizes 1, 10, 100, 1000
E  put_key end to end, single and batched
F  the replaced system's method: PBKDF2-HMAC-SHA256 (10,000 iterations) + AES-CCM per encryption
G  the HTTP gateway under 1-256 concurrent clients, coalescing off and on (kmsq.bench_gateway)
R  rewrap of the stored rows after a rotation; S  how fast a pool sheds messages with bad signatures
Q  sharing a pool: interactive latency and a provisioning job's rate, with and without lanes; quotas (kmsq.bench_lanes)

B-E run with 1 and with 2 worker processes; C through a coalescing client and G with the most. Every figure
has its CPU per item by process group. Ratios: C/B, D(1000)/A, E(batched)/F, and the CPU ratios, which the
machine's noise moves far less than the wall-clock ones. Peak RSS of the workers
(VmHWM of each worker process) is reported per configuration, and an optional long provisioning job samples
worker RSS over time.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from kmsq.bench_common import CpuMeter, set_up_pool, stop_worker, summarize
from schemas.messages import reply_queue_for
from schemas.wire import pool_queue

BATCH_SIZES = (1, 10, 100, 1000)
POOL = "bench"


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does."""

    raw: int
    round_trips: int
    batch_keys: int  # keys per batch size (at least two batches)
    put_single: int
    put_batched: int
    pbkdf2: int
    in_flight: int
    gateway_requests: int = 40  # per G cell
    coalesced_in_flight: int = 64  # C through a coalescing client
    sharing_seconds: float = 3.0  # each window of Q

    @classmethod
    def for_scale(cls, quick: bool) -> Sizes:
        """The CI size (``quick``) or the full size."""
        if quick:
            return cls(raw=200, round_trips=60, batch_keys=200, put_single=30, put_batched=200, pbkdf2=10, in_flight=4,
                       gateway_requests=40, coalesced_in_flight=16, sharing_seconds=3.0)  # fmt: skip
        return cls(raw=5000, round_trips=2000, batch_keys=20000, put_single=1000, put_batched=10000, pbkdf2=200,
                   in_flight=8, gateway_requests=3000, coalesced_in_flight=64, sharing_seconds=20.0)  # fmt: skip


# -- in-process baselines --------------------------------------------------------------------------


def measure_raw_hsm(hsm: Any, handle: Any, count: int) -> dict[str, Any]:
    """A: one key at a time, exactly the HSM calls of a data key (no batching helpers, no queue, no DB)."""
    for _ in range(20):
        hsm.generate_data_key(handle, readable=True)[1].wipe()
    latencies = []
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        t = time.perf_counter()
        _, plaintext = hsm.generate_data_key(handle, readable=True)
        plaintext.wipe()
        latencies.append(time.perf_counter() - t)
    cpu_ms = round((time.process_time() - cpu) * 1000 / count, 4)
    per_item = {"client": cpu_ms, "total": cpu_ms}
    return {**summarize(count, time.perf_counter() - start, latencies), "cpu_ms_per_item": per_item}


def measure_rewrap(svc: Any, root_key_id: str) -> dict[str, Any]:
    """R: ``kmsq root-key rewrap`` of every row stored under the bench root key (the E runs stored them),
    after a rotation, in this process: per row an unwrap and a wrap inside the HSM and an update, in batches
    of 500 rows per transaction. Latency is per batch."""
    svc.rotate_root_key(root_key_id)
    batches: list[float] = []
    last = [time.perf_counter()]

    def tick(_total: int, _handled: int) -> None:
        now = time.perf_counter()
        batches.append(now - last[0])
        last[0] = now

    start = time.perf_counter()
    summary = svc.rewrap_stored(root_key_id, progress=tick)
    return summarize(summary.rewrapped, time.perf_counter() - start, batches) | {"failed": len(summary.failures)}


def measure_pbkdf2_ccm(count: int) -> dict[str, Any]:
    """F: the replaced system's encryption, per item (OpenSSL through Python, one process)."""
    latencies = []
    start = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        password, salt, iv = secrets.token_bytes(32), secrets.token_bytes(8), secrets.token_bytes(13)
        key = hashlib.pbkdf2_hmac("sha256", password, salt, 10_000, 32)
        AESCCM(key, tag_length=8).encrypt(iv, b"xprv" + secrets.token_bytes(100), None)
        latencies.append(time.perf_counter() - t)
    return summarize(count, time.perf_counter() - start, latencies)


# -- through the queue -----------------------------------------------------------------------------


def run_window(
    total: int,
    in_flight: int,
    start: Callable[[int], Future[Any]],
    items_per_call: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Keeps ``in_flight`` calls outstanding until ``total`` calls completed; each call counts as
    ``items_per_call`` items; ``progress`` is told the calls completed so far. Raises whatever a call raised."""
    latencies: list[float] = []
    started_at: dict[Future[Any], float] = {}
    sent = 0
    begin = time.perf_counter()
    while sent < min(in_flight, total):
        future = start(sent)
        started_at[future] = time.perf_counter()
        sent += 1
    while started_at:
        done, _ = wait(list(started_at), timeout=120, return_when=FIRST_COMPLETED)
        if not done:
            raise TimeoutError("no reply within 120 s")
        for future in done:
            future.result()
            latencies.append(time.perf_counter() - started_at.pop(future))
            if sent < total:
                nxt = start(sent)
                started_at[nxt] = time.perf_counter()
                sent += 1
        if progress is not None:
            progress(len(latencies))
    return summarize(total * items_per_call, time.perf_counter() - begin, latencies)


class NoopChannel:
    """B's client: sends ``kmsq.noop`` tasks and consumes their bare replies on its own reply queue."""

    def __init__(self, broker_url: str, caller: str, namespace: str | None) -> None:
        from kombu.entity import Queue
        from kombu.messaging import Consumer

        from tasks import rabbitmq
        from tasks.app import broker_connection, make_app
        from worker.config import is_rabbitmq

        self.app = make_app(broker_url, "kmsq-bench", namespace)
        self.queue = reply_queue_for(caller, f"noop-{secrets.token_hex(4)}")
        self.pending: dict[str, Future[None]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.conn = broker_connection(broker_url, namespace)
        if is_rabbitmq(broker_url):  # the queues as kmsq's workers and callers declare them there
            self.app.amqp.queues.add(rabbitmq.pool_queue_entity(pool_queue(POOL)))
            queue = rabbitmq.reply_queue_entity(self.queue)
        else:
            queue = Queue(self.queue, durable=True, auto_delete=False, routing_key=self.queue)
        self.consumer = Consumer(self.conn, [queue], callbacks=[self._on_message], accept=["json"], no_ack=True)
        self.consumer.consume()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _on_message(self, body: Any, message: Any) -> None:
        with self.lock:
            future = self.pending.pop(str(body.get("noop")), None)
        if future is not None:
            future.set_result(None)

    def _drain(self) -> None:
        while not self.stop.is_set():
            try:
                self.conn.drain_events(timeout=0.5)
            except TimeoutError:
                continue

    def call(self, _: int) -> Future[None]:
        """Sends one no-op task; the future completes when its reply arrived."""
        task_id = str(uuid.uuid4())
        future: Future[None] = Future()
        with self.lock:
            self.pending[task_id] = future
        self.app.send_task("kmsq.noop", args=[], task_id=task_id, queue=pool_queue(POOL), reply_to=self.queue,
                           ignore_result=True)  # fmt: skip
        return future

    def close(self) -> None:
        """Stops consuming."""
        self.stop.set()
        self.thread.join(timeout=5)
        self.consumer.cancel()
        self.conn.release()


def worker_rss(process: subprocess.Popen[bytes]) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS in KiB of the worker's pool processes (its children)."""
    out: dict[str, int] = {"peak_kib": 0, "rss_kib": 0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != process.pid:
                continue
            fields = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
        except (OSError, ValueError):
            continue
        out["peak_kib"] = max(out["peak_kib"], int(fields["VmHWM"].split()[0]))
        out["rss_kib"] = max(out["rss_kib"], int(fields["VmRSS"].split()[0]))
    return out


def measure_request_work(svc: Any, client: Any, root_key: str, count: int, cache_seconds: float) -> dict[str, Any]:
    """W: the CPU of C's own work with no messaging, in this process: build and sign the request, the
    worker's handling (verify, authorize, HSM, Postgres commit, seal, sign) and the client's verify and
    unseal. With B's CPU per round trip, it bounds C/B when the machine is CPU-bound: B / (B + W)."""
    from datetime import timedelta

    from schemas.messages import ReplyEnvelope
    from schemas.wire import task_name
    from worker.config import load_settings
    from worker.fleet import load_fleet_key
    from worker.operators import read_pinned
    from worker.pipeline import Inbound, WorkerContext, handle
    from worker.policy import TrustedRows
    from worker.storage.db import transaction

    with transaction(svc.sessions) as db:
        fleet = load_fleet_key(svc.hsm, db, POOL)
    pinned = read_pinned(load_settings().operator_set_file).digest
    rows = TrustedRows(svc.hsm, cache_seconds, operators=pinned)  # as in a worker process
    ctx = WorkerContext(svc.hsm, svc.sessions, POOL, fleet, rows, timedelta(seconds=300))
    params = {"op": "generate_data_key", "root_key_id": root_key, "key_spec": "AES-256"}

    def one() -> None:
        request, args = client.build_request(params, POOL)
        delivery = handle(
            ctx, Inbound(task_name("generate_data_key"), request.reply_queue, str(request.request_id), args)
        )
        client.unseal(client.verify_envelope(ReplyEnvelope.model_validate(delivery.envelope)), request.request_id)

    for _ in range(min(100, count)):
        one()
    started = time.process_time()
    for _ in range(count):
        one()
    return {"count": count, "cpu_ms_per_item": round((time.process_time() - started) * 1000 / count, 3)}


def measure_audit_append(svc: Any, root_key: str, count: int) -> dict[str, Any]:
    """What the audit chain costs a request, in this process: ``count`` transactions that insert a request
    record as a request does, alternating with ``count`` that also append its audit record (the head's row
    locked, the record hashed and MACed in the HSM, inserted and the head moved), on the bench database and
    token. Returns the CPU and wall milliseconds of each kind and the append's share (the difference).
    (The worker itself cannot be told to skip the chain: this is how its cost is measured.)"""
    from worker import audit_log
    from worker.storage.db import transaction
    from worker.storage.repo import RequestRepository

    cpu = {"record": 0.0, "record_and_append": 0.0}
    wall = dict(cpu)

    def one(kind: str) -> None:
        request_id = str(uuid.uuid4())
        started, started_cpu = time.perf_counter(), time.process_time()
        with transaction(svc.sessions) as db:
            RequestRepository(db).record("bench-audit", request_id, "0" * 64, "generate_data_key", "{}")
            if kind == "record_and_append":
                audit_log.append(svc.hsm, db, POOL, actor="bench-audit", action="generate_data_key", outcome="ok",
                                 root_key_id=root_key, root_key_version=1, request_id=request_id)  # fmt: skip
        cpu[kind] += time.process_time() - started_cpu
        wall[kind] += time.perf_counter() - started

    for _ in range(min(50, count)):  # warm up both paths
        one("record")
        one("record_and_append")
    cpu = dict.fromkeys(cpu, 0.0)
    wall = dict.fromkeys(wall, 0.0)
    for _ in range(count):
        one("record")
        one("record_and_append")
    out: dict[str, Any] = {"count": count}
    for kind in cpu:
        out[kind] = {"cpu_ms": round(cpu[kind] * 1000 / count, 3), "wall_ms": round(wall[kind] * 1000 / count, 3)}
    out["append"] = {key: round(out["record_and_append"][key] - out["record"][key], 3) for key in ("cpu_ms", "wall_ms")}
    return out


def start_worker(
    concurrency: int, log: Path, env: dict[str, str], broker_url: str, namespace: str | None
) -> subprocess.Popen[bytes]:
    """Starts the benchmark's worker of pool ``bench`` (``kmsq worker`` plus the no-op task of B:
    :mod:`kmsq.bench_worker`) and waits until it answers a no-op task. Raises RuntimeError."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kmsq.bench_worker", "--pool", POOL, "--concurrency", str(concurrency),
             "--loglevel", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    ping = NoopChannel(broker_url, "bench", namespace)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the bench worker exited with {process.returncode}; see {log}")
            try:
                ping.call(0).result(timeout=1)
                return process
            except TimeoutError:
                continue
    finally:
        ping.close()
    stop_worker(process)
    raise RuntimeError(f"the bench worker did not start; see {log}")


def queue_measurements(
    client: Any, broker_url: str, sizes: Sizes, root_key: str, worker: subprocess.Popen[bytes] | None = None,
    *, b_to_d_only: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """B-E and S with whatever workers are running (B and C with their CPU per round trip when ``worker`` is given);
    with ``b_to_d_only``, B, C and D alone (the broker comparison)."""
    meter = CpuMeter(worker, broker_url)
    noop = NoopChannel(broker_url, client.identity.caller, client.namespace)
    try:
        run_window(20, sizes.in_flight, noop.call)
        b = meter.measure(sizes.round_trips, lambda: run_window(sizes.round_trips, sizes.in_flight, noop.call))
    finally:
        noop.close()

    def generate(_: int) -> Future[Any]:
        future: Future[Any] = client.submit_generate_data_key(root_key)
        return future

    run_window(20, sizes.in_flight, generate)
    c = meter.measure(sizes.round_trips, lambda: run_window(sizes.round_trips, sizes.in_flight, generate))
    shed = None
    if not b_to_d_only:
        shed = meter.measure(sizes.round_trips, lambda: shed_bad_signatures(client, sizes.round_trips, root_key))
    d = {}
    for size in BATCH_SIZES:
        calls = max(2, min(sizes.round_trips, sizes.batch_keys // size))

        def batch(_: int, n: int = size) -> Future[Any]:
            future: Future[Any] = client.submit_generate_data_keys(n, root_key)
            return future

        def window(c: int = calls, b: Callable[[int], Future[Any]] = batch, n: int = size) -> dict[str, Any]:
            return run_window(c, sizes.in_flight, b, n)

        d[str(size)] = meter.measure(calls * size, window)
    if b_to_d_only:
        return {"B_noop_round_trip": b, "C_generate_data_key": c, "D_generate_data_keys": d}
    pubs = f"bench-{secrets.token_hex(4)}"

    def put_one(i: int) -> Future[Any]:
        future: Future[Any] = client.submit_put_key(
            f"{pubs}-s{i}", "xprv" + secrets.token_hex(50), "btc", "user", "independent", root_key
        )
        return future

    def put_batch(i: int, n: int = 100) -> Future[Any]:
        items = [{"pub": f"{pubs}-b{i}-{j}", "prv": "xprv" + secrets.token_hex(50), "coin": "btc", "source": "user",
                  "type": "independent"} for j in range(n)]  # fmt: skip
        future: Future[Any] = client.submit_put_keys(items, root_key)
        return future

    e_single = run_window(sizes.put_single, sizes.in_flight, put_one)
    e_batch = run_window(max(2, sizes.put_batched // 100), sizes.in_flight, put_batch, 100)
    return {"B_noop_round_trip": b, "C_generate_data_key": c, "D_generate_data_keys": d,
            "E_put_key_single": e_single, "E_put_keys_batch_100": e_batch, "S_shed_bad_signature": shed}  # fmt: skip


def measure_coalesced_singles(
    client: Any, sizes: Sizes, root_key: str, worker: subprocess.Popen[bytes], broker_url: str
) -> dict[str, Any]:
    """C through a coalescing client (``client``) with ``coalesced_in_flight`` requests outstanding: what an
    asynchronous producer with many requests in flight gets."""
    meter = CpuMeter(worker, broker_url)

    def generate(_: int) -> Future[Any]:
        future: Future[Any] = client.submit_generate_data_key(root_key)
        return future

    run_window(sizes.coalesced_in_flight, sizes.coalesced_in_flight, generate)
    total = max(sizes.round_trips, 4 * sizes.coalesced_in_flight)
    result = meter.measure(total, lambda: run_window(total, sizes.coalesced_in_flight, generate))
    return {**result, "in_flight": sizes.coalesced_in_flight, "batches": client.coalescer.batches_sent}


def shed_bad_signatures(client: Any, count: int, root_key: str) -> dict[str, Any]:
    """S: how fast the pool sheds messages whose signature does not verify (no reply, counted). Publishes
    ``count`` of them, then one valid request behind them; done when its reply arrives."""
    pool = client.pool_for(root_key)
    forged = []
    for _ in range(count):
        request, args = client.build_request(
            {"op": "generate_data_key_without_plaintext", "root_key_id": root_key}, pool
        )
        args[3] = ("B" if args[3][0] == "A" else "A") + args[3][1:]
        forged.append((request, args))
    begin = time.perf_counter()
    for request, args in forged:
        client.send(request, args)
    client.generate_data_key(root_key, with_plaintext=False)
    return summarize(count, time.perf_counter() - begin, [])


def rss_job(client: Any, root_key: str, total: int, process: subprocess.Popen[bytes], in_flight: int) -> dict[str, Any]:
    """A provisioning-style job of ``total`` keys (batches of 1000), sampling worker RSS once a second."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    begin = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            samples.append((round(time.perf_counter() - begin, 1), worker_rss(process)["rss_kib"]))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    calls = max(1, total // 1000)
    result = run_window(calls, in_flight, lambda _: client.submit_generate_data_keys(1000, root_key, False), 1000)
    stop.set()
    sampler.join()
    rss = [kib for _, kib in samples]
    warm = rss[len(rss) // 10 :] or rss
    return {
        **result,
        "rss_kib_samples": samples,
        "rss_mib_peak": round(worker_rss(process)["peak_kib"] / 1024, 1),
        "rss_mib_after_warmup_min": round(min(warm) / 1024, 1) if warm else None,
        "rss_mib_after_warmup_max": round(max(warm) / 1024, 1) if warm else None,
    }


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """C/B, D(1000)/A and E(batched)/F for each worker count, with the targets."""
    out: dict[str, Any] = {}
    a = report["A_raw_hsm"]["per_s"]
    f = report["F_pbkdf2_aes_ccm"]["per_s"]
    for workers, m in report["workers"].items():
        out[workers] = {
            "C_over_B": round(m["C_generate_data_key"]["per_s"] / m["B_noop_round_trip"]["per_s"], 3),
            "S_over_C": round(m["S_shed_bad_signature"]["per_s"] / m["C_generate_data_key"]["per_s"], 3),
            "D1000_over_A": round(m["D_generate_data_keys"]["1000"]["per_s"] / a, 3),
            "E_batched_over_F": round(m["E_put_keys_batch_100"]["per_s"] / f, 3),
        }
    work = report.get("W_request_work", {}).get("cpu_ms_per_item")
    append = report.get("W_audit_append", {}).get("append", {}).get("cpu_ms")
    if work and append is not None:
        out["audit_append_cpu_over_W_cpu"] = round(append / work, 3)  # the chain's share of C's own work
    for workers, m in report["workers"].items():
        b_cpu = m["B_noop_round_trip"].get("cpu_ms_per_item", {}).get("total")
        if work and b_cpu:
            # If every round trip costs B's CPU plus C's own work, and the cores are the limit.
            out[workers]["C_over_B_cpu_bound"] = round(b_cpu / (b_cpu + work), 3)
    if report.get("R_rewrap", {}).get("per_s"):
        out["R_over_A"] = round(report["R_rewrap"]["per_s"] / a, 3)
    for workers, m in report["workers"].items():
        out[workers] |= _cpu_ratios(report["A_raw_hsm"], m, report.get("K_raw_signing"))
    out["targets"] = {"C_over_B": ">= 0.7", "D1000_over_A": ">= 1.0", "E_batched_over_F": ">= 5",
                      "D1000_cpu_over_A_cpu": "<= 1.5", "C_cpu_over_B_cpu": "<= 1.3",
                      "G generateDataKey 256 on_over_off": ">= 8", "G generateDataKey 256 on_over_D100": ">= 0.5",
                      "G generateDataKey 256 p99 on_over_off": "<= 1"}  # fmt: skip
    return out


def _cpu_ratios(a: dict[str, Any], m: dict[str, Any], k_raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU per item against the baselines (noise moves them far less than wall-clock ratios), C coalesced
    against C, G's ratios, and the gateway's ETH signatures against K's raw loop, for one worker count."""

    def cpu(figures: dict[str, Any]) -> float | None:
        total = figures.get("cpu_ms_per_item", {}).get("total")
        return float(total) if total else None

    out: dict[str, Any] = {}
    a_cpu, b_cpu, c_cpu = cpu(a), cpu(m["B_noop_round_trip"]), cpu(m["C_generate_data_key"])
    raw_signing = cpu(k_raw) if k_raw else None
    d_cpu = cpu(m["D_generate_data_keys"]["1000"])
    if a_cpu and d_cpu:
        out["D1000_cpu_over_A_cpu"] = round(d_cpu / a_cpu, 3)
    if b_cpu and c_cpu:
        out["C_cpu_over_B_cpu"] = round(c_cpu / b_cpu, 3)
    coalesced = m.get("C_coalesced")
    if b_cpu and coalesced:
        out["C_coalesced_cpu_over_B_cpu"] = round(coalesced["cpu_ms_per_item"]["total"] / b_cpu, 3)
        out["C_coalesced_over_C"] = round(coalesced["per_s"] / m["C_generate_data_key"]["per_s"], 3)
    if "K_signing" in m:
        c = m["C_generate_data_key"]["per_s"]
        out["K_over_C"] = {name: round(cell["per_s"] / c, 3) for name, cell in m["K_signing"].items()
                           if isinstance(cell, dict)}  # fmt: skip
    if "G_gateway" in m:
        out["G"] = _gateway_ratios(m["G_gateway"], m["D_generate_data_keys"]["100"]["per_s"])
        signing = m["G_gateway"]["on"].get("signEth", {}).get("256")
        if raw_signing and signing:  # what one signature costs the whole path, beside the raw loop
            out["K_signEth256_cpu_over_raw"] = round((cpu(signing) or 0) / raw_signing, 3)
    return out


def _gateway_ratios(g: dict[str, Any], d100: float) -> dict[str, Any]:
    """Per endpoint and client count: throughput and CPU per request with coalescing on over off, p99 on over
    off; for generateDataKey at the most clients, throughput over D x100."""
    out: dict[str, Any] = {}
    for endpoint, cells in g["on"].items():
        for clients, on in cells.items():
            off = g["off"][endpoint][clients]
            out[f"{endpoint} {clients} on_over_off"] = round(on["per_s"] / off["per_s"], 3)
            out[f"{endpoint} {clients} p99 on_over_off"] = round(on["p99_ms"] / off["p99_ms"], 3)
            out[f"{endpoint} {clients} cpu on_over_off"] = round(
                on["cpu_ms_per_item"]["total"] / off["cpu_ms_per_item"]["total"], 3
            )
    most = max(g["on"]["generateDataKey"], key=int)
    out[f"generateDataKey {most} on_over_D100"] = round(g["on"]["generateDataKey"][most]["per_s"] / d100, 3)
    signing = g["on"].get("signEth", {})
    if "1" in signing and "256" in signing:  # issue 26: 256 concurrent BitGo clients >= 8x one
        out["signEth 256_over_1"] = round(signing["256"]["per_s"] / signing["1"]["per_s"], 3)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput against batch size, one line per worker count, with A and F as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for workers, m in report["workers"].items():
        ys = [m["D_generate_data_keys"][str(s)]["per_s"] for s in BATCH_SIZES]
        left.plot(BATCH_SIZES, ys, marker="o", label=f"D generate_data_keys, {workers} worker process(es)")
    left.axhline(report["A_raw_hsm"]["per_s"], color="grey", linestyle="--", label="A raw HSM loop (1 process)")
    left.set_xscale("log")
    left.set_xlabel("batch size (keys per message)")
    left.set_ylabel("data keys per second")
    left.set_title("Batched generate_data_keys vs the raw HSM")
    left.legend(fontsize=8)
    labels = ["B noop", "C single", "D batch 1000", "E put single", "E put batch 100"]
    keys = ["B_noop_round_trip", "C_generate_data_key", None, "E_put_key_single", "E_put_keys_batch_100"]
    width = 0.38
    for k, (workers, m) in enumerate(report["workers"].items()):
        values = [m[key]["per_s"] if key else m["D_generate_data_keys"]["1000"]["per_s"] for key in keys]
        right.bar([i + k * width for i in range(len(labels))], values, width, label=f"{workers} worker process(es)")
    right.axhline(report["F_pbkdf2_aes_ccm"]["per_s"], color="red", linestyle=":", label="F PBKDF2+AES-CCM (1 process)")
    right.set_xticks([i + width / 2 for i in range(len(labels))], labels, fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("items per second (log)")
    right.set_title("End to end, by worker processes")
    right.legend(fontsize=8)
    fig.suptitle(report["machine"]["summary"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    gateway = next((m["G_gateway"] for m in report["workers"].values() if "G_gateway" in m), None)
    if gateway is not None:
        plot_gateway(gateway, report, path.with_name(path.stem + "-gateway.png"))


def plot_gateway(g: dict[str, Any], report: dict[str, Any], path: Path) -> None:
    """G: throughput and p99 latency against concurrent HTTP clients, coalescing off and on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, style in (("off", "--"), ("on", "-")):
        for n, (endpoint, cells) in enumerate(g[mode].items()):
            clients = sorted(cells, key=int)
            xs = [int(c) for c in clients]
            look = {"color": f"C{n}", "marker": "o", "label": f"{endpoint}, coalescing {mode}"}
            left.plot(xs, [cells[c]["per_s"] for c in clients], style, **look)
            right.plot(xs, [cells[c]["p99_ms"] for c in clients], style, **look)
    workers = max(report["workers"], key=int)
    d100 = report["workers"][workers]["D_generate_data_keys"]["100"]["per_s"]
    left.axhline(d100, color="grey", linestyle=":", label=f"D generate_data_keys x100 ({workers} worker processes)")
    for axis, ylabel in ((left, "HTTP requests per second"), (right, "p99 latency, ms (log)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent HTTP clients (closed loop)")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=7)
    right.set_yscale("log")
    left.set_title("kmsq gateway: throughput against concurrent clients")
    right.set_title("kmsq gateway: p99 latency against concurrent clients")
    fig.suptitle(report["machine"]["summary"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    info["summary"] = f"{cpu}, {info['cores']} cores, Python {info['python']}"
    return info


def compare_broker(
    other_url: str, redis_figures: dict[str, Any], workers: int, parts: tuple[Any, ...], log: Callable[[str], None]
) -> dict[str, Any]:
    """B, C, D and G again with the workers and callers on the broker ``other_url`` (RabbitMQ), in this run; returns
    its figures and, per figure, its items/s over the first broker's (``redis_figures``, measured just before)."""
    from kmsq.bench_gateway import measure_gateway
    from tasks.client import KmsClient
    from worker.config import redact_url

    settings, identity, fleet, root_id, sizes, env, files, out_dir = parts
    env = env | {"KMSQ_BROKER_URL": other_url}
    log(f"B, C, D and G on {redact_url(other_url)} with {workers} worker process(es)")
    process = start_worker(workers, out_dir / "bench-worker-other.log", env, other_url, settings.namespace)
    try:
        with KmsClient(other_url, identity, fleet, timeout=120, namespace=settings.namespace) as client:
            measured = queue_measurements(client, other_url, sizes, root_id, process, b_to_d_only=True)
            measured["G_gateway"] = measure_gateway(client, root_id, process, other_url, files, env, out_dir,
                                                    sizes.gateway_requests, log)  # fmt: skip
    finally:
        stop_worker(process)
    kept = {key: measured[key] for key in ("B_noop_round_trip", "C_generate_data_key", "D_generate_data_keys",
                                           "G_gateway")}  # fmt: skip

    def ratio(new: dict[str, Any], old: dict[str, Any]) -> float | None:
        return round(new["per_s"] / old["per_s"], 3) if old.get("per_s") else None

    ratios = {"B": ratio(kept["B_noop_round_trip"], redis_figures["B_noop_round_trip"]),
              "C": ratio(kept["C_generate_data_key"], redis_figures["C_generate_data_key"])}  # fmt: skip
    for size, figures in kept["D_generate_data_keys"].items():
        ratios[f"D{size}"] = ratio(figures, redis_figures["D_generate_data_keys"][size])
    for mode, endpoints in kept["G_gateway"].items():
        for endpoint, cells in endpoints.items():
            for clients, figures in cells.items():
                ratios[f"G_{mode}_{endpoint}_{clients}"] = ratio(
                    figures, redis_figures["G_gateway"][mode][endpoint][clients]
                )
    return {"broker": redact_url(other_url), "workers": workers, "figures": kept, "over_first_broker": ratios}


def run_bench(
    quick: bool,
    worker_counts: list[int],
    rss_keys: int,
    out_dir: Path,
    log: Callable[[str], None],
    other_broker: str | None = None,
) -> dict[str, Any]:
    """Sets up the bench pool, caller and root key, measures A-F, writes bench.json and bench.png. With
    ``other_broker``, B, C, D and G are measured again on that broker (:func:`compare_broker`)."""
    import json

    from kmsq.bench_gateway import measure_gateway
    from kmsq.bench_lanes import measure_sharing
    from kmsq.bench_signing import measure_raw_signing, measure_signing
    from tasks.client import KmsClient
    from worker import service
    from worker.storage.db import transaction

    pool_setup = set_up_pool("bench", POOL, "bench")
    settings, svc, identity = pool_setup.settings, pool_setup.service, pool_setup.identity
    identity_file, fleet, root_id = pool_setup.identity_file, pool_setup.fleet, pool_setup.root_key_id
    sizes = Sizes.for_scale(quick)
    with transaction(svc.sessions) as db:
        version = service.wrapping_version(db, root_id, POOL)
    report: dict[str, Any] = {"machine": machine(), "sizes": sizes.__dict__, "root_key": root_id, "workers": {}}
    log(f"A raw HSM loop ({sizes.raw} keys)")
    report["A_raw_hsm"] = measure_raw_hsm(svc.hsm, service.hsm_handle(version), sizes.raw)
    log(f"K raw ETH hash signatures in this process ({sizes.raw // 4})")
    report["K_raw_signing"] = measure_raw_signing(svc, root_id, POOL, max(50, sizes.raw // 4))
    log(f"F PBKDF2-HMAC-SHA256 x10000 + AES-CCM ({sizes.pbkdf2} encryptions)")
    report["F_pbkdf2_aes_ccm"] = measure_pbkdf2_ccm(sizes.pbkdf2)
    svc.engine.dispose()
    env = {**os.environ, "KMSQ_DEFAULT_POOL": POOL}
    out_dir.mkdir(parents=True, exist_ok=True)
    fleet_file = out_dir / "bench-fleet.json"
    fleet_file.write_text(json.dumps(svc.fleet_document() | {"default_pool": POOL}, indent=2) + "\n", encoding="utf-8")
    for count in worker_counts:
        log(f"B-E with {count} worker process(es)")
        log_file = out_dir / "bench-worker.log"
        process = start_worker(count, log_file, env, settings.effective_broker_url, settings.namespace)
        try:
            with KmsClient(
                settings.effective_broker_url, identity, fleet, timeout=120, namespace=settings.namespace
            ) as client:
                measured = queue_measurements(client, settings.effective_broker_url, sizes, root_id, process)
                if count == max(worker_counts):
                    log(f"C through a coalescing client, {sizes.coalesced_in_flight} in flight")
                    with KmsClient(settings.effective_broker_url, identity, fleet, timeout=120,
                                   namespace=settings.namespace, coalesce=True) as coalescing:  # fmt: skip
                        measured["C_coalesced"] = measure_coalesced_singles(
                            coalescing, sizes, root_id, process, settings.effective_broker_url
                        )
                    measured["G_gateway"] = measure_gateway(
                        client, root_id, process, settings.effective_broker_url, (identity_file, fleet_file), env,
                        out_dir, sizes.gateway_requests, log,
                    )  # fmt: skip
                    measured["K_signing"] = measure_signing(
                        client, root_id, sizes.round_trips, sizes.in_flight, run_window, log
                    )
                    log("W: C's own work without messaging, in this process")
                    report["W_request_work"] = measure_request_work(
                        svc, client, root_id, sizes.round_trips // 2, settings.cache_seconds
                    )
                    log("W: the audit chain's append, in this process")
                    report["W_audit_append"] = measure_audit_append(svc, root_id, sizes.round_trips // 2)
                rss = worker_rss(process)
                measured["worker_rss"] = {
                    "peak_mib": round(rss["peak_kib"] / 1024, 1),
                    "rss_mib": round(rss["rss_kib"] / 1024, 1),
                }
                if rss_keys and count == max(worker_counts):
                    log(f"provisioning job of {rss_keys} keys, sampling worker RSS")
                    measured["rss_job"] = rss_job(client, root_id, rss_keys, process, sizes.in_flight)
                report["workers"][str(count)] = measured
        finally:
            stop_worker(process)
    log("Q: sharing the pool: lanes under a provisioning job, and quotas")
    report["Q_sharing"] = measure_sharing((settings, svc, identity, fleet, root_id, POOL, env), sizes.sharing_seconds,
                                          out_dir, log)  # fmt: skip
    if other_broker:
        parts = (settings, identity, fleet, root_id, sizes, env, (identity_file, fleet_file), out_dir)
        most = str(max(worker_counts))
        report["broker_comparison"] = compare_broker(other_broker, report["workers"][most], max(worker_counts),
                                                     parts, log)  # fmt: skip
    log("R: rewrap every stored row of the bench root key after a rotation")
    report["R_rewrap"] = measure_rewrap(svc, root_id)
    svc.engine.dispose()
    report["ratios"] = ratios(report)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, out_dir / "bench.png")
    return report
