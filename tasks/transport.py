"""kombu's Redis transport, hardened against what anyone with broker access can push onto a queue.

kombu's Redis channel parses each entry it pops (``BRPOP``) and builds a message from it without catching
errors: an entry that is not JSON (``LPUSH kms.default 'not json'``), JSON that is not an object, a
10,000-level nesting, or an object without kombu's fields stops the worker's consumer, and with it the pool.
Here an entry that does not decode into a well-formed kombu message is dropped, counted and logged (never its
content), and the worker goes on with the next one. What a well-formed message then carries is checked by
Celery and by the request pipeline (signatures first).

:func:`install` makes ``redis://``, ``rediss://``, ``redis+socket://`` and ``sentinel://`` URLs use this
transport in the current process (workers and callers: ``tasks.app`` installs it on import).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from queue import Empty
from typing import Any

import kombu.transport
from kombu.transport import TRANSPORT_ALIASES, redis
from kombu.utils.json import dumps, loads
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas.wire import QUEUE_PREFIX, REPLY_QUEUE_PREFIX

log = logging.getLogger("kmsq.transport")
_ENCODINGS = (None, "utf-8", "base64")  # kombu's codecs for a body: none, or base64


class DropCounter:
    """Counts the entries dropped in this process; logs at most one line a second, without their content
    (what a second's flood adds up to is logged by a timer when the flood stops)."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()
        self._logged_at = 0.0
        self._unlogged = 0
        self._last = ("", "")
        self._timer: threading.Timer | None = None

    def record(self, queue: str, reason: str) -> None:
        """Counts one dropped entry of ``queue`` and logs it unless a line went out less than a second ago."""
        with self._lock:
            self.total += 1
            self._unlogged += 1
            self._last = (queue[:200], reason)
            if time.monotonic() - self._logged_at < 1.0:
                if self._timer is None:
                    self._timer = threading.Timer(1.0, self._log)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self._log()

    def _log(self) -> None:
        with self._lock:
            self._timer = None
            count, self._unlogged, self._logged_at = self._unlogged, 0, time.monotonic()
            (queue, reason), total = self._last, self.total
        if count:
            log.warning(
                "dropped %d entr%s of queue %s (the last one %s; %d dropped by this process)",
                count, "y" if count == 1 else "ies", queue, reason, total,
            )  # fmt: skip


DROPPED = DropCounter()


def decode_entry(raw: bytes | str) -> tuple[dict[str, Any] | None, str]:
    """Parses one entry of a Redis queue. Returns the kombu message payload and ``""``, or None and why the
    entry is not a well-formed kombu message (a fixed text that quotes nothing of the entry)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        payload = loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError):
        return None, "is not JSON"
    if not isinstance(payload, dict):
        return None, "is not a JSON object"
    reason = _envelope_problem(payload) or _body_problem(payload)
    return (None, reason) if reason else (payload, "")


def _envelope_problem(payload: dict[str, Any]) -> str:
    properties = payload.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        return "has no kombu properties"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("exchange", "routing_key")):
        return "has no kombu delivery info"
    if not isinstance(payload.get("headers"), dict | None):
        return "has malformed headers"
    if not all(isinstance(payload.get(k), str | None) for k in ("content-type", "content-encoding")):
        return "has a malformed content type"
    return ""


def _body_problem(payload: dict[str, Any]) -> str:
    body, encoding = payload.get("body"), payload["properties"].get("body_encoding")
    if not isinstance(body, str | None) or not isinstance(encoding, str | None):
        return "has a malformed body"
    if (encoding.lower() if encoding else None) not in _ENCODINGS:
        return "has an unknown body encoding"
    if body and encoding and encoding.lower() == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "has a body that is not base64"
    return ""


class _Hardened:
    """The guarded ``_brpop_read`` of :class:`Channel` and :class:`SentinelChannel`, and reply queues that
    expire."""

    client: Any
    connection: Any
    connection_errors: Any
    sep: str
    _queue_cycle: Any
    _in_poll: Any
    # Transport option (ms): every reply put on a reply queue (kmsq.reply.*) sets the queue's TTL to this, so
    # that a queue nobody reads any more disappears with its replies this long after the last one. A queue
    # that is read is empty, and an empty list is no key at all in Redis. None: replies never expire.
    reply_queue_ttl: int | None = None

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        ttl = self.reply_queue_ttl
        if not ttl or not queue.startswith(REPLY_QUEUE_PREFIX) or kwargs.get("_publish_batch") is not None:
            super()._put(queue, message, **kwargs)  # type: ignore[misc]
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))  # type: ignore[attr-defined]
        with self.conn_or_acquire() as client, client.pipeline() as pipe:  # type: ignore[attr-defined]
            pipe.lpush(key, dumps(message))  # MULTI/EXEC: the reply and its queue's TTL together
            pipe.pexpire(key, ttl)
            pipe.execute()

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.x's Channel._brpop_read, with decode_entry in place of its unguarded loads + deliver
        # (tests/test_hostile_broker.py runs it against the installed kombu).
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnect on the next poll, as kombu does
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            queue = (dest.decode("utf-8", "replace") if isinstance(dest, bytes) else str(dest)).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            payload, reason = decode_entry(item)
            if payload is None:
                DROPPED.record(queue, reason)
            elif queue.startswith(QUEUE_PREFIX) and payload["properties"]["delivery_info"]["routing_key"] != queue:
                # A pool queue's messages are routed to it by name; the worker reads a message's lane from its
                # routing key (worker.pipeline: a bulk-lane caller's request refused on the interactive lane), so
                # one pushed onto a queue it does not name is not what a publisher routed there.
                DROPPED.record(queue, "names another queue")
            else:
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None  # kombu sets it None after a poll
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush is not None:
                flush()

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # kombu drops a closed connection's reference from its transport; a channel closed after that (Celery
        # closes the connection a second time after a Sentinel failover) restores its unacknowledged messages
        # through a new pool and failed with an AttributeError, which stops the worker. A connection error is
        # what kombu and Celery recover from: the messages stay unacknowledged and are restored later.
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection is closed")
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[misc]
        return params


class Channel(_Hardened, redis.Channel):
    """kombu's Redis channel, except that an entry which is not a well-formed message is dropped and that
    reply queues expire."""

    from_transport_options = (*redis.Channel.from_transport_options, "reply_queue_ttl")  # type: ignore[assignment]


class SentinelChannel(_Hardened, redis.SentinelChannel):
    """kombu's Redis Sentinel channel, hardened the same way."""

    from_transport_options = (*redis.SentinelChannel.from_transport_options, "reply_queue_ttl")  # type: ignore[assignment]


class Transport(redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class SentinelTransport(redis.SentinelTransport):
    """kombu's Redis Sentinel transport (``sentinel://``; the master's name in ``master_name``) with
    :class:`SentinelChannel`."""

    Channel = SentinelChannel


def install() -> None:
    """Makes this process's ``redis``/``rediss`` URLs (``redis+socket`` included) use :class:`Transport`, and
    ``sentinel`` URLs :class:`SentinelTransport`."""
    for scheme, transport in (("redis", "Transport"), ("rediss", "Transport"), ("sentinel", "SentinelTransport")):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:{transport}"
        # kombu caches resolved aliases: forget one resolved before this ran.
        getattr(kombu.transport, "_transport_cache", {}).pop(scheme, None)
