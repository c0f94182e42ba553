"""SIGTERM under load: the worker stops taking messages, finishes the ones in hand and exits 0 within its
grace time; what it had not started goes back to the queue, and the next worker answers it. Every request
gets exactly one answer and one effect."""

from __future__ import annotations

import secrets
import signal
import time

import pytest
from sqlalchemy import func, select

from tasks.client import KmsClient
from tasks.identity import Fleet
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment, start_worker
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction
from worker.storage.models import AuditRecord, PrivateKey, RequestRecord

pytestmark = pytest.mark.brokers

POOL = "nu"
REQUESTS = 300
GRACE_SECONDS = 30  # docker-compose.yml's stop_grace_period; systemd's TimeoutStopSec is longer


def test_sigterm_under_load_loses_nothing(deployment: Deployment) -> None:
    root = deployment.service.create_root_key("aes-256", POOL).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, POOL)
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": POOL})
    first = start_worker(POOL, 2, deployment.env(), deployment.directory / "worker-nu-1.log")
    with KmsClient(deployment.broker_url, deployment.register("drainer"), fleet, timeout=180,
                   namespace=NAMESPACE) as kms:  # fmt: skip
        keys = {random_pub(): "xprv" + secrets.token_hex(24) for _ in range(REQUESTS)}
        deployment.secrets.extend(prv.encode() for prv in keys.values())
        futures = [kms.submit_put_key(pub, prv, "btc", "user", "tss", root) for pub, prv in keys.items()]
        while sum(f.done() for f in futures) < 30:  # under way
            time.sleep(0.01)
        first.process.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        code = first.process.wait(timeout=GRACE_SECONDS)
        took = time.monotonic() - stopped
        answered_by_first = sum(f.done() for f in futures)
        assert code == 0 and took < GRACE_SECONDS, (code, took)
        print(f"drain: exit {code} {took:.2f} s after SIGTERM, {sum(f.done() for f in futures)} of {REQUESTS} answered")
        assert answered_by_first < REQUESTS, "the worker finished everything before the signal: no load left"
        second = start_worker(POOL, 2, deployment.env(), deployment.directory / "worker-nu-2.log")
        try:
            replies = [kms.wait(f) for f in futures]
        finally:
            second.stop()
    assert [r["pub"] for r in replies] == list(keys)
    ids = [str(f.request_id) for f in futures]
    with deployment.sessions() as db:
        recorded = db.scalar(select(func.count()).select_from(RequestRecord).where(RequestRecord.request_id.in_(ids)))
        stored = db.scalar(select(func.count()).select_from(PrivateKey).where(PrivateKey.pub.in_(list(keys))))
        audited = db.scalar(
            select(func.count()).select_from(AuditRecord).where(AuditRecord.pool == POOL, AuditRecord.outcome == "ok",
                                                                AuditRecord.request_id.in_(ids))
        )  # fmt: skip
    assert (recorded, stored, audited) == (REQUESTS, REQUESTS, REQUESTS)
    assert "Warm shutdown" in first.log.read_text() or "warm shutdown" in first.log.read_text().lower()
