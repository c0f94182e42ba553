"""Prometheus metrics of a worker, correct with Celery's prefork pool, and its health endpoint.

``kmsq worker --metrics-port PORT`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before anything
imports prometheus_client (:func:`prepare`): each pool process then writes its samples to files of its own
there, and the worker's main process serves them summed (prometheus_client's multiprocess mode) on
``/metrics``, with ``/healthz`` (the process, the token and the database) next to it.

Label values are bounded: ``op`` is a protocol operation or ``other``, ``outcome`` ``ok`` or an error code,
so nobody can grow the series by sending odd messages.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from schemas.operations import OPS
from schemas.wire import ERROR_CODES, LANES

log = logging.getLogger("kmsq.worker")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_OPS = frozenset(OPS)
_OUTCOMES = frozenset({"ok", *ERROR_CODES})
UNKNOWN_CALLER = "?"  # the caller label of a message that did not authenticate (no registered name is "?")


def prepare(directory: Path) -> None:
    """Empties ``directory`` and makes this process (and the pool processes it forks) write metrics there.
    Call before anything imports prometheus_client."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(directory)


def enabled() -> bool:
    """True in a worker started with ``--metrics-port``."""
    return bool(os.environ.get(MULTIPROC_ENV))


def op_label(task_name: str) -> str:
    """The ``op`` label of a task name: a protocol operation, or ``other``."""
    op = task_name.removeprefix("kmsq.")
    return op if op in _OPS else "other"


def outcome_label(code: str | None) -> str:
    """The ``outcome`` label: ``ok`` or an error code (anything else is ``internal``)."""
    outcome = code or "ok"
    return outcome if outcome in _OUTCOMES else "internal"


