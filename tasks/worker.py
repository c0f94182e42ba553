"""The worker side of the queue: one thin Celery task per operation, and per-process setup.

:class:`PoolWorker` is one pool's worker, built by its entry point (``kmsq worker``) from the settings and the
pool it serves: its Celery app has one task per operation of ``schemas.operations``, each handing the message
to :func:`worker.pipeline.handle` and publishing the signed reply it returns to the request's reply queue; it
retries (with backoff) only when the HSM or the database is unavailable. The PKCS#11 session, the database
engine and the fleet keys are opened in each worker *child* process (``worker_process_init``), never in the
parent that forks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import billiard.pool  # type: ignore[import-untyped]
import billiard.process  # type: ignore[import-untyped]
from celery import Task, signals
from celery.exceptions import InvalidTaskError
from celery.signals import worker_process_init, worker_process_shutdown
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from celery.worker.request import Request as CeleryRequest
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.orm import Session

from schemas.operations import OPS
from schemas.wire import LANES, SENT_AT_HEADER, lane_of_queue, pool_queue, task_name
from tasks import metrics, rabbitmq
from tasks.app import make_app, reuse_redis_client
from tasks.transport import DROPPED
from worker import audit_log, policy_anchor, replication, retention, schedule
from worker.config import Settings, is_rabbitmq
from worker.errors import ServiceError
from worker.fleet import load_fleet_key
from worker.high_water import HighWater
from worker.operators import read_pinned
from worker.pipeline import Delivery, Inbound, WorkerContext, handle
from worker.policy import TrustedRows
from worker.record_stamps import StampVerifier
from worker.runtime import KeyService
from worker.service import RootKeyAccess
from worker.storage.db import transaction

log = logging.getLogger("kmsq.worker")
MAX_RETRIES = 5  # backoff 1, 2, 4, 8, 16 s: about 30 s, within the client's default 60 s timeout
# The longest delay a message's eta may impose: twice the backoff's longest step (our retries set eta).
MAX_ETA_SECONDS = 2 * 2 ** (MAX_RETRIES - 1)

# A pool process that exits (warm shutdown) first waits until the main process has read its last results,
# polling up to 300 times every 0.1 s. During a warm shutdown the main process no longer reads them, so one in
# five drains took 31 s instead of 2 (tests/test_queue_drain.py): past a 30 s grace period. A result the main
# process does not read leaves its message unacknowledged: it is restored, and a worker answers it again from
# the stored reply. Two seconds are enough for a main process that still reads.
billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = 20


class PoolWorker:
    """The worker of one pool: its Celery app, and in each pool process the context that
    :func:`worker.pipeline.handle` needs (opened on first use, after the fork).

    Celery's signals are process-wide: build one per process (the entry point does).
    """

    def __init__(self, settings: Settings, pool: str, lanes: tuple[str, ...] = LANES) -> None:
        self.settings = settings
        self.pool = pool
        # The queues it serves, interactive first: on Redis it always takes from the first that holds a message
        # (kombu's "priority" queue order); a worker of one lane serves one queue.
        self.queues = [pool_queue(pool, lane) for lane in LANES if lane in lanes]
        if not self.queues:
            raise ValueError(f"no lane among {', '.join(lanes)} (lanes: {', '.join(LANES)})")
        self.app = make_app(
            settings.effective_broker_url, namespace=settings.namespace,
            reply_queue_ttl_seconds=settings.reply_queue_ttl_seconds,
        )  # fmt: skip
        if is_rabbitmq(settings.effective_broker_url):
            self.app.conf.task_queues = [rabbitmq.pool_queue_entity(queue) for queue in self.queues]
        else:
            self.app.conf.broker_transport_options = {**self.app.conf.broker_transport_options,
                                                      "queue_order_strategy": "priority"}  # fmt: skip
        self._lock = threading.Lock()
        self._context: WorkerContext | None = None
        self._context_pid: int | None = None
        self._service: KeyService | None = None  # the context's HSM and database, closed when the process stops
        self._pruner: retention.Pruner | None = None
        self._replicator: replication.Replicator | None = None
        self._scheduler: schedule.Scheduler | None = None
        self._token_watch: TokenWatch | None = None
        # The Celery node name of this worker (kmsq worker sets it): the token watch tells that node to stop and
        # start consuming, through Celery's remote control.
        self.nodename: str | None = None
        self._metrics: metrics.WorkerMetrics | None = None
        for op in OPS:
            self._register(op)
        # Celery registers its built-in tasks (celery.group, celery.chain, celery.chord_unlock...) in every app;
        # a message naming one needs no signature. kmsq uses none of them: a worker serves only kmsq.* tasks.
        self.app.finalize()
        for name in [name for name in self.app.tasks if name.startswith("celery.")]:
            self.app.tasks.unregister(name)
        worker_process_init.connect(self._open_in_child, weak=False, dispatch_uid="kmsq-open-in-child")
        worker_process_shutdown.connect(self._close_in_child, weak=False, dispatch_uid="kmsq-close-in-child")
        signals.worker_shutdown.connect(self._forget_remote_control, weak=False, dispatch_uid="kmsq-pidbox")

    def context(self) -> WorkerContext:
        """Returns this process's worker context, opening the HSM session, database and fleet keys on first use.

        Raises ConfigError (no fleet key, bad configuration) or TransientError (HSM or database down).
        """
        with self._lock:
            if self._context is None or self._context_pid != os.getpid():
                service = KeyService.from_settings(self.settings)
                service.hsm.check()
                # Every caller, root key and pool row this process acts on must verify (worker.policy).
                rows = TrustedRows(service.hsm, self.settings.cache_seconds, _anchor_catch_up(service.hsm),
                                   operators=read_pinned(self.settings.operator_set_file).digest,
                                   high_water=HighWater(self.settings.home / "state" / HIGH_WATER_FILE))  # fmt: skip
                with transaction(service.sessions) as db:
                    fleet = load_fleet_key(service.hsm, db, self.pool, RootKeyAccess(rows))
                self._context = WorkerContext(
                    service.hsm, service.sessions, self.pool, fleet, rows,
                    timedelta(seconds=self.settings.clock_skew_seconds),
                    timedelta(seconds=self.settings.reply_grace_seconds),
                    _custody_gate(service.hsm, self.settings.min_tokens),
                )  # fmt: skip
                self._context_pid = os.getpid()
                self._service = service
            return self._context

    def _open_in_child(self, **_: Any) -> None:
        try:
            ctx = self.context()
            log.info("worker process %d serves pool %s", os.getpid(), ctx.pool)
        except Exception as e:  # the first task retries; the log says why
            log.error("worker process %d could not open its HSM session or database: %s", os.getpid(), e)
            return
        if getattr(billiard.process.current_process(), "index", 0) == 0:
            self._start_pruner(ctx)
            self._start_replicator(ctx)
            self._start_scheduler(ctx)
            self._start_token_watch(ctx)

    def _start_pruner(self, ctx: WorkerContext) -> None:
        """Prunes in the background of one pool process per worker (the first): request records, the pool's
        audit chain and, in the default pool, the chain of pool-less actions (see worker.retention)."""
        settings = self.settings
        if settings.prune_interval_seconds <= 0:
            return
        policy = retention.policy_of(settings)
        chains = [ctx.pool] + ([audit_log.GLOBAL_CHAIN] if ctx.pool == settings.default_pool else [])
        verifier = StampVerifier.of_fleet(ctx.hsm, ctx.fleet)

        def run() -> retention.PruneCounts:
            return retention.prune(
                ctx.hsm, ctx.sessions, policy, chains=chains, batch=settings.prune_batch, verifier=verifier
            )

        self._pruner = retention.Pruner(
            run, settings.prune_interval_seconds, lambda counts: retention.vacuum(ctx.sessions, counts)
        )
        self._pruner.start()

    def _start_replicator(self, ctx: WorkerContext) -> None:
        """Replicates keys between the deployment's tokens in the background of one pool process per worker (the
        first), when the token is a PKCS#11 one (worker.replication)."""
        from worker.hsm import Hsm

        interval = self.settings.replicate_interval_seconds
        if interval <= 0 or not isinstance(ctx.hsm, Hsm):
            return
        token = ctx.hsm

        def run() -> replication.Replication:
            with transaction(ctx.sessions) as db:
                return replication.replicate(token, db, policy_anchor.deployment_id(db))

        self._replicator = replication.Replicator(run, interval)
        self._replicator.start()

    def _start_scheduler(self, ctx: WorkerContext) -> None:
        """Carries out what falls due (worker.schedule: destructions after their wait) in the background of one
        pool process per worker (the first)."""
        interval = self.settings.schedule_interval_seconds
        pinned = ctx.rows.operators
        if interval <= 0 or pinned is None:
            return
        removed: set[str] = set()

        def run() -> schedule.ScheduleRun:
            return schedule.run(ctx.hsm, ctx.sessions, pinned, pool=ctx.pool, removed=removed)

        self._scheduler = schedule.Scheduler(run, interval)
        self._scheduler.start()

    def _start_token_watch(self, ctx: WorkerContext) -> None:
        """Watches the token from the first pool process (TokenWatch) when the worker has a node name."""
        from worker.hsm import Hsm

        nodename = self.nodename
        if nodename is None or not isinstance(ctx.hsm, Hsm):
            return
        queue, control = pool_queue(self.pool), self.app.control

        def consume(on: bool) -> None:
            if on:
                control.add_consumer(queue, destination=[nodename], reply=False)
            else:
                control.cancel_consumer(queue, destination=[nodename], reply=False)

        self._token_watch = TokenWatch(ctx.hsm.check, consume, self.pool)
        self._token_watch.start()

    def _close_in_child(self, **_: Any) -> None:
        if self._token_watch is not None:
            self._token_watch.stop()
        if self._replicator is not None:
            self._replicator.stop()
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._pruner is not None:
            self._pruner.stop()
        if self._context is not None:
            self._context.rejections.flush()
        if self._service is not None:
            self._service.engine.dispose()
        metrics.process_dead(os.getpid())

    def _forget_remote_control(self, sender: Any = None, **_: Any) -> None:
        """Removes this worker's member from the remote-control binding table. kombu deletes the table only
        once no worker has refreshed it for an hour, so while any worker runs, every worker ever started (each
        has a node name of its own: pool.pid@host) would otherwise stay in it."""
        hostname = getattr(sender, "hostname", None)
        if not hostname or is_rabbitmq(self.settings.effective_broker_url):  # RabbitMQ: auto-delete pidbox queues
            return
        suffix = f"{hostname}.celery.pidbox".encode()
        try:
            with self.app.connection_for_write() as connection:
                client = connection.default_channel.client
                for member in client.smembers(PIDBOX_BINDINGS):
                    if member.endswith(suffix):
                        client.srem(PIDBOX_BINDINGS, member)
        except Exception as e:  # the broker is gone: the member stays until kombu sweeps the table
            log.warning("could not remove this worker's remote-control binding (%s)", type(e).__name__)

    def publish(self, delivery: Delivery) -> None:
        """Publishes a reply to its durable reply queue (persistent message, JSON), which then expires
        ``KMSQ_REPLY_QUEUE_TTL_SECONDS`` after its last reply unless it is read (tasks.transport).

        Nothing is declared: on Redis a queue of the default exchange is just its list, and kombu would keep
        every reply queue it ever declared in this process's memory (a CLI caller's random one each time). On
        RabbitMQ the caller declared its reply queue (tasks.rabbitmq); the publish is confirmed and mandatory,
        and a reply whose queue is gone (its caller left and the queue expired) is dropped with a line: the
        request's record keeps it for ``get_result``."""
        if delivery.queue is None:
            return
        rabbit = is_rabbitmq(self.settings.effective_broker_url)
        for attempt in range(rabbitmq.NACK_ATTEMPTS):
            try:
                with self.app.producer_or_acquire() as producer:
                    producer.publish(
                        delivery.envelope,
                        exchange="",
                        routing_key=delivery.queue,
                        serializer="json",
                        delivery_mode=2,
                        retry=True,
                        retry_policy=REPLY_RETRY_POLICY,
                        **({"mandatory": True} if rabbit else {}),
                    )
                return
            except ChannelError as e:
                if not rabbit or "NO_ROUTE" not in str(e):
                    raise
                log.info("the reply queue of %s is gone: reply not sent (get_result has it)", delivery.request_id)
                return
            except KombuOperationalError as e:
                # A nack: the reply queue was electing a new leader (its node was lost); the broker did not take
                # the reply, and kombu's retries are for connection errors only.
                if not rabbitmq.nacked(e) or attempt == rabbitmq.NACK_ATTEMPTS - 1:
                    raise
                log.warning("the broker refused the reply to %s (nack); sending it again", delivery.request_id)
                time.sleep(rabbitmq.nack_backoff(attempt))

    def _worker_metrics(self) -> metrics.WorkerMetrics | None:
        """This pool process's metrics, when the worker serves them (``kmsq worker --metrics-port``)."""
        if self._metrics is None and metrics.enabled():
            self._metrics = metrics.WorkerMetrics()
        return self._metrics

    def run(self, task: Task, args: tuple[Any, ...]) -> None:
        """Handles one task message: the pipeline's reply published, or a retry with backoff."""
        request = task.request
        queue = (request.delivery_info or {}).get("routing_key")
        msg = Inbound(task.name, request.reply_to, request.id, args, queue if isinstance(queue, str) else None)
        final = request.retries >= MAX_RETRIES
        measured = self._worker_metrics()
        started = time.monotonic()
        try:
            ctx = self.context()
            delivery = handle(ctx, msg, final_attempt=final)
        except ServiceError as e:  # TransientError, or a worker that cannot open its HSM/fleet key yet
            countdown = 2**request.retries
            log.warning("%s %s: %s; retry %d in %d s", task.name, request.id, e.message, request.retries + 1,
                        countdown)  # fmt: skip
            if measured is not None:
                measured.retried(self.pool, task.name)
                self._hsm_counts(measured)
            raise task.retry(countdown=countdown, max_retries=MAX_RETRIES) from None
        try:
            self.publish(delivery)
        except KombuOperationalError as e:  # the broker did not take the reply: the stored reply goes on a retry
            log.warning("%s %s: the reply was not sent (%s); retry in 1 s", task.name, request.id, type(e).__name__)
            raise task.retry(countdown=1, max_retries=MAX_RETRIES) from None
        if measured is not None:
            measured.handled(ctx.pool, task.name, delivery.code, delivery.issued_at, delivery.items, started,
                             time.monotonic() - started, lane_of_queue(msg.queue or ""), delivery.caller)  # fmt: skip
            self._hsm_counts(measured)
        if delivery.queue is not None:  # a refusal nobody is told is in the rejection counter's line instead
            log.info("%s %s -> %s", task.name, delivery.request_id, delivery.code or "ok")

    def _hsm_counts(self, measured: metrics.WorkerMetrics) -> None:
        hsm = self._service.hsm if self._service is not None else None
        if hsm is not None:
            opened = getattr(hsm, "sessions_opened", 0)
            measured.hsm_counts(self.pool, getattr(hsm, "unavailable", 0), max(0, opened - 1))

    def _register(self, op: str) -> None:
        worker = self

        @self.app.task(
            name=task_name(op), bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
            Request=SignedOnlyRequest,
        )  # fmt: skip
        def run(self: Task, *args: Any, **kwargs: Any) -> None:
            worker.run(self, () if kwargs else args)  # keyword arguments are not part of the protocol: malformed


