"""The caller's side of the protocol without a broker: build and sign requests, verify replies and open their
sealed fields (docs/PROTOCOL.md). :class:`tasks.client.KmsClient` adds the broker; tests and tools that handle
messages themselves use :class:`KmsCodec` alone.

Imports no HSM or database code, and no broker code either.
"""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic

from schemas.limits import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, FieldError, check_prv, public_message
from schemas.messages import OPS, Operation, Reply, ReplyEnvelope, Request, reply_queue_for
from schemas.wire import (
    DEFAULT_REQUEST_TTL_SECONDS,
    WireError,
    b64u,
    canonical_json,
    from_b64u,
    open_reply_secret,
    reply_signing_input,
    request_signing_input,
    seal_private_key,
    sign,
    task_name,
    verify,
)
from tasks.identity import CallerIdentity, Fleet, FleetPool

Fields = dict[str, Any]
_OPERATION: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(Operation)
# The field each item of a batch reply gets from the sealed ``items`` list, by operation.
BATCH_SECRET_NAMES = {"get_keys": "prv"}


class KmsError(Exception):
    """A request failed. ``code`` is one of ``schemas.wire.ErrorCode``; ``message`` is the worker's text.

    (The worker's own exceptions are ``worker.errors.ServiceError``: this is what a caller gets.)"""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class KmsTimeout(KmsError):
    """No reply arrived in time. The request may still complete: fetch it later with ``get_result``."""

    def __init__(self, request_id: str) -> None:
        super().__init__("unavailable", "no reply from a worker in time", request_id)


