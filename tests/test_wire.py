"""The wire contract without a broker: signatures over raw bytes, HPKE seals bound to their request, strict
messages, identity and fleet files."""

from __future__ import annotations

import json
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from schemas.messages import Request, reply_queue_belongs_to, reply_queue_for
from schemas.wire import (
    ERROR_CODES,
    WireError,
    b64u,
    canonical_json,
    from_b64u,
    key_id,
    open_private_key,
    open_reply_secret,
    request_signing_input,
    seal_private_key,
    seal_reply_secret,
    sign,
    signing_public,
    verify,
)
from tasks.identity import CallerIdentity, Fleet, IdentityError


def request_document(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    document: dict[str, Any] = {
        "v": 1,
        "caller": "acme",
        "key_id": "ed25519:0123456789abcdef",
        "request_id": str(uuid.uuid4()),
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=10)).isoformat(),
        "pool": "default",
        "reply_queue": "kmsq.reply.acme.q1",
        "reply_key": b64u(bytes(32)),
        "params": {"op": "get_key", "pub": "xpub", "source": "user"},
    }
    document.update(overrides)
    return document


def test_request_parses_strictly() -> None:
    request = Request.model_validate_json(canonical_json(request_document()))
    assert request.params.op == "get_key"
    with pytest.raises(pydantic.ValidationError):
        request.__setattr__("pool", "other")  # frozen
    for bad in (
        {"extra": 1},
        {"v": 2},
        {"reply_queue": "celery"},
        {"issued_at": "2026-01-01T00:00:00"},  # naive time
        {"params": {"op": "get_key", "pub": "xpub", "source": "cold"}},
        {"params": {"op": "sign", "data": "x"}},
        {"params": {"op": "put_key", "pub": "p", "prv": "x", "coin": "bt\x00c", "source": "user", "type": "tss"}},
        {"caller": "Not A Name"},
    ):
        with pytest.raises(pydantic.ValidationError):
            Request.model_validate_json(canonical_json(request_document(**bad)))


def test_reply_queue_names() -> None:
    assert reply_queue_for("acme", "q1") == "kmsq.reply.acme.q1"
    assert reply_queue_belongs_to("kmsq.reply.acme.q1", "acme")
    assert not reply_queue_belongs_to("kmsq.reply.acme.q1", "acm")
    assert not reply_queue_belongs_to("kmsq.reply.acmex.q1", "acme")
    assert not reply_queue_belongs_to("kmsq.reply.acme.a.b", "acme")
    with pytest.raises(ValueError, match="suffix"):
        reply_queue_for("acme", "a.b")


def test_signature_covers_task_name_and_every_byte() -> None:
    key = Ed25519PrivateKey.generate()
    body = canonical_json(request_document())
    signature = sign(key, request_signing_input("kmsq.get_key", body))
    public = key.public_key()
    verify(public, signature, request_signing_input("kmsq.get_key", body))
    with pytest.raises(WireError):
        verify(public, signature, request_signing_input("kmsq.put_key", body))
    with pytest.raises(WireError):
        verify(public, signature, request_signing_input("kmsq.get_key", body + b" "))
    with pytest.raises(WireError):
        verify(Ed25519PrivateKey.generate().public_key(), signature, request_signing_input("kmsq.get_key", body))
    with pytest.raises(WireError):
        verify(public, signature[:-2], request_signing_input("kmsq.get_key", body))


@given(st.binary(max_size=64))
def test_base64url_is_canonical(data: bytes) -> None:
    text = b64u(data)
    assert from_b64u(text, max_len=len(data)) == data
    for bad in (text + "=", text + " ", text + "*"):
        with pytest.raises(WireError):
            from_b64u(bad, max_len=64)


def test_base64url_rejects_non_canonical_trailing_bits() -> None:
    assert from_b64u("AA", max_len=1) == b"\x00"
    with pytest.raises(WireError):
        from_b64u("AB", max_len=1)  # decodes to the same byte, but is not the canonical encoding
    with pytest.raises(WireError):
        from_b64u(b64u(b"x" * 33), max_len=32)  # longer than the caller's bound


