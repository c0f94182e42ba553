"""The caller SDK: sign requests, send them to the pool's queue, receive and unseal signed replies.

``KmsClient`` keeps one reply-queue consumer thread and any number of requests in flight (each ``submit_*``
returns a future; the plain methods wait for it). ``AsyncKmsClient`` offers the same operations as
coroutines. Field names follow the key-provider API: ``plaintextKey``, ``encryptedKey``, ``pub``, ``prv``,
``coin``, ``source``, ``type``.

Imports no HSM or database code: a caller needs only the base ``kmsq`` install.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, ParamSpec

import pydantic
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.message import Message
from kombu.messaging import Consumer, Producer

from schemas.limits import (
    MAX_BATCH_ITEMS,
    MAX_REQUEST_BYTES,
)
from schemas.messages import Reply, ReplyEnvelope, Request
from schemas.operations import BATCH_OPS, OPERATIONS, Operation
from schemas.wire import (
    DEFAULT_REQUEST_TTL_SECONDS,
    SENT_AT_HEADER,
    WireError,
    args_digest,
    canonical_json,
    pool_queue,
    task_name,
)
from tasks import rabbitmq
from tasks.app import broker_connection, make_app, reuse_redis_client
from tasks.backoff import Backoff
from tasks.coalesce import CoalescePolicy, Coalescer
from tasks.codec import Fields, KmsCodec, put_keys_fields
from tasks.codec import KmsError as KmsError  # re-exported: callers catch it from here
from tasks.codec import KmsTimeout as KmsTimeout
from tasks.futures import LoopBridge, SentMessage
from tasks.futures import RequestFuture as RequestFuture  # re-exported: callers type their futures with it
from tasks.identity import CallerIdentity, Fleet
from worker.config import is_rabbitmq

log = logging.getLogger("kmsq.client")
CLIENT_LANES = ("auto", "interactive", "bulk")
MAX_UNCLAIMED = 10_000  # replies kept for take_unclaimed()/expect() when no request of this client waits


P = ParamSpec("P")


def _blocking(
    submit: Callable[Concatenate[KmsClient, P], RequestFuture],
) -> Callable[Concatenate[KmsClient, P], Fields]:
    """The blocking twin of a ``submit_*`` method: starts the request and waits for it (:meth:`KmsClient.wait`)."""

    @functools.wraps(submit)
    def run(self: KmsClient, /, *args: P.args, **kwargs: P.kwargs) -> Fields:
        return self.wait(submit(self, *args, **kwargs))

    run.__name__ = run.__qualname__ = submit.__name__.removeprefix("submit_")
    run.__doc__ = f"Waits for :meth:`{submit.__name__}` and returns its fields. Raises KmsError (or KmsTimeout)."
    return run


class KmsClient(KmsCodec):
    """A caller's connection to kmsq: :class:`KmsCodec` on a broker. Thread-safe; use as a context manager or
    call :meth:`close`."""

    def __init__(
        self,
        broker_url: str,
        identity: CallerIdentity,
        fleet: Fleet,
        *,
        reply_queue: str | None = None,
        ttl_seconds: int = DEFAULT_REQUEST_TTL_SECONDS,
        timeout: float = 60.0,
        namespace: str | None = None,
        resend_after: float | None = None,
        coalesce: CoalescePolicy | bool = False,
        lane: str = "auto",
    ) -> None:
        """``reply_queue`` is the suffix of this client's durable reply queue ``kmsq.reply.<caller>.<suffix>``
        (default: a random one). A client restarted with the same suffix receives replies sent meanwhile.
        ``namespace`` is the deployment's (default: ``$KMSQ_NAMESPACE``, else none): every Redis key the
        client uses starts with it, as the workers' do. With ``resend_after``, :meth:`wait` sends the same
        signed message again (same request id) whenever no reply came for that many seconds, until the
        timeout: a message the broker lost (a failover to a replica that had not received it) is sent again,
        and a worker answers a request it already ran with the stored reply. With ``coalesce`` (True for the
        defaults of :class:`tasks.coalesce.CoalescePolicy`), concurrent single requests of one operation, pool
        and root key go out as one batch message (a lone request is sent at once, as without). ``lane`` is the
        pool queue its requests go to (docs/OPERATIONS.md, "Sharing a pool"): ``auto`` sends batch operations to
        the bulk lane and single requests, coalesced ones included, to the interactive lane; ``interactive`` or
        ``bulk`` sends everything there (a caller registered in the bulk lane must say ``bulk``). Raises KmsError
        (``invalid``) for a bad namespace, broker URL or lane, (``unavailable``) when the broker cannot be
        reached."""
        if lane not in CLIENT_LANES:
            raise KmsError("invalid", f"lane must be one of {', '.join(CLIENT_LANES)}")
        self.lane = lane
        if namespace is None:
            namespace = os.environ.get("KMSQ_NAMESPACE") or None
        try:
            self._app = make_app(broker_url, name="kmsq-client", namespace=namespace)
        except ValueError as e:
            raise KmsError("invalid", f"broker: {e}") from None
        super().__init__(identity, fleet, reply_queue=reply_queue, ttl_seconds=ttl_seconds)
        self.namespace = namespace
        self.timeout = timeout
        self.resend_after = resend_after
        self._broker_url = broker_url
        self._rabbitmq = is_rabbitmq(broker_url)
        self._publisher: tuple[Connection, Producer] | None = None  # opened on first publish, under _send_lock
        # request_id -> (future, digest of the arguments sent, or None when unknown: see expect())
        self._pending: dict[str, tuple[Future[Reply], str | None]] = {}
        self._unclaimed: dict[str, Reply] = {}
        self._lock = threading.Lock()
        self.backoff = Backoff()  # the pools whose quota refused this caller a moment ago
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        policy = CoalescePolicy() if coalesce is True else coalesce or None
        self.coalescer = Coalescer(self, policy) if policy is not None else None
        self._consumer = threading.Thread(target=self._consume, name="kmsq-replies", daemon=True)
        self._consumer.start()
        if not self._ready.wait(timeout=30):
            self.close()
            raise KmsError("unavailable", "cannot connect to the broker")

    @classmethod
    def from_files(cls, broker_url: str, identity_file: Path, fleet_file: Path, **kwargs: Any) -> KmsClient:
        """Builds a client from the caller's ``NAME.key.json`` and the fleet file."""
        return cls(broker_url, CallerIdentity.load(identity_file), Fleet.load(fleet_file), **kwargs)

    # -- operations: one submit_* per operation of schemas.operations, with its blocking twin ---------------

    def call(
        self, op: str, fields: dict[str, Any], pool: str | None = None, *, lane: str | None = None,
        backoff: bool = True,
    ) -> RequestFuture:  # fmt: skip
        """Starts operation ``op`` with the request ``fields`` of its model (a sealed input, such as put_key's
        ``prv``, as its plaintext: it is sealed to the pool's transport key before it leaves this process). The
        pool is ``pool``, or the one the operation's ``pool_from`` field picks, or the default pool. With
        coalescing, a request whose operation has a batch form may travel in a batch with others (a lone one
        goes at once, alone). ``lane`` overrides the client's choice of lane when that is ``auto``. While the pool's
        quota refused this caller a moment ago the request is refused here (``rate_limited``, tasks.backoff) unless
        ``backoff`` is False (the coalescer's batches, whose items were admitted one by one). Returns the
        future of its unsealed result fields. Raises KmsError (``invalid``) for fields out of their limits or an
        unknown pool or operation."""
        operation = OPERATIONS.get(op)
        if operation is None:
            raise KmsError("invalid", f"unknown operation {op!r}")
        target = self.route(operation, fields, pool)
        wait, trying = self.backoff.admit(target) if backoff else (None, False)
        if wait is not None:  # over the caller's quota there a moment ago: refused here (tasks.backoff)
            refused = RequestFuture("")
            message = f"over the caller's quota in pool {target}: retry after {wait:.3f} s (not sent)"
            refused.set_exception(KmsError("rate_limited", message, None, round(wait, 3)))
            return refused
        future = self._start(operation, fields, target, lane)
        if trying:
            future.add_done_callback(lambda _: self.backoff.tried(target))
        return future

    def _start(self, operation: Operation, fields: dict[str, Any], target: str, lane: str | None) -> RequestFuture:
        batching = operation.batch
        if self.coalescer is None or batching is None or not batching.coalesce:
            return self._send(operation, fields, target, lane)
        params = {"op": operation.name, **fields}
        if batching.alone is not None and batching.alone(params):
            return self._send(operation, fields, target, lane)
        self.check_params(params)  # refused now, as it would be alone, not later inside a batch
        return self.coalescer.submit(operation, target, params, lambda: self._send(operation, fields, target, lane))

    def _send(self, operation: Operation, fields: dict[str, Any], pool: str, lane: str | None) -> RequestFuture:
        request_id = uuid.uuid4()
        return self.submit(self.request_params(operation, fields, pool, request_id), pool, request_id, lane=lane)

    def lane_for(self, op: str, asked: str | None = None) -> str:
        """The lane a request of ``op`` goes to: the client's, unless it is ``auto``; then ``asked``, else bulk for
        a batch operation and interactive for the others."""
        if self.lane != "auto":
            return self.lane
        return asked or ("bulk" if op in BATCH_OPS else "interactive")

    def submit_generate_data_key(
        self,
        root_key_id: str | None = None,
        with_plaintext: bool = True,
        *,
        key_spec: str = "AES-256",
        pool: str | None = None,
    ) -> RequestFuture:
        """Starts ``generate_data_key``; the future gives ``encryptedKey`` and ``plaintextKey``. Without
        ``with_plaintext`` it is ``generate_data_key_without_plaintext`` (``encryptedKey`` only)."""
        if not with_plaintext:
            return self.submit_generate_data_key_without_plaintext(root_key_id, key_spec=key_spec, pool=pool)
        return self.call("generate_data_key", {"root_key_id": root_key_id, "key_spec": key_spec}, pool)

    def submit_generate_data_key_without_plaintext(
        self, root_key_id: str | None = None, *, key_spec: str = "AES-256", pool: str | None = None
    ) -> RequestFuture:
        """Starts ``generate_data_key_without_plaintext``; the future gives ``encryptedKey``."""
        fields = {"root_key_id": root_key_id, "key_spec": key_spec}
        return self.call("generate_data_key_without_plaintext", fields, pool)

    def submit_decrypt_data_key(self, encrypted_key: str, *, pool: str | None = None) -> RequestFuture:
        """Starts ``decrypt_data_key``; the future gives ``plaintextKey``. It goes to the pool of the root key the
        ``encryptedKey`` names (``pool`` for one that names none: the replaced API's SJCL envelopes)."""
        return self.call("decrypt_data_key", {"encrypted_key": encrypted_key}, pool)

    def submit_rewrap_data_key(self, encrypted_key: str, *, pool: str | None = None) -> RequestFuture:
        """Starts ``rewrap_data_key``; the future gives ``encryptedKey`` under its root key's current version
        (the same string when it is current already). No plaintext is involved on either side."""
        return self.call("rewrap_data_key", {"encrypted_key": encrypted_key}, pool)

    def submit_put_key(
        self,
        pub: str,
        prv: str,
        coin: str,
        source: str,
        type: str,
        root_key_id: str | None = None,
        *,
        pool: str | None = None,
    ) -> RequestFuture:
        """Starts ``put_key``; ``prv`` is sealed to the pool's transport key before it leaves this process. The
        future gives ``pub``, ``coin``, ``source`` and ``type``. Raises KmsError (``invalid``) for a ``prv`` out
        of its limits (schemas.limits)."""
        fields = {"pub": pub, "prv": prv, "coin": coin, "source": source, "type": type, "root_key_id": root_key_id}
        return self.call("put_key", fields, pool)

    def submit_get_key(self, pub: str, source: str, pool: str | None = None) -> RequestFuture:
        """Starts ``get_key``; the future gives ``prv``, ``pub``, ``coin``, ``source`` and ``type``."""
        return self.call("get_key", {"pub": pub, "source": source}, pool)

    def submit_generate_signing_key(
        self,
        coin: str,
        source: str,
        type: str = "independent",
        root_key_id: str | None = None,
        *,
        in_hsm: bool = False,
        pool: str | None = None,
    ) -> RequestFuture:
        """Starts ``generate_signing_key``: a key generated and kept inside kmsq (never exportable; ``in_hsm``: a
        secp256k1 key inside the token, ETH-like coins only); the future gives ``pub`` (its xpub), ``coin``,
        ``source`` and ``type``."""
        fields = {"coin": coin, "source": source, "type": type, "root_key_id": root_key_id, "in_hsm": in_hsm}
        return self.call("generate_signing_key", fields, pool)

    def submit_sign(
        self, pub: str, source: str, payload: str, algorithm: str = "ecdsa", pool: str | None = None
    ) -> RequestFuture:
        """Starts ``sign`` with the generated key (pub, source); the future gives ``signature``."""
        return self.call("sign", {"pub": pub, "source": source, "payload": payload, "algorithm": algorithm}, pool)

    def submit_sign_operation(
        self, pub: str, source: str, to: str, value: int | str, *, data: str = "0x", expire_time: int,
        sequence_id: int, pool: str | None = None,
    ) -> RequestFuture:  # fmt: skip
        """Starts ``sign_operation``: kmsq hashes a BitGo multisig wallet's ``sendMultiSig`` operation (``to``,
        ``value`` in wei, call ``data``, ``expire_time``, ``sequence_id``) and signs the hash with the generated
        ETH-like key; the future gives ``operation_hash`` and ``signature``."""
        fields = {"pub": pub, "source": source, "to": to, "value": str(value), "data": data,
                  "expire_time": expire_time, "sequence_id": sequence_id}  # fmt: skip
        return self.call("sign_operation", fields, pool)

    def submit_get_result(self, request_id: str, pool: str | None = None) -> RequestFuture:
        """Starts ``get_result``: the stored outcome of an earlier request of this caller."""
        return self.call("get_result", {"request_id": request_id}, pool)

    # -- batches (one message, one transaction, one sealed reply; per-item errors) -------------------

    def submit_generate_data_keys(
        self,
        count: int,
        root_key_id: str | None = None,
        with_plaintext: bool = True,
        *,
        key_spec: str = "AES-256",
        pool: str | None = None,
    ) -> RequestFuture:
        """Starts ``generate_data_keys``; the future gives ``{"items": [{"encryptedKey", "plaintextKey"?}]}``."""
        fields = {"count": count, "with_plaintext": with_plaintext, "root_key_id": root_key_id, "key_spec": key_spec}
        return self.call("generate_data_keys", fields, pool)

    def submit_decrypt_data_keys(self, encrypted_keys: list[str], *, pool: str | None = None) -> RequestFuture:
        """Starts ``decrypt_data_keys``; items are ``{"plaintextKey"}`` or ``{"error", "message"}``. The batch
        goes to the pool of its first key's root key."""
        return self.call("decrypt_data_keys", {"encrypted_keys": encrypted_keys}, pool)

    def submit_rewrap_data_keys(self, encrypted_keys: list[str], *, pool: str | None = None) -> RequestFuture:
        """Starts ``rewrap_data_keys``; items are ``{"encryptedKey"}`` or ``{"error", "message"}``. The batch
        goes to the pool of its first key's root key."""
        return self.call("rewrap_data_keys", {"encrypted_keys": encrypted_keys}, pool)

    def submit_put_keys(
        self, items: list[dict[str, str]], root_key_id: str | None = None, *, pool: str | None = None
    ) -> RequestFuture:
        """Starts ``put_keys`` for items ``{pub, prv, coin, source, type}``; the private keys are sealed
        together to the pool's transport key. Items come back as public fields or ``{"error", "message"}``."""
        return self.call("put_keys", put_keys_fields(items, root_key_id), pool)

    def submit_sign_many(
        self, items: Sequence[tuple[str, str, str]], algorithm: str = "ecdsa", pool: str | None = None
    ) -> RequestFuture:
        """Starts ``sign_many`` for ``(pub, source, payload)`` triples; items are ``{"signature"}`` or
        ``{"error", "message"}`` (``policy_denied``...), in order."""
        batch = [{"pub": pub, "source": source, "payload": payload, "algorithm": algorithm}
                 for pub, source, payload in items]  # fmt: skip
        return self.call("sign_many", {"items": batch}, pool)

    def submit_get_keys(self, keys: Sequence[tuple[str, str]], pool: str | None = None) -> RequestFuture:
        """Starts ``get_keys`` for ``(pub, source)`` pairs; items are ``{"prv", "pub", "coin", "source",
        "type"}`` or ``{"error", "message"}`` (``not_found``...)."""
        return self.call("get_keys", {"keys": [{"pub": pub, "source": source} for pub, source in keys]}, pool)

    # Each operation's blocking twin: the same arguments; returns the fields, raises KmsError (or KmsTimeout).
    generate_data_key = _blocking(submit_generate_data_key)
    generate_data_key_without_plaintext = _blocking(submit_generate_data_key_without_plaintext)
    decrypt_data_key = _blocking(submit_decrypt_data_key)
    rewrap_data_key = _blocking(submit_rewrap_data_key)
    put_key = _blocking(submit_put_key)
    get_key = _blocking(submit_get_key)
    generate_signing_key = _blocking(submit_generate_signing_key)
    sign = _blocking(submit_sign)
    sign_operation = _blocking(submit_sign_operation)
    get_result = _blocking(submit_get_result)
    generate_data_keys = _blocking(submit_generate_data_keys)
    decrypt_data_keys = _blocking(submit_decrypt_data_keys)
    rewrap_data_keys = _blocking(submit_rewrap_data_keys)
    put_keys = _blocking(submit_put_keys)
    get_keys = _blocking(submit_get_keys)
    sign_many = _blocking(submit_sign_many)

    # -- sending ------------------------------------------------------------------------------------

    def submit(
        self, params: dict[str, Any], pool: str, request_id: uuid.UUID | None = None, *, lane: str | None = None
    ) -> RequestFuture:
        """Signs and sends one request (to :meth:`lane_for`'s lane); returns a future of its unsealed result
        fields."""
        if pool not in self.fleet.pools:
            raise KmsError("invalid", f"pool {pool!r} is not in the fleet file")
        request, args = self.build_request(params, pool, request_id)
        return self.submit_raw(request, args, lane=lane)

    def submit_raw(self, request: Request, args: list[str], *, lane: str | None = None) -> RequestFuture:
        """Sends already signed task arguments for ``request`` (to :meth:`lane_for`'s lane) and returns the future
        of its reply."""
        future, arrived = self._expect(request.request_id, args_digest(args))
        chosen = self.lane_for(request.params.op, lane)
        future.sent = SentMessage(request, args, lane=chosen)
        if not arrived:
            try:
                self.send(request, args, chosen)
            except Exception as e:
                if self.resend_after is None:
                    raise
                # The broker is failing over: wait() sends it again every resend_after seconds.
                log.warning("could not send %s (%s); sending it again later", request.request_id, type(e).__name__)
        return future

    def expect(self, request_id: uuid.UUID, args: list[Any] | None = None) -> RequestFuture:
        """Returns the future of the reply to ``request_id`` without sending anything (a request sent by an
        earlier run, or published by other means, whose reply comes to this client's reply queue). With the
        message's ``args``, only a reply to exactly that message is accepted."""
        return self._expect(request_id, None if args is None else args_digest(args))[0]

    def _expect(self, request_id: uuid.UUID, digest: str | None) -> tuple[RequestFuture, bool]:
        rid = str(request_id)
        reply_future: Future[Reply] = Future()
        with self._lock:
            early = self._unclaimed.pop(rid, None)
            if early is not None and digest is not None and early.request_digest != digest:
                early = None
            if early is None:
                self._pending[rid] = (reply_future, digest)
        if early is not None:
            reply_future.set_result(early)
        return self._chain(reply_future, request_id), early is not None

    def send(self, request: Request, args: list[str], lane: str = "interactive") -> None:
        """Publishes the signed request to its pool's queue of ``lane``."""
        self.publish(task_name(request.params.op), args, str(request.request_id), request.pool, request.reply_queue,
                     lane)  # fmt: skip

    def publish(
        self, task: str, args: list[Any], message_id: str, pool: str, reply_to: str, lane: str = "interactive"
    ) -> None:
        """Publishes one task message as given (no signing, no checks) to the pool's queue of ``lane``; also for
        tests and tools.

        The message is the one ``Celery.send_task`` would publish (Celery builds and sends it: protocol 2,
        the same headers, properties, routing and publish retry policy), except for a short ``argsrepr``
        header. It goes through a producer this client keeps, on a connection of its own, instead of
        ``send_task``'s producer pool, router and result object. Raises kombu's errors when the broker stays
        unreachable.
        """
        amqp = self._app.amqp
        message = amqp.create_task_message(
            message_id, task, args, {}, reply_to=reply_to, ignore_result=True, argsrepr=_argsrepr(args)
        )
        message.headers[SENT_AT_HEADER] = time.time()
        with self._send_lock:
            if self._publisher is None:
                # connects on first use, inside kombu's retries
                connection = broker_connection(self._broker_url, self.namespace)
                self._publisher = (connection, amqp.Producer(connection, auto_declare=False))
            producer = self._publisher[1]
            # On RabbitMQ the pool's quorum queue is declared first (once per channel: kombu remembers it), the
            # broker confirms the publish, and a message that reached no queue is an error, not a silent drop.
            queue, extra = pool_queue(pool, lane), {}
            if self._rabbitmq:
                known = amqp.queues.get(queue)  # (Celery made the default pool's, with a direct exchange)
                if known is None or known.exchange.type != "topic":
                    amqp.queues.add(rabbitmq.pool_queue_entity(queue))
                extra = {"mandatory": True}
            for attempt in range(rabbitmq.NACK_ATTEMPTS):
                try:
                    amqp.send_task_message(producer, task, message, queue=queue, **extra)
                    break
                except KombuOperationalError as e:  # a nack (the queue electing a leader): not taken, send again
                    if not rabbitmq.nacked(e) or attempt == rabbitmq.NACK_ATTEMPTS - 1:
                        raise
                    time.sleep(rabbitmq.nack_backoff(attempt))
            # After a publish the channel exists; kombu replaces it after a connection error.
            reuse_redis_client(producer.channel)

    def _chain(self, reply_future: Future[Reply], request_id: uuid.UUID) -> RequestFuture:
        result = RequestFuture(str(request_id))

        def done(f: Future[Reply]) -> None:
            if result.done():  # cancelled: nobody waits for this reply any more
                return
            try:
                result.reply = f.result()
                result.set_result(self.unseal(result.reply, request_id))
            except KmsError as e:  # handed to the waiting caller
                if e.code == "rate_limited" and result.reply is not None:
                    self.backoff.refused(result.reply.pool, e.retry_after)
                result.set_exception(e)
            except BaseException as e:
                result.set_exception(e)

        def forget_if_cancelled(f: Future[Fields]) -> None:
            if f.cancelled():  # a reply arriving later is kept with the unclaimed ones (bounded)
                with self._lock:
                    self._pending.pop(str(request_id), None)

        reply_future.add_done_callback(done)
        result.add_done_callback(forget_if_cancelled)
        return result

    def wait(self, future: RequestFuture) -> Fields:
        """Waits for a submitted request. Returns its fields; raises KmsError, or KmsTimeout.

        After a timeout the future is cancelled and forgotten; the request may still run: its reply can be
        fetched with ``get_result`` or ``expect``.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            step = left if self.resend_after is None else min(left, self.resend_after)
            try:
                return future.result(timeout=max(0.0, step))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    future.cancel()
                    raise KmsTimeout(future.request_id) from None
            sent = future.sent
            assert self.resend_after is not None
            if sent is None or time.monotonic() - sent.at < self.resend_after:
                continue  # not sent yet (coalescing), or another waiter of its batch sent it again just now
            sent.at = time.monotonic()
            try:
                self.send(sent.request, sent.args, sent.lane)
                log.info("no reply to %s yet: sent it again", future.request_id)
            except Exception as e:  # the broker is failing over: try again at the next step
                log.warning("could not send %s again (%s)", future.request_id, type(e).__name__)

    def _on_message(self, body: Any, message: Message) -> None:
        try:
            reply = self.verify_envelope(ReplyEnvelope.model_validate(body))
        except (WireError, pydantic.ValidationError, TypeError) as e:
            log.warning("dropped a reply that does not verify: %s", e)
            return
        rid = str(reply.request_id)
        future: Future[Reply] | None = None
        with self._lock:
            pending = self._pending.get(rid)
            if pending is None:
                self._unclaimed[rid] = reply  # a reply to an earlier run, or a duplicate
                if len(self._unclaimed) > MAX_UNCLAIMED:  # nobody collects them: forget the oldest
                    del self._unclaimed[next(iter(self._unclaimed))]
            elif pending[1] is None or pending[1] == reply.request_digest:
                future = self._pending.pop(rid)[0]
            else:
                # Signed by a worker, but for another message carrying this request_id (a forged or
                # tampered copy of ours): not the answer to what we sent.
                log.warning("ignored a reply to a different message with request_id %s", rid)
        if future is not None and not future.done():
            future.set_result(reply)

    def take_unclaimed(self) -> dict[str, Reply]:
        """Returns (and forgets) replies that arrived for requests this client did not send or already got."""
        with self._lock:
            taken, self._unclaimed = self._unclaimed, {}
        return taken

    def _consume(self) -> None:
        if self._rabbitmq:
            queue = rabbitmq.reply_queue_entity(self.reply_queue)
        else:
            queue = Queue(self.reply_queue, durable=True, auto_delete=False, routing_key=self.reply_queue)
        while not self._stop.is_set():
            try:
                with (
                    broker_connection(self._broker_url, self.namespace) as conn,
                    # no_ack: a reply taken off the queue by a client that dies before reading it is not lost,
                    # the worker stored it (get_result, or send the same request again). It saves the broker
                    # round trips of kombu's unacked bookkeeping on every reply.
                    Consumer(conn, [queue], callbacks=[self._on_message], accept=["json"], no_ack=True),
                ):
                    self._ready.set()
                    while not self._stop.is_set():
                        try:
                            conn.drain_events(timeout=0.5)
                        except TimeoutError:
                            continue
            except Exception as e:  # reconnect: the broker restarted or dropped us
                if self._stop.is_set():
                    return
                log.warning("reply consumer lost the broker (%s); reconnecting", type(e).__name__)
                self._stop.wait(1.0)

    def close(self) -> None:
        """Stops the reply consumer, closes the publishing connection and fails requests still waiting."""
        self._stop.set()
        if self._consumer.is_alive() and threading.current_thread() is not self._consumer:
            self._consumer.join(timeout=5)
        with self._send_lock:
            if self._publisher is not None:
                self._publisher[0].release()
                self._publisher = None
        if self.coalescer is not None:
            self.coalescer.close()
        with self._lock:
            pending, self._pending = self._pending, {}
        for rid, (future, _) in pending.items():
            if not future.done():
                future.set_exception(KmsTimeout(rid))

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# Room left in a put_keys message for everything but the items: the request's own fields and the seal.
_BATCH_OVERHEAD_BYTES = 16 * 1024


def put_keys_batches(items: Sequence[Mapping[str, str]], max_items: int = MAX_BATCH_ITEMS) -> list[tuple[int, int]]:
    """Splits ``put_keys`` items ``{pub, prv, coin, source, type}`` into consecutive batches that each fit one
    message: at most ``max_items`` items and MAX_REQUEST_BYTES of request body. Returns ``(start, stop)``
    index ranges covering every item in order. An item too large for any batch gets a batch of its own,
    which ``submit_put_keys`` then refuses with the message limit (send it with ``put_key``)."""
    budget = MAX_REQUEST_BYTES - _BATCH_OVERHEAD_BYTES
    ranges: list[tuple[int, int]] = []
    start, used = 0, 0
    for index, item in enumerate(items):
        # The prvs travel as one sealed canonical-JSON list (base64url, 4/3), the public fields as JSON.
        sealed = (len(json.dumps(item["prv"], ensure_ascii=True)) + 1) * 4 // 3 + 1
        public = len(canonical_json({k: item[k] for k in ("pub", "coin", "source", "type")})) + 1
        cost = sealed + public
        if index > start and (index - start >= max_items or used + cost > budget):
            ranges.append((start, index))
            start, used = index, 0
        used += cost
    if start < len(items):
        ranges.append((start, len(items)))
    return ranges


def _argsrepr(args: list[Any]) -> str | None:
    """The ``argsrepr`` header of a request message: the caller and key id, not the body (Celery's default,
    a repr of up to 1 KiB, made a third of every message and cost the client a repr per request). None (Celery's
    default) for arguments that are not the protocol's four strings."""
    if len(args) == 4 and all(isinstance(a, str) for a in args):
        return f"({args[0][:64]!r}, {args[1][:32]!r}, <body: {len(args[2])} characters>, <signature>)"
    return None


