"""Every rejection through a real worker: the right code in a signed reply, no key or row written, and an
audit record. Most cases use ``put_key`` so that an accepted request would leave a visible row."""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from schemas.limits import MAX_REQUEST_BYTES
from schemas.wire import b64u, canonical_json, request_signing_input, sign
from tasks.client import KmsClient, KmsError
from tasks.identity import CallerIdentity
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment
from worker import callers
from worker.storage.db import transaction
from worker.storage.models import AuditRecord, PrivateKey, RejectionCount, RequestRecord


def signed_args(identity: CallerIdentity, body: dict[str, Any] | bytes, task: str) -> list[str]:
    """Task arguments for ``body`` signed by ``identity`` for ``task``."""
    raw = body if isinstance(body, bytes) else canonical_json(body)
    return [identity.caller, identity.key_id, b64u(raw), sign(identity.signing, request_signing_input(task, raw))]


def put_body(client: KmsClient, pub: str, **overrides: Any) -> dict[str, Any]:
    """The JSON body of a valid put_key request from ``client`` (``prv`` sealed for its request_id)."""
    request_id = uuid.uuid4()
    from schemas.wire import seal_private_key

    sealed = seal_private_key(client.fleet.pools["alpha"].transport_key, client.identity.caller, request_id, b"xprv")
    params = {"op": "put_key", "pub": pub, "prv": sealed, "coin": "btc", "source": "user", "type": "independent"}
    request, _ = client.build_request(params, "alpha", request_id)
    body = request.model_dump(mode="json")
    body.update(overrides)
    return body


def rejection(
    client: KmsClient,
    task: str,
    args: list[Any],
    request_id: str,
    reply_to: str | None = None,
    listener: KmsClient | None = None,
) -> KmsError:
    """Publishes a raw message and returns the error the worker answered with."""
    listener = listener or client
    future = listener.expect(uuid.UUID(request_id))
    client.publish(task, args, request_id, "alpha", reply_to or client.reply_queue)
    with pytest.raises(KmsError) as error:
        listener.wait(future)
    return error.value


@pytest.fixture
def unchanged(deployment: Deployment) -> Iterator[None]:
    """Asserts that the test wrote no private key."""
    before = deployment.count("private_keys")
    yield
    assert deployment.count("private_keys") == before


def audited(deployment: Deployment, request_id: str, code: str) -> bool:
    """An authenticated request's refusal: a record of its own in the pool's audit chain."""
    with deployment.sessions() as db:
        codes = db.scalars(select(AuditRecord.outcome).where(AuditRecord.request_id == request_id)).all()
    return code in codes


def counted(deployment: Deployment, request_id: str) -> RejectionCount | None:
    """The per-minute count a refused message went to (as its latest sample), waiting up to 10 s for it."""
    deadline = time.monotonic() + 10
    while True:
        with deployment.sessions() as db:
            row = db.scalars(select(RejectionCount).where(RejectionCount.last_request_id == request_id)).first()
        if row is not None or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def silently_refused(
    deployment: Deployment, client: KmsClient, task: str, args: list[Any], request_id: str, reply_to: str | None = None
) -> RejectionCount:
    """Publishes a raw message that must get no reply; returns its count (caller, code, reason)."""
    future = client.expect(uuid.UUID(request_id))
    client.publish(task, args, request_id, "alpha", reply_to or client.reply_queue)
    row = counted(deployment, request_id)
    assert row is not None, "the refusal was not counted"
    time.sleep(0.3)  # a reply would be published right after the count
    assert not future.done(), "an unauthenticated message got a reply"
    future.cancel()
    assert no_record(deployment, request_id)
    return row


def no_record(deployment: Deployment, request_id: str) -> bool:
    with deployment.sessions() as db:
        return db.scalars(select(RequestRecord).where(RequestRecord.request_id == request_id)).first() is None


