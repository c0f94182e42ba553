"""RabbitMQ as kmsq's broker (``KMSQ_BROKER_URL=amqp://...``): what differs from Redis, in one place.

- Pool queues and reply queues are **quorum queues** (Raft-replicated over the cluster's nodes: a message is
  confirmed to its publisher only once a majority holds it), durable, declared by whoever uses them first, so a
  caller's request waits in its pool's queue even before any worker of that pool ran.
- Every publish waits for the broker's **confirm** and is **mandatory**: a message that reaches no queue comes
  back as an error (kombu raises ``ChannelError`` "NO_ROUTE") instead of being dropped silently.
- A reply queue **expires** when unused for ``REPLY_QUEUE_TTL_SECONDS`` (``x-expires``: no consumer, no
  declaration), as a Redis reply list does after its last reply.
- ``KMSQ_NAMESPACE`` is the **vhost**: deployments on one RabbitMQ never see each other's queues, exchanges,
  remote-control or event messages. A URL naming another vhost than the namespace is refused.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from kombu.entity import Exchange, Queue

from worker.config import DEFAULT_REPLY_QUEUE_TTL_SECONDS

_URL_LIST = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")  # kombu's failover list, as worker.config splits it
QUORUM = {"x-queue-type": "quorum"}
# Every client declares its reply queue with this TTL: RabbitMQ refuses a second declaration with other arguments.
REPLY_QUEUE_TTL_SECONDS = DEFAULT_REPLY_QUEUE_TTL_SECONDS
TRANSPORT_OPTIONS = {"confirm_publish": True}
# A publish the broker nacks (a quorum queue without a leader for a moment, after its node was lost) is sent
# again this many times in all, waiting nack_backoff(attempt) between: 0.2, 0.4, 0.8, 1.6, 3.2 s.
NACK_ATTEMPTS = 6


def nack_backoff(attempt: int) -> float:
    """Seconds to wait before sending a nacked message again, after ``attempt`` (0-based) failed."""
    return 0.2 * 2.0**attempt


def nacked(error: BaseException) -> bool:
    """True when ``error`` (kombu's OperationalError, or what it wraps) is the broker's refusal of a confirmed
    publish (``amqp.exceptions.MessageNacked``): the message was not taken, and sending it again is safe."""
    from amqp.exceptions import MessageNacked

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, MessageNacked):
            return True
        seen = seen.__cause__
    return False


def with_vhost(url: str, namespace: str | None) -> str:
    """Returns the RabbitMQ URL ``url`` (or ``;``-separated list of the cluster's nodes) with the vhost of
    ``namespace`` (the URL's own when None). Raises ValueError when the URL names another vhost than the
    namespace."""
    return ";".join(_one_with_vhost(part, namespace) for part in _URL_LIST.split(url))


def _one_with_vhost(url: str, namespace: str | None) -> str:
    parts = urlsplit(url)
    named = unquote(parts.path[1:]) if len(parts.path) > 1 else ""
    if namespace is None:
        return url
    if named and named not in ("/", namespace):
        raise ValueError(f"the broker URL names vhost {named!r} but KMSQ_NAMESPACE is {namespace!r} (with RabbitMQ "
                         "the namespace is the vhost: leave it out of one of them)")  # fmt: skip
    return urlunsplit(parts._replace(path="/" + quote(namespace, safe="")))


def pool_queue_entity(name: str) -> Queue:
    """The quorum queue ``name`` of a pool, bound to a topic exchange of the same name: Celery's native delayed
    delivery (a task retried with a countdown waits in the broker, not in the worker's prefetch) works only through
    topic exchanges; with a direct one a waiting retry blocks a quorum-queue worker until it is due."""
    exchange = Exchange(name, type="topic", durable=True)  # type: ignore[no-untyped-call]
    return Queue(name, exchange, routing_key=name, durable=True, queue_arguments=dict(QUORUM))  # type: ignore[no-untyped-call]


def reply_queue_entity(name: str) -> Queue:
    """A caller's reply queue: quorum, on the default exchange, deleted after REPLY_QUEUE_TTL_SECONDS unused."""
    arguments = {**QUORUM, "x-expires": REPLY_QUEUE_TTL_SECONDS * 1000}
    return Queue(name, durable=True, auto_delete=False, routing_key=name, queue_arguments=arguments)  # type: ignore[no-untyped-call]


def configure(conf: Any) -> None:
    """Sets a Celery app's configuration ``conf`` for RabbitMQ: the queues it creates are quorum queues,
    publishes are confirmed."""
    conf.task_create_missing_queue_type = "quorum"
    conf.task_default_queue_type = "quorum"
    conf.broker_transport_options = dict(TRANSPORT_OPTIONS)


def queue_depth(channel: Any, queue: str) -> int:
    """The messages ready in ``queue`` (how old the oldest one is RabbitMQ does not say without delivering it:
    tasks.metrics.HeadAges bounds it)."""
    return int(channel.queue_declare(queue=queue, passive=True).message_count)
