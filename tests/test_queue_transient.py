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
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from kmsq.chaos.environment import free_port
from kmsq.chaos.hsm_faults import CKR_DEVICE_REMOVED, FaultSwitch, build_fault_module, fault_environment
from schemas.messages import ReplyEnvelope
from schemas.wire import seal_private_key
from tasks.client import KmsClient
from tasks.identity import Fleet
from tests.conftest import TEST_OPERATORS, random_pub
from tests.queue_fixtures import NAMESPACE, Deployment, start_worker
from worker.config import SOFTHSM2_LIBRARY_PATHS
from worker.errors import DatabaseUnavailable
from worker.fleet import ensure_fleet_key, load_fleet_key
from worker.pipeline import Inbound, WorkerContext, handle
from worker.policy import TrustedRows
from worker.storage.db import create_db_engine, session_factory, transaction
from worker.storage.models import PrivateKey, RequestRecord

pytestmark = pytest.mark.brokers


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
    rows = TrustedRows(deployment.service.hsm, operators=TEST_OPERATORS.digest)
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


def _handled(log: Path, request_ids: set[str]) -> set[str]:
    """The requests among ``request_ids`` whose reply the worker logged."""
    return {rid for rid in request_ids if f" {rid} -> " in log.read_text(errors="replace")}


def _wait_for(log: Path, line: str, within: float) -> float:
    """Waits until ``line`` is in the log; returns the seconds it took."""
    started = time.monotonic()
    while line not in log.read_text(errors="replace"):
        assert time.monotonic() - started < within, f"no {line!r} in {within} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_a_worker_whose_token_stops_answering_takes_no_requests_until_it_answers(
    deployment: Deployment, client: KmsClient, tmp_path: Path
) -> None:
    # A second worker of pool alpha, on the same token but through the fault-injecting module: when its token
    # stops answering (CKR_DEVICE_REMOVED on every call), it stops taking requests within seconds (the pool's
    # other worker answers them all, none fails), its /healthz says why, and it takes requests again once the
    # token answers.
    settings = deployment.settings
    real = next(p for p in SOFTHSM2_LIBRARY_PATHS if Path(p).exists())
    switch = FaultSwitch(tmp_path / "hsm-fault")
    env = deployment.env(
        KMSQ_PKCS11_MODULE=str(build_fault_module(tmp_path)), KMSQ_PKCS11_TOKEN_LABEL=settings.pkcs11_token_label,
        KMSQ_PKCS11_PIN_FILE=str(settings.embedded_pin_file), SOFTHSM2_CONF=str(settings.softhsm2_conf),
        **fault_environment(real, switch),
    )  # fmt: skip
    log, port = tmp_path / "worker-faulty.log", free_port()
    worker = start_worker("alpha", 1, env, log, extra=("--metrics-port", str(port)))
    try:
        switch.fail(CKR_DEVICE_REMOVED)
        stopped_in = _wait_for(log, "takes no requests of pool alpha", 15)
        assert stopped_in < 8, stopped_in  # two failed checks, two seconds apart
        with httpx.Client() as http:
            health = http.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["hsm"].startswith("unavailable"), health.text
        futures = [client.submit_generate_data_key() for _ in range(12)]
        replies = [client.wait(future) for future in futures]
        assert all(reply["encryptedKey"] for reply in replies)  # every one answered, by the other worker
        assert _handled(log, {f.request_id for f in futures}) == set()
        switch.clear()
        _wait_for(log, "the token answers again", 15)
        for _ in range(10):  # the two workers share the queue again: this one takes some of it
            futures = [client.submit_generate_data_key() for _ in range(8)]
            for future in futures:
                client.wait(future)
            if _handled(log, {f.request_id for f in futures}):
                break
        else:
            raise AssertionError(f"the worker took no request after its token came back:\n{log.read_text()[-3000:]}")
    finally:
        switch.clear()
        worker.stop()