def flip(text: str, index: int) -> str:
    return text[:index] + ("B" if text[index] == "A" else "A") + text[index + 1 :]


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("part", ["signature", "body"])
def test_a_flipped_byte_is_unauthenticated(deployment: Deployment, client: KmsClient, part: str) -> None:
    body = put_body(client, random_pub())
    args = signed_args(client.identity, body, "kmsq.put_key")
    if part == "signature":
        args[3] = flip(args[3], 10)
    else:
        args[2] = flip(args[2], len(args[2]) // 2)
    row = silently_refused(deployment, client, "kmsq.put_key", args, body["request_id"])
    assert (row.caller, row.code, row.reason) == ("full", "unauthenticated", "bad signature")


@pytest.mark.usefixtures("unchanged")
def test_an_unknown_caller_is_unauthenticated(deployment: Deployment) -> None:
    stranger = CallerIdentity.generate("stranger")
    with deployment.client(stranger) as client:
        body = put_body(client, random_pub())
        args = signed_args(stranger, body, "kmsq.put_key")
        row = silently_refused(deployment, client, "kmsq.put_key", args, body["request_id"])
    assert (row.caller, row.code, row.reason) == ("?", "unauthenticated", "unknown caller")  # unknown ones pooled


@pytest.mark.usefixtures("unchanged")
def test_a_disabled_caller_is_unauthenticated(deployment: Deployment) -> None:
    identity = deployment.register("retired")
    with deployment.client(identity) as client:
        assert client.generate_data_key(with_plaintext=False)["encryptedKey"]
        with transaction(deployment.sessions) as db:
            callers.set_caller_state(deployment.service.hsm, db, "retired", "disabled")
        time.sleep(1.1)  # workers cache callers for KMSQ_CACHE_SECONDS (1 in these tests)
        with pytest.raises(KmsError) as error:
            client.put_key(random_pub(), "xprv", "btc", "user", "independent")
    assert error.value.code == "unauthenticated"


@pytest.mark.usefixtures("unchanged")
def test_a_key_not_registered_to_the_caller_is_unauthenticated(deployment: Deployment, client: KmsClient) -> None:
    impostor = CallerIdentity.generate("full")  # same name, other keys
    with deployment.client(impostor) as fake:
        body = put_body(fake, random_pub())
        args = signed_args(impostor, body, "kmsq.put_key")
        assert silently_refused(deployment, fake, "kmsq.put_key", args, body["request_id"]).reason == (
            "unknown signing key"
        )
        # Claiming the registered key id does not help without its private key.
        body = put_body(fake, random_pub())
        args = signed_args(impostor, body | {"key_id": client.identity.key_id}, "kmsq.put_key")
        args[1] = client.identity.key_id
        assert silently_refused(deployment, fake, "kmsq.put_key", args, body["request_id"]).reason == "bad signature"


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("shift", [timedelta(hours=-2), timedelta(hours=1)])
def test_an_expired_or_future_request_is_expired(deployment: Deployment, client: KmsClient, shift: timedelta) -> None:
    issued = datetime.now(UTC) + shift
    body = put_body(
        client, random_pub(), issued_at=issued.isoformat(), expires_at=(issued + timedelta(minutes=10)).isoformat()
    )
    error = rejection(client, "kmsq.put_key", signed_args(client.identity, body, "kmsq.put_key"), body["request_id"])
    assert error.code == "expired"
    assert audited(deployment, body["request_id"], "expired")


def test_a_reused_request_id_with_another_body_is_replayed(deployment: Deployment, client: KmsClient) -> None:
    pub = random_pub()
    body = put_body(client, pub)
    first = client.expect(uuid.UUID(body["request_id"]))
    client.publish("kmsq.put_key", signed_args(client.identity, body, "kmsq.put_key"), body["request_id"], "alpha",
                   client.reply_queue)  # fmt: skip
    assert client.wait(first)["pub"] == pub
    before = deployment.count("private_keys")
    other = body | {"params": body["params"] | {"pub": random_pub()}}
    error = rejection(client, "kmsq.put_key", signed_args(client.identity, other, "kmsq.put_key"), body["request_id"])
    assert error.code == "replayed"
    assert deployment.count("private_keys") == before
    assert audited(deployment, body["request_id"], "replayed")


@pytest.fixture(scope="module")
def limited(deployment: Deployment) -> Iterator[KmsClient]:
    """A caller allowed only generate_data_key on alpha's aes-256 root key."""
    identity = deployment.register("limited", ("generate_data_key",), [deployment.roots[("alpha", "aes-256")]])
    with deployment.client(identity) as client:
        yield client


@pytest.fixture(scope="module")
def no_plaintext(deployment: Deployment) -> Iterator[KmsClient]:
    """A caller allowed every operation but no plaintext."""
    identity = deployment.register("noplain", plaintext=False)
    with deployment.client(identity) as client:
        yield client


@pytest.mark.usefixtures("unchanged")
def test_an_operation_not_allowed_is_forbidden(deployment: Deployment, limited: KmsClient) -> None:
    assert len(base64.b64decode(limited.generate_data_key()["plaintextKey"])) == 32
    for call in (
        lambda: limited.put_key(random_pub(), "xprv", "btc", "user", "independent"),
        lambda: limited.generate_data_key(with_plaintext=False),
    ):
        with pytest.raises(KmsError) as error:
            call()
        assert error.value.code == "forbidden"


def test_a_root_key_not_allowed_is_forbidden(deployment: Deployment, limited: KmsClient, client: KmsClient) -> None:
    rsa = deployment.roots[("alpha", "rsa-2048")]
    with pytest.raises(KmsError) as error:
        limited.generate_data_key(rsa)
    assert error.value.code == "forbidden"
    assert "not allowed" in error.value.message


def test_plaintext_not_allowed_is_forbidden(deployment: Deployment, no_plaintext: KmsClient, client: KmsClient) -> None:
    bare = no_plaintext.generate_data_key(with_plaintext=False)
    pub = random_pub()
    prv = "xprv" + secrets.token_hex(16)
    deployment.secrets.append(prv.encode())
    client.put_key(pub, prv, "btc", "user", "independent")
    for call in (
        lambda: no_plaintext.generate_data_key(),
        lambda: no_plaintext.decrypt_data_key(bare["encryptedKey"]),
        lambda: no_plaintext.get_key(pub, "user"),
    ):
        with pytest.raises(KmsError) as error:
            call()
        assert error.value.code == "forbidden"
        assert "plaintext" in error.value.message


@pytest.mark.usefixtures("unchanged")
def test_a_foreign_reply_key_is_forbidden(deployment: Deployment, client: KmsClient) -> None:
    other = CallerIdentity.generate("full")
    body = put_body(client, random_pub(), reply_key=other.reply_public)
    error = rejection(client, "kmsq.put_key", signed_args(client.identity, body, "kmsq.put_key"), body["request_id"])
    assert error.code == "forbidden"


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "payload",
    [b"{not json", b'{"v": 1}', b"[]", "\u00e9".encode("latin-1")],
    ids=["broken", "incomplete", "array", "not-utf8"],
)
def test_malformed_json_is_invalid(deployment: Deployment, client: KmsClient, payload: bytes) -> None:
    """Signed, but no reply queue can be read from it: counted, no reply."""
    request_id = str(uuid.uuid4())
    args = signed_args(client.identity, payload, "kmsq.put_key")
    row = silently_refused(deployment, client, "kmsq.put_key", args, request_id)
    assert (row.code, row.reason) == ("invalid", "malformed body")


