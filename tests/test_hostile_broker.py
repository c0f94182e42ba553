"""What anyone with broker access can push onto a pool's queue, against the real workers: entries that are
not kombu messages are dropped (counted, logged without their content) and the pool keeps serving; unsigned
Celery headers (time limits, expiry, eta) do not change how a signed request runs, and Celery's own tasks are not
served (these two on every broker; RabbitMQ's own hostile messages are in tests/test_hostile_rabbitmq.py)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from schemas.wire import namespace_key_prefix, pool_queue
from tasks import rabbitmq
from tasks.app import broker_connection, make_app
from tasks.client import KmsClient
from tasks.transport import decode_entry
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment
from worker import callers
from worker.config import is_rabbitmq
from worker.storage.db import transaction
from worker.storage.models import RequestRecord

ALPHA_QUEUE = pool_queue("alpha")
ALPHA = namespace_key_prefix(NAMESPACE) + ALPHA_QUEUE  # the Redis list behind it


def kombu_entry(body: str, **properties: Any) -> str:
    """A kombu message as kombu's Redis channel stores it, with ``body`` and some properties replaced."""
    props = {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()), "delivery_mode": 2, "priority": 0,
             "delivery_info": {"exchange": "kms.alpha", "routing_key": "kms.alpha"}} | properties  # fmt: skip
    headers = {"task": "kmsq.put_key", "id": str(uuid.uuid4()), "lang": "py", "argsrepr": "", "kwargsrepr": ""}
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": headers, "properties": props})  # fmt: skip


NESTED = "[" * 10_000 + "]" * 10_000
HOSTILE: list[bytes | str] = [
    "not json",
    "[1,2,3]",
    '"kmsq"',
    NESTED,
    '{"x": 1}',
    b'{"x": "\xff\xfe"}',
    b"\xff\xfe\xfd",
    kombu_entry("!!!"),
    kombu_entry(base64.b64encode(NESTED.encode()).decode()),  # a well-formed envelope around a nested body
    kombu_entry("e30=", body_encoding="rot13"),
    kombu_entry("e30=", delivery_info="nowhere"),
    json.dumps({"body": "e30=", "properties": {"delivery_tag": 7}}),
    # Task headers and a body without a content type: kombu hands over the bytes, which Celery's request could
    # not unpack (an error out of the consumer; found on RabbitMQ, tests/test_hostile_rabbitmq.py).
    json.dumps(json.loads(kombu_entry(base64.b64encode(b"[[], {}, {}]").decode())) | {"content-type": None}),
]


@pytest.fixture
def raw_redis(deployment: Deployment) -> Iterator[Any]:
    client = redis.Redis.from_url(deployment.broker_url)
    yield client
    client.close()


def alive(deployment: Deployment) -> tuple[int | None, set[int]]:
    worker = deployment.workers["alpha"]
    return worker.process.poll(), set(worker.children())


def test_decode_entry_accepts_only_kombu_messages() -> None:
    for entry in HOSTILE[:8] + HOSTILE[9:-1]:  # (the 9th and the last are well-formed envelopes)
        payload, reason = decode_entry(entry)
        assert payload is None and reason and "kmsq" not in reason and "!!!" not in reason
    payload, reason = decode_entry(kombu_entry("e30="))
    assert payload is not None and reason == ""


def test_entries_that_are_not_messages_do_not_stop_the_pool(
    deployment: Deployment, client: KmsClient, raw_redis: Any
) -> None:
    before = alive(deployment)
    log = deployment.workers["alpha"].log
    offset = log.stat().st_size
    for entry in HOSTILE:
        raw_redis.lpush(ALPHA, entry)
    raw_redis.lpush(ALPHA, *(['{"x": 1}'] * 200))  # these used to make the consumer reconnect, one by one
    time.sleep(1.1)
    raw_redis.lpush(ALPHA, "not json")  # drops are logged at most once a second: this one makes a line
    key = client.generate_data_key()
    deployment.secrets.append(key["plaintextKey"].encode())
    assert client.decrypt_data_key(key["encryptedKey"]) == {"plaintextKey": key["plaintextKey"]}
    assert raw_redis.llen(ALPHA) == 0  # every entry was taken off the queue
    assert alive(deployment) == before  # the same main process and pool processes
    written = log.read_text(errors="replace")[offset:]
    assert "dropped" in written and "Unrecoverable error" not in written
    assert "Trying to re-establish" not in written and "Traceback" not in written
    assert "not json" not in written and 'kmsq"' not in written and "!!!" not in written


