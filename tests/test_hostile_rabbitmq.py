"""What anyone who may publish to a RabbitMQ vhost can put on a pool's quorum queue, against the real workers
(the Redis counterparts are in tests/test_hostile_broker.py): messages that are not kmsq task messages (not JSON,
a 10,000-level nesting, no headers, an unknown content type, a pickle that would run a command, a body that
claims compression) are dropped with a line that quotes none of them, and the pool keeps serving with the same
processes; a request sent before any worker of its pool started waits in its quorum queue. Unsigned headers and
Celery's own tasks are tested on both brokers in tests/test_hostile_broker.py."""

from __future__ import annotations

import base64
import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from amqp.basic_message import Message

from schemas.wire import pool_queue
from tasks import rabbitmq
from tasks.app import broker_connection
from tasks.client import KmsClient
from tests.queue_fixtures import NAMESPACE, Deployment

pytestmark = pytest.mark.brokers("rabbitmq")

ALPHA = pool_queue("alpha")
NESTED = "[" * 10_000 + "]" * 10_000


def _headers(task: str = "kmsq.put_key") -> dict[str, Any]:
    return {"task": task, "id": str(uuid.uuid4()), "lang": "py", "argsrepr": "", "kwargsrepr": ""}


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _hostile(marker: Path) -> list[Message]:
    json_type = {"content_type": "application/json", "content_encoding": "utf-8"}
    return [
        Message(b"not json", **json_type),
        Message(b"not json", **json_type, application_headers=_headers()),
        Message(NESTED.encode(), **json_type, application_headers=_headers()),
        Message(b'{"x": 1}', **json_type),
        Message(b"\xff\xfe\xfd", **json_type, application_headers=_headers()),
        Message(b"[[], {}, {}]", application_headers=_headers()),  # no content type
        Message(b"\x00\x01", content_type="application/x-unknown", application_headers=_headers()),
        Message(
            pickle.dumps(((_Exploit(marker),), {}, {})),
            content_type="application/x-python-serialize",
            content_encoding="binary",
            application_headers=_headers(),
        ),
        Message(
            base64.b64encode(b"\x1f\x8b not gzip"),
            **json_type,
            application_headers=_headers() | {"compression": "application/x-gzip"},
        ),
        Message(b"[[], {}, {}]", **json_type, application_headers={"task": 7, "id": None}),
    ]


def alive(deployment: Deployment) -> tuple[int | None, set[int]]:
    worker = deployment.workers["alpha"]
    return worker.process.poll(), set(worker.children())


def _ready_in(deployment: Deployment, queue: str) -> int:
    with broker_connection(deployment.broker_url, NAMESPACE) as conn:
        return rabbitmq.queue_depth(conn.default_channel, queue)


def test_messages_that_are_not_task_messages_do_not_stop_the_pool(
    deployment: Deployment, client: KmsClient, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    before = alive(deployment)
    log = deployment.workers["alpha"].log
    offset = log.stat().st_size
    with broker_connection(deployment.broker_url, NAMESPACE) as conn:
        channel = conn.default_channel
        for message in _hostile(marker):
            channel.basic_publish(message, exchange="", routing_key=ALPHA)
        for _ in range(200):
            channel.basic_publish(Message(b'{"x": 1}', content_type="application/json"), exchange="", routing_key=ALPHA)
    key = client.generate_data_key()
    deployment.secrets.append(key["plaintextKey"].encode())
    assert client.decrypt_data_key(key["encryptedKey"]) == {"plaintextKey": key["plaintextKey"]}
    deadline = time.monotonic() + 30
    while _ready_in(deployment, ALPHA):
        assert time.monotonic() < deadline, "hostile messages left on the queue"
        time.sleep(0.2)
    assert alive(deployment) == before  # the same main process and pool processes
    assert not marker.exists()  # the pickle was never unpickled
    time.sleep(1.2)  # drops are logged at most once a second
    written = log.read_text(errors="replace")[offset:]
    assert "dropped" in written and "Unrecoverable error" not in written
    assert "Trying to re-establish" not in written and "Traceback" not in written
    assert "not json" not in written and "x-gzip" not in written and "[[[[" not in written


def test_a_request_to_a_pool_no_worker_ever_served_waits_in_its_quorum_queue(deployment: Deployment,
                                                                             client: KmsClient) -> None:  # fmt: skip
    """The caller declares the pool's queue: what it sent before any worker of the pool started is kept (not
    dropped as unroutable), and a publish to a queue that does not exist is refused, not lost in silence."""
    pool = f"later{uuid.uuid4().hex[:6]}"
    queue = pool_queue(pool)
    client.publish("kmsq.generate_data_key", ["x"], str(uuid.uuid4()), pool, client.reply_queue)
    assert _ready_in(deployment, queue) == 1
    with broker_connection(deployment.broker_url, NAMESPACE) as conn:
        queues = {q: conn.default_channel.queue_declare(queue=q, passive=True) for q in (queue,)}
        assert queues[queue].message_count == 1
        conn.default_channel.queue_delete(queue)
        conn.default_channel.exchange_delete(queue)
    with pytest.raises(Exception, match="NO_ROUTE"), broker_connection(deployment.broker_url, NAMESPACE) as conn:
        producer = conn.Producer(conn.default_channel)
        producer.publish({"x": 1}, exchange="", routing_key=f"kms.nowhere{uuid.uuid4().hex[:6]}", mandatory=True)