@pytest.mark.usefixtures("unchanged")
def test_an_unknown_field_is_invalid(deployment: Deployment, client: KmsClient) -> None:
    body = put_body(client, random_pub(), extra="x")
    error = rejection(client, "kmsq.put_key", signed_args(client.identity, body, "kmsq.put_key"), body["request_id"])
    assert error.code == "invalid"
    assert "extra" in error.message


@pytest.mark.usefixtures("unchanged")
def test_a_message_over_the_size_limit_is_invalid(deployment: Deployment, client: KmsClient) -> None:
    body = put_body(client, random_pub())
    body["params"]["pub"] = "x" * (MAX_REQUEST_BYTES + 1)
    args = signed_args(client.identity, body, "kmsq.put_key")
    row = silently_refused(deployment, client, "kmsq.put_key", args, body["request_id"])
    assert (row.caller, row.code, row.reason) == ("?", "invalid", "oversized body")


@pytest.mark.usefixtures("unchanged")
def test_a_message_moved_to_another_task_is_unauthenticated(deployment: Deployment, client: KmsClient) -> None:
    body = put_body(client, random_pub())
    args = signed_args(client.identity, body, "kmsq.put_key")
    assert silently_refused(deployment, client, "kmsq.get_key", args, body["request_id"]).reason == "bad signature"
    # Signed for the task it claims, a body whose op disagrees is refused too.
    body = put_body(client, random_pub())
    args = signed_args(client.identity, body, "kmsq.get_key")
    row = silently_refused(deployment, client, "kmsq.get_key", args, body["request_id"])
    assert row.reason == "signed body does not match the message headers"