def test_a_message_pushed_onto_a_queue_it_does_not_name_is_dropped(
    deployment: Deployment, raw_redis: Any, tmp_path: Path
) -> None:
    """A caller registered in the bulk lane pushes its signed request straight onto the interactive queue, naming
    the bulk queue in the message (kombu's Redis channel reads the routing key from the entry): it is dropped, not
    served as bulk work taken from the interactive lane."""
    name = f"lanes-{uuid.uuid4().hex[:6]}"
    identity = deployment.register(name)
    with transaction(deployment.sessions) as db:
        callers.set_caller_limits(deployment.service.hsm, db, name, "bulk", None, None)
    log = deployment.workers["alpha"].log
    offset = log.stat().st_size
    with deployment.client(identity, lane="bulk") as kms:
        request, args = kms.build_request({"op": "generate_data_key_without_plaintext", "root_key_id": None,
                                           "key_spec": "AES-256"}, "alpha")  # fmt: skip
        future = kms.expect(request.request_id, args)
        message = kms._app.amqp.create_task_message(
            str(request.request_id), "kmsq.generate_data_key_without_plaintext", args, {},
            reply_to=request.reply_queue, ignore_result=True,
        )  # fmt: skip
        bulk = pool_queue("alpha", "bulk")
        body = base64.b64encode(json.dumps(message.body).encode()).decode()
        entry = json.loads(
            kombu_entry(body, **message.properties, delivery_info={"exchange": bulk, "routing_key": bulk})
        )
        entry["headers"] = message.headers
        raw_redis.lpush(ALPHA, json.dumps(entry))
        deadline = time.monotonic() + 10
        while raw_redis.llen(ALPHA) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # (drops are logged within a second)
        assert raw_redis.llen(ALPHA) == 0 and not future.done()
        assert "names another queue" in log.read_text(errors="replace")[offset:]
        with deployment.sessions() as db:
            assert db.get(RequestRecord, (name, str(request.request_id))) is None
        assert kms.generate_data_key_without_plaintext()["encryptedKey"]  # through the bulk lane: served


def _publisher(deployment: Deployment) -> Any:
    """A Celery app of someone who may publish to the broker, routing to the pool's queue as kmsq does (on
    RabbitMQ: its quorum queue)."""
    app = make_app(deployment.broker_url, "hostile", NAMESPACE)
    if is_rabbitmq(deployment.broker_url):
        app.amqp.queues.add(rabbitmq.pool_queue_entity(ALPHA_QUEUE))
    return app


@pytest.mark.brokers
def test_unsigned_headers_do_not_change_how_a_request_runs(deployment: Deployment, client: KmsClient) -> None:
    """A signed put_key republished with a 1 ms time limit, an expiry in the past and an eta a day away."""
    before = alive(deployment)
    pub, prv = random_pub(), "xprv-" + uuid.uuid4().hex
    request_id = uuid.uuid4()
    params, pool = client.put_keys_params([{"pub": pub, "prv": prv, "coin": "btc", "source": "user",
                                            "type": "tss"}], None, request_id)  # fmt: skip
    _, args = client.build_request(params, pool, request_id)
    future = client.expect(request_id, args)
    app = _publisher(deployment)
    now = datetime.now(UTC)
    message = app.amqp.create_task_message(
        str(request_id), "kmsq.put_keys", args, {}, reply_to=client.reply_queue, ignore_result=True,
        time_limit=0.001, soft_time_limit=0.001, expires=now - timedelta(hours=1), eta=now + timedelta(days=1),
    )  # fmt: skip
    with broker_connection(deployment.broker_url, NAMESPACE) as conn:
        app.amqp.send_task_message(app.amqp.Producer(conn), "kmsq.put_keys", message, queue=ALPHA_QUEUE)
    deployment.secrets.append(prv.encode())
    items = client.wait(future)["items"]  # within the client's 60 s, not a day
    assert items == [{"pub": pub, "coin": "btc", "source": "user", "type": "tss"}]
    assert client.get_key(pub, "user")["prv"] == prv
    assert alive(deployment) == before  # no pool process was killed by a time limit