class TokenWatch(threading.Thread):
    """Asks the token for an answer every ``interval`` seconds, from a worker's first pool process. After
    ``failures`` failed checks in a row the worker stops taking requests of its pool (``consume(False)``: the
    requests stay in the queue, for the pool's other workers, and those it had taken are retried, which puts them
    back there); at the first check that passes again it takes them again (``consume(True)``). Each change is
    logged with the reason. A task that meets the failure first retries as before: the watch only ends the
    taking of new work, within ``interval * failures`` seconds."""

    def __init__(self, check: Callable[[], None], consume: Callable[[bool], None], pool: str,
                 interval: float = 2.0, failures: int = 2) -> None:  # fmt: skip
        super().__init__(name="kmsq-token-watch", daemon=True)
        self._check, self._consume, self._pool = check, consume, pool
        self._interval, self._failures = interval, failures
        self._stopped = threading.Event()
        self.consuming = True

    def run(self) -> None:
        failed = 0
        while not self._stopped.wait(self._interval):
            try:
                self._check()
            except Exception as e:  # the token's failure, whatever its class: it is what the watch is for
                failed += 1
                if failed >= self._failures and self.consuming:
                    reason = getattr(e, "message", type(e).__name__)
                    if self._switch(False):
                        log.error("the token does not answer (%s): this worker takes no requests of pool %s until it "
                                  "does", reason, self._pool)  # fmt: skip
                continue
            failed = 0
            if not self.consuming and self._switch(True):
                log.warning("the token answers again: this worker takes requests of pool %s again", self._pool)

    def _switch(self, on: bool) -> bool:
        """Asks the worker to start or stop consuming; returns False when the broker did not take the order
        (the next check tries again)."""
        try:
            self._consume(on)
        except Exception as e:  # the broker may be down as well: the next check tries again
            log.warning("could not %s consuming: %s", "resume" if on else "stop", type(e).__name__)
            return False
        self.consuming = on
        return True

    def stop(self) -> None:
        """Stops after the current check."""
        self._stopped.set()