@pytest.mark.usefixtures("unchanged")
def test_a_message_with_another_reply_queue_is_unauthenticated(deployment: Deployment, client: KmsClient) -> None:
    """A copy of a signed request sent with another reply queue gets no reply, neither there nor on the queue
    the request names: the answer would carry the genuine request's id and digest."""
    body = put_body(client, random_pub())
    args = signed_args(client.identity, body, "kmsq.put_key")
    with deployment.client(client.identity, reply_queue="elsewhere") as elsewhere:
        there = elsewhere.expect(uuid.UUID(body["request_id"]))
        row = silently_refused(deployment, client, "kmsq.put_key", args, body["request_id"], elsewhere.reply_queue)
        assert not there.done()
    assert row.reason == "signed body does not match the message headers"


@pytest.mark.usefixtures("unchanged")
def test_a_prv_sealed_for_another_request_is_invalid(deployment: Deployment, client: KmsClient) -> None:
    first, second = put_body(client, random_pub()), put_body(client, random_pub())
    second["params"]["prv"] = first["params"]["prv"]
    error = rejection(
        client, "kmsq.put_key", signed_args(client.identity, second, "kmsq.put_key"), second["request_id"]
    )
    assert error.code == "invalid"


def test_garbage_on_the_queue_does_not_stop_the_worker(deployment: Deployment, client: KmsClient) -> None:
    from tasks.app import broker_connection

    with broker_connection(deployment.broker_url, NAMESPACE) as conn:
        producer = conn.Producer()
        producer.publish(b"\x00garbage", routing_key="kms.alpha", exchange="", content_type="application/json",
                         content_encoding="binary", headers={"task": "kmsq.put_key", "id": "x"})  # fmt: skip
        producer.publish({"not": "a task"}, routing_key="kms.alpha", exchange="", serializer="json")
    client.publish("kmsq.put_key", ["a", "b"], str(uuid.uuid4()), "alpha", client.reply_queue)
    client.publish("kmsq.no_such_task", [], str(uuid.uuid4()), "alpha", client.reply_queue)
    key = client.generate_data_key()
    deployment.secrets.append(key["plaintextKey"].encode())
    assert all(w.process.poll() is None for w in deployment.workers.values())


def test_rejections_change_no_private_key(deployment: Deployment) -> None:
    # Every test stores its keys under pubs of its own (random_pub); generated ones (schemathesis) may share a
    # pub between user and backup.
    with deployment.sessions() as db:
        pubs = db.scalars(select(PrivateKey.pub).where(PrivateKey.pub.startswith(random_pub()[:16]))).all()
    assert pubs and len(pubs) == len(set(pubs))


@pytest.mark.parametrize("forgery", ["signature", "reply_to"])
def test_a_forged_copy_cannot_answer_the_callers_request(
    deployment: Deployment, client: KmsClient, forgery: str
) -> None:
    """Someone on the broker republishes our pending request, with a broken signature or other headers: the
    copy gets no answer (one with our request id and arguments would end our wait with an error), and the
    client gets the answer to its own."""
    request, args = client.build_request({"op": "generate_data_key"}, "alpha")
    forged, reply_to = ([*args[:3], flip(args[3], 5)], request.reply_queue) if forgery == "signature" else (
        args, client.reply_queue + "x")  # fmt: skip
    client.publish("kmsq.generate_data_key", forged, str(request.request_id), "alpha", reply_to)
    assert counted(deployment, str(request.request_id)) is not None
    future = client.submit_raw(request, args)
    key = client.wait(future)
    assert len(base64.b64decode(key["plaintextKey"])) == 32
    deployment.secrets.append(key["plaintextKey"].encode())


def test_a_refused_root_key_is_checked_before_existence(deployment: Deployment, client: KmsClient) -> None:
    """A caller may store only under alpha's aes-256 root key: asking for the rsa one is `forbidden`, even
    for a (pub, source) that exists, so the refusal does not reveal which keys are stored."""
    pub, prv = random_pub(), "xprv" + secrets.token_hex(16)
    deployment.secrets.append(prv.encode())
    rsa = deployment.roots[("alpha", "rsa-2048")]
    client.put_key(pub, prv, "btc", "user", "independent", rsa)
    identity = deployment.register("putter", ("put_key",), [deployment.roots[("alpha", "aes-256")]], plaintext=False)
    with deployment.client(identity) as putter:
        for candidate in (pub, random_pub()):
            with pytest.raises(KmsError) as error:
                putter.put_key(candidate, "xprv-other", "btc", "user", "independent", rsa)
            assert error.value.code == "forbidden"
        with pytest.raises(KmsError) as conflict:
            putter.put_key(pub, "xprv-other", "btc", "user", "independent")
        assert conflict.value.code == "conflict"  # under its own root key, a duplicate is a conflict as usual