def _awaiting(
    submit: Callable[Concatenate[KmsClient, P], RequestFuture],
) -> Callable[Concatenate[AsyncKmsClient, P], Coroutine[Any, Any, Fields]]:
    """The coroutine twin of a ``submit_*`` method of :class:`KmsClient` (see :meth:`AsyncKmsClient.run`)."""

    @functools.wraps(submit)
    async def run(self: AsyncKmsClient, /, *args: P.args, **kwargs: P.kwargs) -> Fields:
        return await self.run(lambda: submit(self.client, *args, **kwargs))

    run.__name__ = run.__qualname__ = submit.__name__.removeprefix("submit_")
    run.__doc__ = f"Awaits :meth:`KmsClient.{submit.__name__}` and returns its fields. Raises KmsError (or KmsTimeout)."
    return run


class AsyncKmsClient:
    """The same operations as coroutines, for asyncio callers (the gateway is one). Many may be awaited at once.

    Publishing blocks while the broker is slow or reconnecting, so it never runs on the event loop's thread:
    each request is started on the loop's default executor (a coalescing client's lone request is published
    there too; the others of a batch return at once). Replies reach the loop one wake-up per burst
    (:class:`tasks.futures.LoopBridge`)."""

    def __init__(self, client: KmsClient) -> None:
        self.client = client
        self._bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBridge] = weakref.WeakKeyDictionary()

    async def run(self, start: Callable[[], RequestFuture], timeout: float | None = None) -> Fields:
        """Starts a request with ``start`` (off the loop's thread) and awaits its fields, for at most ``timeout``
        seconds (default: the client's). Raises KmsError, or KmsTimeout (the request is then forgotten; it may
        still run: ``get_result``)."""
        loop = asyncio.get_running_loop()
        future = await loop.run_in_executor(None, start)
        bridge = self._bridges.get(loop) or self._bridges.setdefault(loop, LoopBridge(loop))
        try:
            return await asyncio.wait_for(bridge.watch(future), self.client.timeout if timeout is None else timeout)
        except TimeoutError:
            raise KmsTimeout(getattr(future, "request_id", "")) from None

    async def call(
        self, op: str, fields: dict[str, Any], pool: str | None = None, *, lane: str | None = None
    ) -> Fields:
        """See :meth:`KmsClient.call`."""
        return await self.run(lambda: self.client.call(op, fields, pool, lane=lane))

    generate_data_key = _awaiting(KmsClient.submit_generate_data_key)
    generate_data_key_without_plaintext = _awaiting(KmsClient.submit_generate_data_key_without_plaintext)
    decrypt_data_key = _awaiting(KmsClient.submit_decrypt_data_key)
    rewrap_data_key = _awaiting(KmsClient.submit_rewrap_data_key)
    put_key = _awaiting(KmsClient.submit_put_key)
    get_key = _awaiting(KmsClient.submit_get_key)
    generate_signing_key = _awaiting(KmsClient.submit_generate_signing_key)
    sign = _awaiting(KmsClient.submit_sign)
    sign_operation = _awaiting(KmsClient.submit_sign_operation)
    get_result = _awaiting(KmsClient.submit_get_result)
    generate_data_keys = _awaiting(KmsClient.submit_generate_data_keys)
    decrypt_data_keys = _awaiting(KmsClient.submit_decrypt_data_keys)
    rewrap_data_keys = _awaiting(KmsClient.submit_rewrap_data_keys)
    put_keys = _awaiting(KmsClient.submit_put_keys)
    get_keys = _awaiting(KmsClient.submit_get_keys)
    sign_many = _awaiting(KmsClient.submit_sign_many)

    def close(self) -> None:
        """Closes the underlying client."""
        self.client.close()

    async def __aenter__(self) -> AsyncKmsClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