class WorkerMetrics:
    """The metrics a pool process records (created lazily: only workers with ``--metrics-port`` import
    prometheus_client)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        labels = ("pool", "op")
        laned = (*labels, "lane")
        self.requests = Counter("kmsq_requests", "Requests handled, by lane and outcome", (*laned, "outcome"))
        self.queue_wait = Histogram(
            "kmsq_request_queue_wait_seconds", "From the request's issued_at to a worker taking it", laned,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.service_time = Histogram(
            "kmsq_request_service_seconds", "A worker's time on one request (HSM, database, reply)", laned,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.retries = Counter("kmsq_retries", "Requests retried after the HSM or database was unavailable", labels)
        self.batch_items = Histogram("kmsq_batch_items", "Items per batch message", labels, buckets=BATCH_BUCKETS)
        per_caller = ("pool", "lane", "caller")
        self.caller_requests = Counter("kmsq_caller_requests", "Requests handled per caller, by outcome",
                                       (*per_caller, "outcome"))  # fmt: skip
        self.caller_items = Counter("kmsq_caller_items", "Items handled per caller (a single request is one)",
                                    per_caller)  # fmt: skip
        self.hsm_errors = Counter("kmsq_hsm_errors", "HSM calls that failed as unavailable", ("pool",))
        self.hsm_reopens = Counter("kmsq_hsm_session_reopens", "PKCS#11 sessions reopened or recycled", ("pool",))
        self._seen: dict[str, int] = {}

    def handled(self, pool: str, task_name: str, code: str | None, issued_at: datetime | None, items: int | None,
                started: float, service_seconds: float, lane: str = "interactive",
                caller: str | None = None) -> None:  # fmt: skip
        """Records one handled request, taken from ``lane``, of the authenticated ``caller`` (None: not
        authenticated, counted as ``?``)."""
        op, outcome = op_label(task_name), outcome_label(code)
        lane = lane if lane in LANES else "interactive"
        self.requests.labels(pool, op, lane, outcome).inc()
        self.service_time.labels(pool, op, lane).observe(service_seconds)
        if issued_at is not None:
            wait = datetime.now(UTC).timestamp() - (time.monotonic() - started) - issued_at.timestamp()
            self.queue_wait.labels(pool, op, lane).observe(max(0.0, wait))
        if items is not None:
            self.batch_items.labels(pool, op).observe(items)
        who = caller or UNKNOWN_CALLER
        self.caller_requests.labels(pool, lane, who, outcome).inc()
        self.caller_items.labels(pool, lane, who).inc(items or 1)

    def retried(self, pool: str, task_name: str) -> None:
        """Records a retry."""
        self.retries.labels(pool, op_label(task_name)).inc()

    def hsm_counts(self, pool: str, errors: int, reopens: int) -> None:
        """Adds what the HSM adapter counted since the last call (its counters only grow)."""
        for name, counter, value in (("errors", self.hsm_errors, errors), ("reopens", self.hsm_reopens, reopens)):
            delta = value - self._seen.get(name, 0)
            if delta > 0:
                counter.labels(pool).inc(delta)
            self._seen[name] = value


def process_dead(pid: int) -> None:
    """Tells the multiprocess collector that a pool process ended (its live gauges go)."""
    if enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


# -- the main process's endpoint ----------------------------------------------------------------------------


class HeadAges:
    """How long the oldest message of a RabbitMQ queue has waited, at most, from what this process saw: RabbitMQ
    shows no message of a quorum queue without delivering it (no ``head_message_timestamp`` either).

    Queues are first in, first out: every message still waiting was sent after the last one this process took
    from the queue (:meth:`taken`, its publisher's ``kmsq_sent_at``), and after the last moment the queue was seen
    empty. So its age is at most the time since the later of the two: exact when the workers are taking messages,
    growing when they are not. A worker's main process records what its consumer receives; with several workers,
    the smallest of their figures is the tightest bound. A message sent again (after a worker's loss) can be
    older than the bound says; the header is unsigned, so it serves the metric only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._after: dict[str, float] = {}  # queue -> a time every waiting message was sent after (epoch s)

    def taken(self, queue: str, sent_at: object) -> None:
        """Notes that a message sent at ``sent_at`` (epoch seconds; anything else, or a time ahead of this
        clock, is ignored) was taken from ``queue``."""
        if not isinstance(sent_at, int | float) or isinstance(sent_at, bool) or sent_at > time.time() + 5:
            return
        self._later(queue, float(sent_at))

    def seen(self, queue: str, depth: int) -> float | None:
        """Returns the bound in seconds for ``queue`` with ``depth`` messages waiting now: 0.0 when it is empty,
        None when nothing was seen yet to bound it."""
        now = time.time()
        if depth == 0:
            self._later(queue, now)
            return 0.0
        with self._lock:
            after = self._after.get(queue)
        return None if after is None else max(0.0, now - after)

    def _later(self, queue: str, moment: float) -> None:
        with self._lock:
            self._after[queue] = max(moment, self._after.get(queue, moment))


HEADS = HeadAges()  # this process's (a worker's main process: its consumer and its /metrics share it)


def queue_sampler(broker_url: str, namespace: str | None, queue: str) -> Callable[[], tuple[int, float | None]]:
    """Returns a function giving the queue's depth and the age in seconds of its oldest message. On Redis the
    age is read from that message's signed ``issued_at`` (None when the queue is empty or the message is not a
    kmsq request: the gauge shows 0); on RabbitMQ it is :data:`HEADS`'s bound (0.0 when the queue is empty, None
    when unknown: the gauge is left out). It keeps one broker connection, reopened after a failure."""
    from tasks import rabbitmq
    from tasks.app import broker_connection
    from worker.config import is_rabbitmq

    state: dict[str, Any] = {}
    lock = threading.Lock()
    rabbit = is_rabbitmq(broker_url)

    def sample() -> tuple[int, float | None]:
        with lock:
            try:
                if "channel" not in state:
                    state["connection"] = broker_connection(broker_url, namespace)
                    state["channel"] = state["connection"].default_channel
                channel = state["channel"]
                if rabbit:  # RabbitMQ shows no message without delivering it: the depth, and a bound of the age
                    depth = rabbitmq.queue_depth(channel, queue)
                    return depth, HEADS.seen(queue, depth)
                depth = int(channel._size(queue))  # kombu sums the priority lists (keys prefixed for us)
                raw = channel.client.lindex((channel.global_keyprefix or "") + queue, -1)  # oldest: BRPOP side
            except Exception:
                connection = state.pop("connection", None)
                state.pop("channel", None)
                if connection is not None:
                    connection.release()
                raise
        return depth, _age(raw)

    sample.age_may_be_unknown = rabbit  # type: ignore[attr-defined]
    return sample


def _age(raw: bytes | None) -> float | None:
    """Seconds since the ``issued_at`` of the request in a kombu Redis payload, or None."""
    import base64

    from schemas.wire import from_b64u

    if raw is None:
        return None
    try:
        payload = json.loads(raw)
        body = json.loads(base64.b64decode(payload["body"]))
        request = json.loads(from_b64u(body[0][2], max_len=16 * 1024 * 1024))
        issued = datetime.fromisoformat(request["issued_at"])
    except Exception:  # anything else on the queue: no age (the worker drops it)
        return None
    return max(0.0, datetime.now(UTC).timestamp() - issued.timestamp())


Sampler = Callable[[], tuple[int, float | None]]


class QueueGauges:
    """Collects, at each scrape, the depth of each lane's queue the worker serves and the age of its oldest
    message (read from the broker by the worker's main process)."""

    def __init__(self, pool: str, samples: dict[str, Sampler]) -> None:
        self.pool = pool
        self.samples = samples  # lane -> its queue's sampler

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("kmsq_queue_depth", "Messages waiting in the pool's queue", labels=["pool", "lane"])
        age = GaugeMetricFamily(
            "kmsq_queue_oldest_message_age_seconds",
            "Age of the oldest waiting message (Redis: from its request's issued_at; RabbitMQ: at most this, from "
            "the messages this worker took); 0 when the queue is empty",
            labels=["pool", "lane"],
        )
        for lane, sample in self.samples.items():
            try:
                depth, oldest = sample()
            except Exception as e:  # the broker is down: the scrape still answers, without these two
                log.warning("metrics: cannot read the %s queue of pool %s (%s)", lane, self.pool, type(e).__name__)
                continue
            family.add_metric([self.pool, lane], depth)
            if oldest is None and getattr(sample, "age_may_be_unknown", False):  # RabbitMQ: unknown, not 0
                continue
            age.add_metric([self.pool, lane], oldest or 0.0)
        if family.samples:
            yield family
        if age.samples:
            yield age


def serve(
    host: str, port: int, pool: str, health: Callable[[], dict[str, str]], queues: dict[str, Sampler]
) -> ThreadingHTTPServer:
    """Serves ``/metrics`` (every pool process's samples, summed, and the queue gauges) and ``/healthz`` on a
    daemon thread. Returns the server (``shutdown()`` stops it)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(QueueGauges(pool, queues))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif self.path == "/healthz":
                checks = health()
                status = 200 if all(v == "ok" for v in checks.values()) else 503
                body = {"status": "ok" if status == 200 else "unavailable", "pool": pool, **checks}
                self._send(status, "application/json", json.dumps(body).encode())
            else:
                self._send(404, "text/plain", b"not found: /metrics and /healthz\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="kmsq-metrics", daemon=True).start()
    return server
