"""Transient failures: a worker whose database is unreachable retries with backoff and then answers correctly
once; on its final attempt it answers ``unavailable`` (never a wrong reply)."""

from __future__ import annotations

import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from schemas.messages import ReplyEnvelope
from schemas.wire import seal_private_key
from tasks.client import KmsClient
from tasks.identity import Fleet
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment, start_worker
from worker.errors import DatabaseUnavailable
from worker.fleet import ensure_fleet_key, load_fleet_key
from worker.pipeline import Inbound, WorkerContext, handle
from worker.policy import TrustedRows
from worker.storage.db import create_db_engine, session_factory, transaction
from worker.storage.models import PrivateKey, RequestRecord


class Gate:
    """A TCP forwarder to Postgres that the test opens and closes: closed, it drops every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.open = False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.open = False
        for conn in self.connections:
            with suppress(OSError):
                conn.close()
        self.server.close()


@pytest.fixture
def gate(deployment: Deployment) -> Iterator[Gate]:
    url = make_url(deployment.database_url)
    proxy = Gate((url.host or "127.0.0.1", url.port or 5432))
    yield proxy
    proxy.close()


def test_a_worker_retries_while_the_database_is_down(deployment: Deployment, gate: Gate, client: KmsClient) -> None:
    url = make_url(deployment.database_url).set(host="127.0.0.1", port=gate.port)
    env = deployment.env(KMSQ_DATABASE_URL=url.render_as_string(hide_password=False))
    log = deployment.directory / "worker-delta.log"
    # The worker's parent checks the database once before forking: let that through, then close the gate.
    gate.open = True
    deployment.service.create_root_key("aes-256", "delta")
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, "delta")
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": "delta"})
    worker = start_worker("delta", 1, env, log)
    try:
        gate.open = False
        for conn in gate.connections:
            with suppress(OSError):
                conn.close()
        with KmsClient(deployment.broker_url, client.identity, fleet, timeout=60, namespace=NAMESPACE) as kms:
            pub, prv = random_pub(), "xprv" + secrets.token_hex(20)
            deployment.secrets.append(prv.encode())
            future = kms.submit_put_key(pub, prv, "btc", "user", "independent")
            for _ in range(300):  # wait for two failed attempts, with backoff between them
                if "retry 2" in log.read_text():
                    break
                time.sleep(0.1)
            assert "retry 2" in log.read_text(), log.read_text()[-3000:]
            assert not future.done()
            gate.open = True
            assert kms.wait(future)["pub"] == pub
            assert future.reply is not None and future.reply.pool == "delta"
    finally:
        gate.open = True
        worker.stop()
    assert "database temporarily unavailable" in log.read_text() or "database unavailable" in log.read_text()
    with deployment.sessions() as db:
        assert len(db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).all()) == 1
        assert db.scalars(select(RequestRecord.status).where(RequestRecord.request_id == future.request_id)).all() == [
            "ok"
        ]


def test_the_final_attempt_answers_unavailable(deployment: Deployment, client: KmsClient, gate: Gate) -> None:
    """In process: the pipeline with an unreachable database raises for a retry, or answers `unavailable`."""
    with transaction(deployment.sessions) as db:
        fleet = load_fleet_key(deployment.service.hsm, db, "alpha")
    url = make_url(deployment.database_url).set(host="127.0.0.1", port=gate.port)
    engine = create_db_engine(url.render_as_string(hide_password=False))
    rows = TrustedRows(deployment.service.hsm)
    ctx = WorkerContext(deployment.service.hsm, session_factory(engine), "alpha", fleet, rows, timedelta(minutes=5))
    request_id = uuid.uuid4()
    sealed = seal_private_key(fleet.transport.public_key(), client.identity.caller, request_id, b"xprv")
    params = {"op": "put_key", "pub": random_pub(), "prv": sealed, "coin": "btc", "source": "user", "type": "tss"}
    request, args = client.build_request(params, "alpha", request_id)
    message = Inbound("kmsq.put_key", request.reply_queue, str(request_id), args)
    with pytest.raises(DatabaseUnavailable):
        handle(ctx, message)
    delivery = handle(ctx, message, final_attempt=True)
    assert delivery.code == "unavailable" and delivery.queue == request.reply_queue
    reply = client.verify_envelope(ReplyEnvelope(**delivery.envelope))
    assert reply.error is not None and reply.error.code == "unavailable"
    engine.dispose()


def test_a_refused_connection_for_the_request_record_is_transient() -> None:
    """Found by `kmsq chaos`: while Postgres restarted, the record insert could not even get a connection, and the
    request was answered `internal` instead of being retried."""
    from worker.storage.repo import RequestRepository

    engine = create_db_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    with pytest.raises(DatabaseUnavailable), transaction(session_factory(engine)) as db:
        RequestRepository(db).record("c", str(uuid.uuid4()), "0" * 64, "generate_data_key", "{}")
    engine.dispose()
