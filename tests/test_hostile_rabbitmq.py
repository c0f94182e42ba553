"""What anyone who may publish to a RabbitMQ vhost can put on a pool's quorum queue, against the real workers
(the Redis counterparts are in tests/test_hostile_broker.py): messages that are not kmsq task messages (not JSON,
a 10,000-level nesting, no headers, an unknown content type, a pickle that would run a command, a body that
claims compression) are dropped with a line that quotes none of them, and the pool keeps serving with the same
processes; Celery's own tasks are not served; unsigned headers do not change how a signed request runs."""

from __future__ import annotations

import base64
import os
import pickle
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from amqp.basic_message import Message

from schemas.wire import pool_queue
from tasks import rabbitmq
from tasks.app import broker_connection, make_app
from tasks.client import KmsClient
from tests.conftest import random_pub
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


def _publisher(deployment: Deployment) -> Any:
    """A Celery app of someone who may publish to the vhost, routing to the pool's quorum queue as kmsq does."""
    app = make_app(deployment.broker_url, "hostile", NAMESPACE)
    app.amqp.queues.add(rabbitmq.pool_queue_entity(ALPHA))
    return app


def test_unsigned_headers_do_not_change_how_a_request_runs(deployment: Deployment, client: KmsClient) -> None:
    """A signed put_keys republished with a 1 ms time limit, an expiry in the past and an eta a day away."""
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
        app.amqp.send_task_message(app.amqp.Producer(conn), "kmsq.put_keys", message, queue=ALPHA)
    deployment.secrets.append(prv.encode())
    items = client.wait(future)["items"]  # within the client's 60 s, not a day
    assert items == [{"pub": pub, "coin": "btc", "source": "user", "type": "tss"}]
    assert client.get_key(pub, "user")["prv"] == prv
    assert alive(deployment) == before  # no pool process was killed by a time limit


def test_celery_built_in_tasks_are_not_served(deployment: Deployment, client: KmsClient) -> None:
    app = _publisher(deployment)
    log = deployment.workers["alpha"].log
    offset = log.stat().st_size
    names = ["celery.accumulate", "celery.backend_cleanup", "celery.chain", "celery.chord", "celery.group"]
    with broker_connection(deployment.broker_url, NAMESPACE) as conn:
        producer = app.amqp.Producer(conn)
        for name in names:
            message = app.amqp.create_task_message(str(uuid.uuid4()), name, [1, 2], {}, ignore_result=True)
            app.amqp.send_task_message(producer, name, message, queue=ALPHA)
    assert client.generate_data_key(with_plaintext=False)["encryptedKey"]
    written = log.read_text(errors="replace")[offset:]
    assert not any(f"Task {name}[" in written for name in names)


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
