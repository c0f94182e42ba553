"""The Celery application factory (settings from ``celeryconfig``), broker connections in a namespace, and a
kombu publishing shortcut."""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import parse_qs

from celery import Celery
from kombu.connection import Connection

import celeryconfig
from schemas.wire import namespace_key_prefix
from tasks import rabbitmq, transport
from worker.config import broker_url_problem, is_rabbitmq

transport.install()  # hostile queue entries are dropped, not fatal (tasks/transport.py)


def transport_options(
    namespace: str | None, master_name: str | None = None, reply_queue_ttl_seconds: int | None = None
) -> dict[str, Any]:
    """Returns the kombu transport options for a deployment in ``namespace``: kmsq's Redis settings and, with a
    namespace, kombu's ``global_keyprefix``, which puts it in front of every Redis key (queues, the unacked
    index, exchange bindings), so deployments on one Redis database never see each other's messages; with a
    Sentinel broker, the monitored master's name; for a worker, the TTL its replies give their reply queues.

    Raises ValueError for a bad namespace."""
    options: dict[str, Any] = dict(celeryconfig.broker_transport_options)
    prefix = namespace_key_prefix(namespace)
    if prefix:
        options["global_keyprefix"] = prefix
    if master_name:
        options["master_name"] = master_name
    if reply_queue_ttl_seconds:
        options["reply_queue_ttl"] = reply_queue_ttl_seconds * 1000
    return options


def split_broker_url(broker_url: str) -> tuple[str, str | None]:
    """Returns kombu's URL and the Sentinel master name of a ``KMSQ_BROKER_URL``.

    A Sentinel broker is ``sentinel://HOST:PORT[;sentinel://HOST:PORT...]?master_name=NAME`` (kombu's URL for
    the sentinels, and the name they monitor the master under). Raises ValueError for a URL kmsq cannot use
    (:func:`worker.config.broker_url_problem`: another transport than Redis or RabbitMQ, or a sentinel URL
    without a master name), at once: kombu would take ``http://`` and retry a broker that is not kmsq's."""
    problem = broker_url_problem(broker_url)
    if problem:
        raise ValueError(problem)
    if not broker_url.lower().startswith("sentinel://"):
        return broker_url, None
    base, _, query = broker_url.partition("?")
    return base, parse_qs(query)["master_name"][0]


def make_app(
    broker_url: str, name: str = "kmsq", namespace: str | None = None, reply_queue_ttl_seconds: int | None = None
) -> Celery:
    """Returns a Celery app on ``broker_url`` (in ``namespace``) with kmsq's settings; it is not made the
    current app. ``reply_queue_ttl_seconds``: see :func:`transport_options`. Raises ValueError for a bad
    namespace or a broker URL kmsq cannot use (:func:`split_broker_url`)."""
    url, master_name = split_broker_url(broker_url)
    app = Celery(name, set_as_current=False)
    app.config_from_object(celeryconfig)
    if is_rabbitmq(url):
        app.conf.broker_url = rabbitmq.with_vhost(url, namespace)
        rabbitmq.configure(app.conf)
        return app
    app.conf.broker_url = url
    app.conf.broker_transport_options = transport_options(namespace, master_name, reply_queue_ttl_seconds)
    return app


def broker_connection(broker_url: str, namespace: str | None = None) -> Connection:
    """Returns a kombu connection (not yet connected) to ``broker_url`` in ``namespace``. Raises ValueError
    for a bad namespace or broker URL."""
    url, master_name = split_broker_url(broker_url)
    if is_rabbitmq(url):
        return Connection(rabbitmq.with_vhost(url, namespace),  # type: ignore[no-untyped-call]
                          transport_options=dict(rabbitmq.TRANSPORT_OPTIONS))  # fmt: skip
    options = transport_options(namespace, master_name)
    return Connection(url, transport_options=options)  # type: ignore[no-untyped-call]


def reuse_redis_client(channel: Any) -> None:
    """Makes a kombu Redis channel run its commands through one redis-py client instead of a new one each.

    kombu's Redis transport (5.x) builds a ``redis.Redis`` object for every publish and acknowledgement
    (``Channel.conn_or_acquire``), and redis-py builds a table of ~170 response callbacks for each: 0.2 ms of
    CPU per message (measured: 0.21 ms per ``redis.Redis(connection_pool=...)``). A redis-py client is
    thread-safe and takes a connection from the channel's pool per command, as before. Calling this again
    on the same channel does nothing; other transports, and kombu versions without these methods, are left
    alone (they then work as before, only slower).
    """
    # Private kombu methods: a working design beats the habit of public APIs only here (see the docstring).
    create = getattr(channel, "_create_client", None)
    if create is None or not hasattr(channel, "conn_or_acquire") or hasattr(channel, "_kmsq_client"):
        return
    client = create()
    channel._kmsq_client = client
    channel.conn_or_acquire = lambda given=None: contextlib.nullcontext(given if given is not None else client)