HIGH_WATER_FILE = "policy-high-water.json"  # in $KMSQ_HOME/state: worker.high_water
REPLY_RETRY_POLICY = {"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3}
PIDBOX_BINDINGS = "_kombu.binding.celery.pidbox"  # Celery's remote control: one member per worker node


class SignedOnlyRequest(CeleryRequest):  # type: ignore[misc]
    """Celery's request, minus what an unsigned message header could change about how it runs.

    Per-message time limits (``timelimit``) and ``expires`` are ignored: the worker's own limits apply
    (celeryconfig), and a request's validity is its signed ``expires_at``. An ``eta`` is honored only on a
    retry (our own retries set one, as their backoff) and only up to MAX_ETA_SECONDS from now, so no message
    can wait in a worker's memory.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A body that is not Celery's (args, kwargs, embed), such as bytes of a message without a content type
        # (RabbitMQ hands those over undecoded), made Celery's __init__ raise out of the consumer and stop the
        # worker: it is an invalid task message, which the consumer drops (QuietConsumer.on_invalid_task).
        try:
            super().__init__(*args, **kwargs)
        except (ValueError, TypeError) as e:
            raise InvalidTaskError(f"the body is not a task's arguments ({type(e).__name__})") from None
        if not isinstance(self._request_dict.get("args"), list | tuple) or not isinstance(
            self._request_dict.get("kwargs"), dict
        ):
            raise InvalidTaskError("the body is not a task's arguments")
        self.time_limits = (None, None)
        self._expires = None
        if not self._request_dict.get("retries"):  # (a retry waited on purpose)
            queue = (self._message.delivery_info or {}).get("routing_key")
            if isinstance(queue, str):
                metrics.HEADS.taken(queue, self._request_dict.get(SENT_AT_HEADER))
        eta: datetime | None = getattr(self, "_eta", None)  # set by Celery's __init__
        latest = datetime.now(UTC) + timedelta(seconds=MAX_ETA_SECONDS)
        retries = self._request_dict.get("retries")
        if eta is not None and (not isinstance(retries, int) or retries < 1):
            self._eta = None
        elif eta is not None and eta > latest:
            self._eta = latest


class ClusterDelayedDelivery(DelayedDelivery):  # type: ignore[misc]
    """Celery's native delayed delivery (RabbitMQ with quorum queues: a retry's countdown waits in the broker),
    set up once per process through the first node of the cluster that answers.

    Celery's step declares its exchanges and queues through every URL of the broker list, each up to four
    times over 9 s, at every start of the consumer: after a reconnection (a node was lost) the worker took no
    message for 17 s while it retried the dead node, and callers whose requests it had taken sent them again
    (kmsq chaos --broker rabbitmq). The declarations are the cluster's, not a node's: one node suffices, and
    they persist (durable exchanges, quorum queues), so a reconnection needs none."""

    _done = False

    def start(self, c: Any) -> None:
        if ClusterDelayedDelivery._done:
            return
        self._validate_configuration(c.app)
        for url in self._validate_broker_urls(c.app.conf.broker_url):
            try:
                self._setup_delayed_delivery(c, url)
            except Exception as e:  # this node is down: the next one
                log.warning("delayed delivery not set up through a node (%s); trying the next", type(e).__name__)
                continue
            ClusterDelayedDelivery._done = True
            return
        log.error("delayed delivery could not be set up: retries with a countdown hold a worker's slot")


class QuietConsumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, except that a message it cannot use is dropped with one line that quotes nothing of
    it (Celery logs the body, which anyone with broker access chooses: a 10,000-level nesting is 20 KB of
    log) and counted with the transport's drops (tasks/transport.py); and with :class:`ClusterDelayedDelivery`
    in the place of Celery's delayed delivery step."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps = tuple(
            "tasks.worker:ClusterDelayedDelivery" if step.endswith(":DelayedDelivery") else step
            for step in CeleryConsumer.Blueprint.default_steps
        )

    def connect(self) -> Any:
        """Celery's connection for consuming, whose channel runs its acknowledgement bookkeeping through one
        Redis client (tasks.app.reuse_redis_client): kombu's Redis QoS otherwise builds a client for the
        record of every message delivered and another for its acknowledgement, two per message, valid or not
        (py-spy: 5% of the main process's time in a flood of bad signatures)."""
        connection = super().connect()
        reuse_redis_client(connection.default_channel)
        return connection

    def _drop(self, message: Any, reason: str) -> None:
        DROPPED.record(str((message.delivery_info or {}).get("routing_key", "?")), reason)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._drop(message, f"has a body that does not decode ({type(exc).__name__})")
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._drop(message, "is not a task message")
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._drop(message, "names no kmsq task")
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._drop(message, f"is not a valid task message ({type(exc).__name__})")
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


def _custody_gate(keystore: Any, min_tokens: int) -> replication.CustodyGate | None:
    """The worker's rule for KMSQ_MIN_TOKENS > 1 (worker.replication.CustodyGate), on a PKCS#11 token."""
    from worker.hsm import Hsm

    if min_tokens <= 1 or not isinstance(keystore, Hsm):
        return None
    return replication.CustodyGate(keystore, min_tokens)


def _anchor_catch_up(keystore: Any) -> Callable[[Session], bool] | None:
    """How the worker's rows catch up with an anchor another token moved (worker.replication.take_anchor), on a
    PKCS#11 token."""
    from worker.hsm import Hsm

    if not isinstance(keystore, Hsm):
        return None
    return lambda db: replication.take_anchor(keystore, db, policy_anchor.deployment_id(db))