def test_a_pickled_message_is_never_unpickled(deployment: Deployment, client: KmsClient, tmp_path: Path) -> None:
    """Only JSON is accepted: a task message in pickle form that would run a command is dropped, unread."""
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    body = base64.b64encode(pickle.dumps(((Exploit(),), {}, {}))).decode()
    entry = json.loads(kombu_entry(body))
    entry["content-type"], entry["content-encoding"] = "application/x-python-serialize", "binary"
    raw = redis.Redis.from_url(deployment.broker_url)
    raw.lpush(ALPHA, json.dumps(entry))
    raw.close()
    before = alive(deployment)
    key = client.generate_data_key(with_plaintext=False)  # served after it
    assert key["encryptedKey"] and alive(deployment) == before
    assert not marker.exists()


@pytest.mark.brokers
def test_celery_built_in_tasks_are_not_served(deployment: Deployment, client: KmsClient) -> None:
    """celery.group, celery.chain and the rest need no signature: a worker serves only kmsq.* tasks."""
    app = _publisher(deployment)
    log = deployment.workers["alpha"].log
    offset = log.stat().st_size
    names = ["celery.accumulate", "celery.backend_cleanup", "celery.chain", "celery.chord", "celery.chord_unlock",
             "celery.chunks", "celery.group", "celery.map", "celery.starmap"]  # fmt: skip
    with broker_connection(deployment.broker_url, NAMESPACE) as conn:
        producer = app.amqp.Producer(conn)
        for name in names:
            message = app.amqp.create_task_message(str(uuid.uuid4()), name, [1, 2], {}, ignore_result=True)
            app.amqp.send_task_message(producer, name, message, queue=ALPHA_QUEUE)
    assert client.generate_data_key(with_plaintext=False)["encryptedKey"]
    written = log.read_text(errors="replace")[offset:]
    assert not any(f"Task {name}[" in written for name in names)  # none was received as a task, none ran


def test_a_channel_closed_after_its_transport_is_a_connection_error_not_a_crash(redis_url: str) -> None:
    """After a Sentinel failover Celery closes the broker connection a second time, when kombu has already
    dropped the transport's connection: the channel's restore of its unacknowledged messages then raised an
    AttributeError, which stopped the worker (seen in CI). It is now a connection error, which kombu ignores
    on close; the message stays unacknowledged and is restored later, not lost."""
    from kombu.entity import Queue

    queue_name = f"kms.closing-{uuid.uuid4().hex[:8]}"
    conn = broker_connection(redis_url, NAMESPACE)
    channel = conn.default_channel
    queue = Queue(queue_name, routing_key=queue_name)(channel)
    queue.declare()
    conn.Producer(channel).publish({"n": 1}, routing_key=queue_name, serializer="json")
    message = queue.get(no_ack=False)
    assert message is not None and message.payload == {"n": 1}
    conn.transport.client = None  # what kombu's first close leaves behind
    conn.release()  # the second close: restores nothing, raises nothing
    again = broker_connection(redis_url, NAMESPACE)
    try:
        unacked = redis.Redis.from_url(redis_url).hlen(namespace_key_prefix(NAMESPACE) + "unacked")
        assert unacked >= 1  # kept, for kombu's restore of unacknowledged messages
    finally:
        again.release()
