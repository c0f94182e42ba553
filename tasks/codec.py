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

from schemas.envelope import EncryptedDataKey, FormatError
from schemas.limits import MAX_REPLY_BYTES, MAX_REQUEST_BYTES, FieldError, public_message
from schemas.messages import Reply, ReplyEnvelope, Request, reply_queue_for
from schemas.operations import OPERATIONS, OPS, Operation, Params, item_sealed_field
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
_PARAMS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(Params)
SEALED_PLACEHOLDER = "sealed"  # stands for a sealed input while parameters are checked before sealing


class KmsError(Exception):
    """A request failed. ``code`` is one of ``schemas.wire.ErrorCode``; ``message`` is the worker's text.

    (The worker's own exceptions are ``worker.errors.ServiceError``: this is what a caller gets.) For
    ``rate_limited``, ``retry_after`` is the seconds to wait before the caller's quota takes the request."""

    def __init__(
        self, code: str, message: str, request_id: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after


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

    def pool_of_key(self, encrypted_key: str) -> str:
        """The pool of the root key an ``encryptedKey`` names; the default pool for one that does not parse
        (a malformed key goes anyway: the worker answers ``invalid``)."""
        try:
            return self.pool_for(EncryptedDataKey.from_text(encrypted_key).root_key_id)
        except FormatError:
            return self.fleet.default_pool

    def route(self, operation: Operation, fields: dict[str, Any], pool: str | None = None) -> str:
        """The pool a request goes to: ``pool`` when given, else the one its operation's ``pool_from`` field
        picks (a root key's pool, or that of the root key an ``encryptedKey`` names), else the default pool.
        Raises KmsError (``invalid``) for a pool the fleet file does not know."""
        target = pool
        if target is None:
            value = fields.get(operation.pool_from) if operation.pool_from else None
            if operation.pool_from == "root_key_id":
                target = self.pool_for(value)
            elif operation.pool_from == "encrypted_key" and isinstance(value, str):
                target = self.pool_of_key(value)
            elif operation.pool_from == "encrypted_keys" and isinstance(value, list) and value:
                target = self.pool_of_key(str(value[0]))
            else:
                target = self.fleet.default_pool
        if target not in self.fleet.pools:
            raise KmsError("invalid", f"pool {target!r} is not in the fleet file")
        return target

    def check_sealed_input(self, operation: Operation, fields: dict[str, Any]) -> None:
        """Raises KmsError (``invalid``) when the plaintext of the operation's sealed input is out of its limits
        (checked before it is sealed: a seal hides them from the request's own checks)."""
        sealed = operation.sealed_input
        if sealed is None or sealed.check is None:
            return
        try:
            sealed.check(fields.get(sealed.field))
        except FieldError as e:
            raise KmsError("invalid", str(e)) from None

    def request_params(
        self, operation: Operation, fields: dict[str, Any], pool: str, request_id: uuid.UUID
    ) -> dict[str, Any]:
        """The request parameters of ``operation`` with ``fields``, its sealed input (a plaintext in ``fields``)
        sealed to ``pool``'s transport key for ``request_id``. Raises KmsError (``invalid``)."""
        params = {"op": operation.name, **fields}
        sealed = operation.sealed_input
        if sealed is not None:
            self.check_sealed_input(operation, fields)
            try:
                plaintext = sealed.encode(fields.get(sealed.field))
            except ValueError as e:
                raise KmsError("invalid", str(e)) from None
            transport = self.fleet.pools[pool].transport_key
            params[sealed.field] = seal_private_key(transport, self.identity.caller, request_id, plaintext)
        return params

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
        signing anything (a request that will travel inside a batch is checked as its single operation). A
        sealed input may be given as its plaintext: it is checked by its own limit, and stands for its seal."""
        operation = OPERATIONS.get(str(params.get("op")))
        if operation is not None and operation.sealed_input is not None:
            self.check_sealed_input(operation, params)
            params = {**params, operation.sealed_input.field: SEALED_PLACEHOLDER}
        try:
            _PARAMS.validate_python(params, strict=False)
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
        fields = {"pub": pub, "prv": prv, "coin": coin, "source": source, "type": type, "root_key_id": root_key_id}
        return self._sealed_request("put_key", fields, request_id)

    def put_keys_params(
        self, items: list[dict[str, str]], root_key_id: str | None, request_id: uuid.UUID
    ) -> tuple[dict[str, Any], str]:
        """Returns the ``put_keys`` parameters for ``request_id`` (private keys sealed together) and the pool."""
        return self._sealed_request("put_keys", put_keys_fields(items, root_key_id), request_id)

    def _sealed_request(self, op: str, fields: dict[str, Any], request_id: uuid.UUID) -> tuple[dict[str, Any], str]:
        operation = OPERATIONS[op]
        pool = self.route(operation, fields)
        return self.request_params(operation, fields, pool, request_id), pool

    # -- replies -----------------------------------------------------------------------------------

    def unseal(self, reply: Reply, request_id: uuid.UUID) -> Fields:
        """Returns a reply's fields with its sealed secrets opened; raises KmsError for an error reply."""
        if reply.status == "error" or reply.error is not None:
            if reply.error is None:
                raise KmsError("internal", "error", str(reply.request_id))
            error = reply.error
            raise KmsError(error.code, error.message, str(reply.request_id), error.retry_after)
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
            fields["items"] = _items_with_secrets(reply, json.loads(fields["items"]))
        _check_reply_model(reply, fields)
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


def put_keys_fields(items: list[dict[str, str]], root_key_id: str | None = None) -> dict[str, Any]:
    """The ``put_keys`` fields of items ``{pub, prv, coin, source, type}``: their public fields, and their
    private keys as one list (``prvs``, sealed before it is sent)."""
    public = [{k: item[k] for k in ("pub", "coin", "source", "type")} for item in items]
    return {"items": public, "prvs": [item["prv"] for item in items], "root_key_id": root_key_id}


def _items_with_secrets(reply: Reply, secrets: list[Any]) -> list[dict[str, Any]]:
    """A batch reply's items, each with its secret (from the sealed ``items`` list) under its single
    operation's sealed field. Raises KmsError (``internal``) for a reply that does not fit its operation."""
    items, name = reply.result.get("items"), item_sealed_field(reply.op)
    if not isinstance(items, list) or name is None or not isinstance(secrets, list) or len(secrets) != len(items):
        raise KmsError("internal", "reply does not match its operation", str(reply.request_id))
    merged = [dict(item) for item in items]
    for item, secret in zip(merged, secrets, strict=True):
        if secret is not None:
            item[name] = secret
    return merged


def _check_reply_model(reply: Reply, fields: Fields) -> None:
    """Raises KmsError (``internal``) unless ``fields`` are what the reply's operation returns."""
    operation = OPERATIONS.get(reply.op)
    try:
        if operation is None:
            raise ValueError(reply.op)
        operation.reply.model_validate(fields)
    except (ValueError, pydantic.ValidationError):
        raise KmsError("internal", "reply does not match its operation", str(reply.request_id)) from None