class KmsCodec:
    """A caller's requests and replies, as data: signing, sealing, verifying and unsealing. Thread-safe."""

    def __init__(
        self,
        identity: CallerIdentity,
        fleet: Fleet,
        *,
        reply_queue: str | None = None,
        ttl_seconds: int = DEFAULT_REQUEST_TTL_SECONDS,
    ) -> None:
        """``reply_queue`` is the suffix of the caller's reply queue ``kmsq.reply.<caller>.<suffix>`` (default:
        a random one); ``ttl_seconds`` each request's validity."""
        self.identity = identity
        self.fleet = fleet
        self.reply_queue = reply_queue_for(identity.caller, reply_queue or secrets.token_hex(8))
        self.ttl = timedelta(seconds=ttl_seconds)
        # Computed once: deriving them from the keys cost a few hundredths of a millisecond per request.
        self._key_id = identity.key_id
        self._reply_public = identity.reply_public
        self._fleet_keys: tuple[Fleet, dict[str, FleetPool]] | None = None

    # -- requests ----------------------------------------------------------------------------------

    def pool_for(self, root_key_id: str | None) -> str:
        """The pool of a root key (from the fleet file), or the default pool."""
        if root_key_id is None:
            return self.fleet.default_pool
        return self.fleet.pool_of_root_key(root_key_id) or self.fleet.default_pool

    def build_request(
        self, params: dict[str, Any], pool: str, request_id: uuid.UUID | None = None
    ) -> tuple[Request, list[str]]:
        """Returns the request and the signed task arguments ``[caller, key_id, body, signature]``."""
        now = datetime.now(UTC)
        try:
            request = self._validated_request(params, pool, request_id, now)
        except pydantic.ValidationError as e:
            errors = e.errors(include_input=False, include_url=False, include_context=False)
            raise KmsError("invalid", public_message(errors, ("params", *OPS), "malformed request: ")) from None
        body = canonical_json(request.model_dump(mode="json"))
        if len(body) > MAX_REQUEST_BYTES:
            raise KmsError(
                "invalid",
                f"{request.params.op} request is {len(body)} bytes; a message carries at most {MAX_REQUEST_BYTES} "
                "bytes (MAX_REQUEST_BYTES): send fewer or smaller items",
            )
        signature = sign(self.identity.signing, request_signing_input(task_name(request.params.op), body))
        return request, [self.identity.caller, self._key_id, b64u(body), signature]

    def check_params(self, params: dict[str, Any]) -> None:
        """Raises the KmsError (``invalid``) that :meth:`build_request` raises for these parameters, without
        signing anything (a request that will travel inside a batch is checked as its single operation)."""
        try:
            _OPERATION.validate_python(params, strict=False)
        except pydantic.ValidationError as e:
            errors = e.errors(include_input=False, include_url=False, include_context=False)
            raise KmsError("invalid", public_message(errors, ("params", *OPS), "malformed request: ")) from None

    def _validated_request(
        self, params: dict[str, Any], pool: str, request_id: uuid.UUID | None, now: datetime
    ) -> Request:
        return Request.model_validate(
            {
                "v": 1,
                "caller": self.identity.caller,
                "key_id": self._key_id,
                "request_id": request_id or uuid.uuid4(),
                "issued_at": now,
                "expires_at": now + self.ttl,
                "pool": pool,
                "reply_queue": self.reply_queue,
                "reply_key": self._reply_public,
                "params": params,
            },
            strict=False,
        )

    def put_key_params(
        self, pub: str, prv: str, coin: str, source: str, type: str, root_key_id: str | None, request_id: uuid.UUID
    ) -> tuple[dict[str, Any], str]:
        """Returns the ``put_key`` parameters for ``request_id`` (``prv`` sealed) and the pool. Raises KmsError
        (``invalid``) for a ``prv`` out of its limits."""
        try:
            check_prv(prv)
        except FieldError as e:
            raise KmsError("invalid", str(e)) from None
        pool = self.pool_for(root_key_id)
        sealed = seal_private_key(
            self.fleet.pools[pool].transport_key, self.identity.caller, request_id, prv.encode("utf-8")
        )
        params = {"op": "put_key", "pub": pub, "prv": sealed, "coin": coin, "source": source, "type": type,
                  "root_key_id": root_key_id}  # fmt: skip
        return params, pool

    def put_keys_params(
        self, items: list[dict[str, str]], root_key_id: str | None, request_id: uuid.UUID
    ) -> tuple[dict[str, Any], str]:
        """Returns the ``put_keys`` parameters for ``request_id`` (private keys sealed) and the pool."""
        pool = self.pool_for(root_key_id)
        prvs = canonical_json([item["prv"] for item in items])
        sealed = seal_private_key(self.fleet.pools[pool].transport_key, self.identity.caller, request_id, prvs)
        public = [{k: item[k] for k in ("pub", "coin", "source", "type")} for item in items]
        return {"op": "put_keys", "items": public, "prvs": sealed, "root_key_id": root_key_id}, pool

    # -- replies -----------------------------------------------------------------------------------

    def unseal(self, reply: Reply, request_id: uuid.UUID) -> Fields:
        """Returns a reply's fields with its sealed secrets opened; raises KmsError for an error reply."""
        if reply.status == "error" or reply.error is not None:
            code, message = (reply.error.code, reply.error.message) if reply.error else ("internal", "error")
            raise KmsError(code, message, str(reply.request_id))
        fields: Fields = dict(reply.result)
        if reply.op == "get_result" and isinstance(fields.get("reply"), str):
            inner = self.verify_envelope(ReplyEnvelope.model_validate_json(fields["reply"]))
            # Signed by a worker, but maybe for another request (a row's reply copied into this one's).
            if str(inner.request_id) != fields.get("request_id"):
                raise KmsError("internal", "stored reply is for another request", str(reply.request_id))
            return self.unseal(inner, inner.request_id)
        for name, sealed in reply.sealed.items():
            try:
                fields[name] = open_reply_secret(self.identity.reply, request_id, name, sealed).decode("utf-8")
            except (WireError, UnicodeDecodeError):
                raise KmsError("internal", f"reply field {name} does not open with this caller's key") from None
        if isinstance(fields.get("items"), str):  # a batch: the items' secrets, sealed together
            items = reply.result["items"]
            assert isinstance(items, list)
            secrets, fields["items"] = json.loads(fields["items"]), [dict(item) for item in items]
            name = BATCH_SECRET_NAMES.get(reply.op, "plaintextKey")
            for item, secret in zip(fields["items"], secrets, strict=True):
                if secret is not None:
                    item[name] = secret
        return fields

    # -- replies -----------------------------------------------------------------------------------

    def verify_envelope(self, envelope: ReplyEnvelope) -> Reply:
        """Checks the worker's signature and parses the reply. Raises WireError."""
        if self._fleet_keys is None or self._fleet_keys[0] is not self.fleet:
            self._fleet_keys = (self.fleet, {p.signing_key_id: p for p in self.fleet.pools.values()})
        pool = self._fleet_keys[1].get(envelope.key_id)
        key = pool.signing_key if pool is not None else None
        if key is None:
            raise WireError("reply signed by an unknown key")
        body = from_b64u(envelope.body, max_len=MAX_REPLY_BYTES)
        verify(key, envelope.signature, reply_signing_input(body))
        try:
            reply = Reply.model_validate_json(body)
        except pydantic.ValidationError:
            raise WireError("malformed reply") from None
        if reply.caller != self.identity.caller:
            raise WireError("reply for another caller")
        return reply
