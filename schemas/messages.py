"""The messages of the queue protocol, version 1 (pydantic v2, frozen, closed, strict).

A request travels as the Celery task ``kmsq.<op>`` with four string arguments::

    [caller, key_id, body (base64url of the JSON bytes of a Request), signature (base64url)]

The worker looks up ``caller``/``key_id``, verifies the signature over the raw body bytes (see
:mod:`schemas.wire`) and only then parses them into :class:`Request`, whose ``params`` are one operation's
(:mod:`schemas.operations`). A reply is published to the request's ``reply_queue`` as the JSON object
:class:`ReplyEnvelope`; its ``body`` parses into :class:`Reply`, whose fields are the operation's reply model
(:mod:`schemas.replies`) split into ``result`` and ``sealed``.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
)

from schemas.limits import MAX_REPLY_BYTES, MAX_RETRY_AFTER_SECONDS, NAME_PATTERN
from schemas.operations import Params
from schemas.requests import Frozen
from schemas.wire import REPLY_QUEUE_PREFIX, ErrorCode, b64u_length

CallerName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
PoolName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
KeyB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{43}$")]  # 32 raw bytes, base64url
REPLY_QUEUE_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _reply_queue_check(value: str) -> str:
    if not value.startswith(REPLY_QUEUE_PREFIX):
        raise ValueError(f"reply_queue must start with {REPLY_QUEUE_PREFIX!r}")
    return value


class Request(Frozen):
    """A signed request. ``reply_queue`` must be ``kmsq.reply.<caller>.<suffix>`` (checked by the worker)."""

    v: Literal[1]
    caller: CallerName
    key_id: Annotated[str, StringConstraints(pattern=r"^ed25519:[0-9a-f]{16}$")]
    request_id: uuid.UUID
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    pool: PoolName
    reply_queue: Annotated[str, StringConstraints(max_length=200), AfterValidator(_reply_queue_check)]
    reply_key: KeyB64
    params: Params


def reply_queue_for(caller: str, suffix: str) -> str:
    """Returns the reply queue name ``kmsq.reply.<caller>.<suffix>``. Raises ValueError for a bad suffix."""
    if not REPLY_QUEUE_SUFFIX.fullmatch(suffix):
        raise ValueError("reply queue suffix must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return f"{REPLY_QUEUE_PREFIX}{caller}.{suffix}"


def reply_queue_belongs_to(queue: str, caller: str) -> bool:
    """Returns True when ``queue`` is one of ``caller``'s reply queues."""
    prefix = f"{REPLY_QUEUE_PREFIX}{caller}."
    return queue.startswith(prefix) and bool(REPLY_QUEUE_SUFFIX.fullmatch(queue[len(prefix) :]))


class ErrorBody(Frozen):
    """A failure: a stable ``code`` (``schemas.wire.ErrorCode``) and a caller-safe message; for ``rate_limited``,
    ``retry_after``: the seconds to wait before the caller's quota takes the request (absent otherwise, so that
    other error replies are as before)."""

    code: ErrorCode
    message: str
    retry_after: float | None = Field(default=None, ge=0, le=MAX_RETRY_AFTER_SECONDS)

    @model_serializer(mode="wrap")
    def _without_absent_wait(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("retry_after") is None:
            data.pop("retry_after", None)
        return data


# Batch replies carry ``items``: one object per item, its fields or ``{"error": code, "message": ...}``.
ResultValue = str | int | bool | None | list[dict[str, str | None]]


class Reply(Frozen):
    """A worker's signed answer. Secret fields are in ``sealed`` (field name → HPKE ciphertext, base64url)."""

    v: Literal[1]
    request_id: uuid.UUID
    caller: str
    op: str
    status: Literal["ok", "error"]
    result: dict[str, ResultValue] = Field(default_factory=dict)
    sealed: dict[str, str] = Field(default_factory=dict)
    error: ErrorBody | None = None
    pool: str
    worker_key_id: str
    issued_at: datetime
    # SHA-256 of the task arguments as the worker received them (signature included, see
    # schemas.wire.args_digest): a caller accepts a reply only for the message it sent, so nobody can
    # answer its request with an error provoked by a forged copy.
    request_digest: str


class ReplyEnvelope(Frozen):
    """What a reply queue carries: the reply's JSON bytes (base64url) and the worker's signature."""

    body: Annotated[str, StringConstraints(max_length=b64u_length(MAX_REPLY_BYTES))]
    signature: str
    key_id: str