def test_reply_seal_is_bound_to_request_and_field() -> None:
    key = X25519PrivateKey.generate()
    request_id = uuid.uuid4()
    sealed = seal_reply_secret(key.public_key(), request_id, "plaintextKey", b"secret")
    assert open_reply_secret(key, request_id, "plaintextKey", sealed) == b"secret"
    assert b"secret" not in from_b64u(sealed, max_len=1024)
    for args in (
        (key, uuid.uuid4(), "plaintextKey", sealed),
        (key, request_id, "prv", sealed),
        (X25519PrivateKey.generate(), request_id, "plaintextKey", sealed),
        (key, request_id, "plaintextKey", sealed[:-4] + ("AAAA" if sealed[-4:] != "AAAA" else "BBBB")),
    ):
        with pytest.raises(WireError):
            open_reply_secret(*args)


def test_private_key_seal_is_bound_to_caller_and_request() -> None:
    key = X25519PrivateKey.generate()
    request_id = uuid.uuid4()
    sealed = seal_private_key(key.public_key(), "acme", request_id, b"xprv")
    assert open_private_key(key, "acme", request_id, sealed) == b"xprv"
    with pytest.raises(WireError):
        open_private_key(key, "other", request_id, sealed)
    with pytest.raises(WireError):
        open_private_key(key, "acme", uuid.uuid4(), sealed)


def test_identity_files(tmp_path: Path) -> None:
    identity = CallerIdentity.generate("acme")
    private_path, public_path = identity.write(tmp_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    loaded = CallerIdentity.load(private_path)
    assert loaded.key_id == identity.key_id and loaded.reply_public == identity.reply_public
    public = json.loads(public_path.read_text())
    assert signing_public(public["signing_key"]).public_bytes_raw() == identity.signing.public_key().public_bytes_raw()
    assert "signing_key" in public and identity.reply_public == public["reply_key"]
    assert b64u(identity.signing.private_bytes_raw()) not in public_path.read_text()
    assert "acme" in repr(identity) and b64u(identity.signing.private_bytes_raw()) not in repr(identity)
    with pytest.raises(IdentityError, match="already exists"):
        CallerIdentity.generate("acme").write(tmp_path)
    with pytest.raises(IdentityError):
        CallerIdentity.generate("Bad Name")
    with pytest.raises(IdentityError):
        CallerIdentity.load(public_path)  # a public file is not an identity


def test_fleet_file() -> None:
    signing, transport = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    document = {
        "kind": "kmsq-fleet",
        "v": 1,
        "default_pool": "a",
        "pools": {
            "a": {
                "signing_key": b64u(signing.public_key().public_bytes_raw()),
                "transport_key": b64u(transport.public_key().public_bytes_raw()),
                "root_keys": ["rk-1"],
            }
        },
    }
    fleet = Fleet.from_document(document)
    assert fleet.pool_of_root_key("rk-1") == "a" and fleet.pool_of_root_key("rk-2") is None
    public = signing.public_key().public_bytes_raw()
    assert fleet.pools["a"].signing_key.public_bytes_raw() == public
    assert fleet.pools["a"].signing_key_id == key_id(public)
    with pytest.raises(IdentityError):
        Fleet.from_document(document | {"default_pool": "b"})
    with pytest.raises(IdentityError):
        Fleet.from_document(document | {"pools": {"a": {"signing_key": "short"}}})


def test_every_error_class_has_a_wire_code() -> None:
    """Each error the worker raises maps to one of the protocol's codes (schemas.wire.ErrorCode)."""
    import inspect

    from worker import errors, policy

    classes = [c for m in (errors, policy) for _, c in inspect.getmembers(m, inspect.isclass)
               if issubclass(c, errors.ServiceError)]  # fmt: skip
    assert len(classes) >= 10
    assert {c.code for c in classes} <= set(ERROR_CODES)
    assert set(ERROR_CODES) == {"unauthenticated", "forbidden", "policy_denied", "expired", "replayed", "invalid",
                                "conflict", "not_found", "not_exportable", "too_large", "rate_limited", "unavailable",
                                "internal"}  # fmt: skip


def test_root_key_types_are_one_list() -> None:
    """The CLI offers schemas.limits.ROOT_KEY_TYPES; the service makes exactly those."""
    from schemas.limits import ROOT_KEY_TYPES
    from worker.service import RSA_BITS

    assert set(ROOT_KEY_TYPES) == {"aes-256", *RSA_BITS}
