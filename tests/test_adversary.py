"""Reproductions of an adversarial run against the queue path (real workers, Redis, Postgres, SoftHSM2): each
attack that once worked, kept as a test so that it cannot come back unnoticed."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import select, update

from schemas.messages import Reply
from schemas.wire import b64u, seal_private_key
from tasks.client import KmsClient, KmsError
from tests.conftest import random_pub
from tests.queue_fixtures import Deployment, kmsq_command
from tests.test_queue_rejections import put_body, rejection, signed_args, silently_refused
from worker.storage.db import transaction
from worker.storage.models import AuditRecord, FleetKey, RequestRecord


def test_fleet_export_refuses_public_keys_changed_in_the_database(deployment: Deployment) -> None:
    """`UPDATE fleet_keys SET transport_key=...` used to reach the fleet file, and with it the put_key secrets."""
    attacker = b64u(X25519PrivateKey.generate().public_key().public_bytes_raw())
    with deployment.sessions() as db:
        original = db.get(FleetKey, "beta")
        assert original is not None
        genuine = original.transport_key
    try:
        with transaction(deployment.sessions) as db:
            db.execute(update(FleetKey).where(FleetKey.pool == "beta").values(transport_key=attacker))
        result = subprocess.run([*kmsq_command(), "fleet-key", "export"], env=deployment.env(),
                                capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert result.returncode == 3, result.stdout
        assert "fleet keys of pool 'beta' do not verify" in result.stderr and attacker not in result.stdout
    finally:
        with transaction(deployment.sessions) as db:
            db.execute(update(FleetKey).where(FleetKey.pool == "beta").values(transport_key=genuine))
    exported = subprocess.run([*kmsq_command(), "fleet-key", "export"], env=deployment.env(),
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert json.loads(exported.stdout)["pools"]["beta"]["transport_key"] == genuine


def test_get_result_refuses_another_requests_stored_reply(deployment: Deployment, client: KmsClient) -> None:
    """Copying request Y's stored reply into X's row used to make get_result(X) return Y's data key."""
    x, y = client.submit_generate_data_key(), client.submit_generate_data_key()
    keys = [client.wait(x), client.wait(y)]
    deployment.secrets += [k["plaintextKey"].encode() for k in keys]
    with transaction(deployment.sessions) as db:
        stolen = db.get(RequestRecord, ("full", y.request_id))
        assert stolen is not None
        db.execute(update(RequestRecord).where(RequestRecord.request_id == x.request_id).values(reply=stolen.reply))
    with pytest.raises(KmsError) as refused:
        client.get_result(x.request_id)
    assert (refused.value.code, refused.value.message) == ("internal", "stored result failed integrity check")

    # The SDK checks too, should a worker hand such a reply out: the inner reply must be for the asked id.
    assert y.reply is not None and x.reply is not None
    with deployment.sessions() as db:
        inner = db.get(RequestRecord, ("full", y.request_id))
        assert inner is not None
    outer = Reply(
        v=1, request_id=uuid.uuid4(), caller="full", op="get_result", status="ok",
        result={"reply": inner.reply, "request_id": x.request_id}, pool="alpha",
        worker_key_id=x.reply.worker_key_id, issued_at=datetime.now(UTC), request_digest="0" * 64,
    )  # fmt: skip
    with pytest.raises(KmsError) as mismatch:
        client.unseal(outer, outer.request_id)
    assert mismatch.value.message == "stored reply is for another request"


def test_a_nul_in_pub_is_invalid_and_logs_no_value(deployment: Deployment, client: KmsClient) -> None:
    """A NUL in pub used to reach Postgres (DataError, `internal`) and the log, with the SQL parameters."""
    marker = "xpub-nul-" + uuid.uuid4().hex
    body = put_body(client, random_pub())
    body["params"]["pub"] = marker + "\x00tail"  # past the SDK, which refuses it too
    args = signed_args(client.identity, body, "kmsq.put_key")
    error = rejection(client, "kmsq.put_key", args, body["request_id"])
    assert (error.code, error.message) == ("invalid", "pub must not contain control characters")
    time.sleep(0.2)
    assert marker not in deployment.workers["alpha"].log.read_text(errors="replace")


def test_deeply_nested_prvs_are_invalid(deployment: Deployment, client: KmsClient) -> None:
    """A 10,000-level nested `prvs` used to answer `internal` (RecursionError)."""
    request_id = uuid.uuid4()
    params, pool = client.put_keys_params(
        [{"pub": random_pub(), "prv": "x", "coin": "btc", "source": "user", "type": "tss"}], None, request_id
    )
    nested = ("[" * 10_000 + "]" * 10_000).encode()
    params["prvs"] = seal_private_key(client.fleet.pools[pool].transport_key, "full", request_id, nested)
    before = deployment.count("private_keys")
    with pytest.raises(KmsError) as refused:
        client.wait(client.submit(params, pool, request_id))
    assert (refused.value.code, refused.value.message) == ("invalid", "prvs must be a sealed JSON list of strings")
    assert deployment.count("private_keys") == before


def test_a_nul_in_the_caller_name_is_counted_not_crashed(deployment: Deployment, client: KmsClient) -> None:
    """A NUL in the claimed caller used to fail the task (Postgres DataError) with no audit row at all."""
    body = put_body(client, random_pub())
    args = signed_args(client.identity, body, "kmsq.put_key")
    args[0] = "fu\x00ll"
    log = deployment.workers["alpha"].log
    offset = log.stat().st_size
    row = silently_refused(deployment, client, "kmsq.put_key", args, body["request_id"])
    assert (row.caller, row.code, row.reason) == ("?", "unauthenticated", "unknown caller")
    written = log.read_text(errors="replace")[offset:]
    assert "Traceback" not in written and "raised unexpected" not in written


def test_a_redelivered_put_key_is_not_audited_as_a_conflict(deployment: Deployment, client: KmsClient) -> None:
    """A second delivery of a stored put_key gets the stored `ok`; it used to leave a `conflict` audit record."""
    body = put_body(client, random_pub())
    args = signed_args(client.identity, body, "kmsq.put_key")
    rid = uuid.UUID(body["request_id"])
    for _ in range(2):  # delivered, then delivered again (a redelivery)
        future = client.expect(rid, args)
        client.publish("kmsq.put_key", args, str(rid), "alpha", client.reply_queue)
        assert client.wait(future)["pub"] == body["params"]["pub"]
    with deployment.sessions() as db:
        outcomes = db.scalars(select(AuditRecord.outcome).where(AuditRecord.request_id == str(rid))).all()
    assert outcomes == ["ok"]  # the first delivery's, once
