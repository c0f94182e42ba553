"""The path of one request through a worker, without Celery: verify → parse → bind → idempotency →
freshness → authorize → service → persist → signed reply.

:func:`handle` returns the reply to publish (:class:`Delivery`) for every outcome, success or error, and
raises only a :class:`~worker.errors.TransientError` that the task should retry. Effects are exactly once:
the request record (caller, request_id, hash of the signed body, sealed reply) is inserted first, in the same
transaction as the operation's rows, so a redelivered or duplicated message finds it and gets the stored
reply again; a concurrent duplicate blocks on the record's primary key and then finds it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from schemas.limits import MAX_REQUEST_BYTES, NAME, public_message
from schemas.messages import ErrorBody, Reply, ReplyEnvelope, Request, ResultValue, reply_queue_belongs_to
from schemas.operations import (
    BATCH_OPS,
    OPERATIONS,
    OPS,
    Operation,
    batch_items,
    permission_of,
    returns_plaintext,
)
from schemas.replies import sealed_fields
from schemas.wire import (
    DEFAULT_CLOCK_SKEW_SECONDS,
    MAX_REQUEST_TTL_SECONDS,
    WireError,
    args_digest,
    b64u,
    b64u_length,
    canonical_json,
    from_b64u,
    lane_of_queue,
    open_private_key,
    pool_queue,
    reply_signing_input,
    request_signing_input,
    seal_reply_secret,
    sealing_public,
    sign,
    signing_public,
    task_name,
    verify,
)
from worker import audit, audit_log, callers, quotas, record_stamps, retention, service
from worker.audit import UNKNOWN_CALLER
from worker.config import DEFAULT_REPLY_GRACE_SECONDS
from worker.errors import (
    Expired,
    Forbidden,
    InvalidRequest,
    PermanentError,
    RateLimited,
    Replayed,
    ServiceError,
    TransientError,
    Unauthenticated,
)
from worker.fleet import FleetSecrets
from worker.handlers import OpCall, Recorded, handler_of
from worker.keystore import KeyStore
from worker.policy import PolicyNotAnchored, PolicyViolation, TrustedRows
from worker.service import RootKeyAccess
from worker.storage.db import transaction
from worker.storage.models import Caller, RequestRecord, RootKey, RootKeyVersion
from worker.storage.repo import RequestRepository

log = logging.getLogger("kmsq.worker")
_NIL = uuid.UUID(int=0)


@dataclass
class WorkerContext:
    """What a worker process holds: its HSM session, database, pool and fleet keys, the policy rows it trusts
    (callers, root keys, pools: MAC-checked against ``hsm``'s policy key and cached), and its count of refused
    messages (call ``rejections.flush()`` before the process ends)."""

    hsm: KeyStore
    sessions: sessionmaker[Session]
    pool: str
    fleet: FleetSecrets = field(repr=False)
    rows: TrustedRows
    clock_skew: timedelta = timedelta(seconds=DEFAULT_CLOCK_SKEW_SECONDS)
    reply_grace: timedelta = timedelta(seconds=DEFAULT_REPLY_GRACE_SECONDS)
    # Checked before anything is wrapped under a root key version (KMSQ_MIN_TOKENS: worker.replication.CustodyGate).
    gate: Callable[[Session, RootKeyVersion], None] | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    rejections: audit.RejectionCounter = field(init=False, repr=False)
    stamper: record_stamps.Stamper = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rejections = audit.RejectionCounter(self.sessions, self.hsm)
        self.stamper = record_stamps.Stamper(self.fleet)


@dataclass(frozen=True)
class Inbound:
    """A request message as the broker delivered it: the task name, headers and the four arguments."""

    task: str
    reply_to: str | None
    message_id: str | None
    args: Sequence[Any]
    queue: str | None = None  # the pool queue it came from (its lane), when the broker says


@dataclass(frozen=True)
class Delivery:
    """A signed reply to publish. ``queue`` is None when there is nowhere trustworthy to send it."""

    queue: str | None
    envelope: dict[str, str]
    request_id: str
    code: str | None  # None for success
    issued_at: datetime | None = None  # the authenticated request's (for the queue-wait metric)
    items: int | None = None  # a batch's items (for the batch-size metric)
    caller: str | None = None  # the authenticated caller (for the metrics per caller: registered names only)


@dataclass(frozen=True)
class _Claim:
    caller: str
    key_id: str
    body: str
    signature: str


@dataclass(frozen=True)
class _Call:
    """An authenticated, parsed request: the body's hash (idempotency) and the arguments' digest (replies)."""

    request: Request
    body_hash: str
    digest: str

    @property
    def operation(self) -> Operation:
        """The operation's row in the table."""
        return OPERATIONS[self.request.params.op]


class _Rejection(Exception):
    """A failure before the request is authenticated and parsed: store nothing, count it.

    ``reply_queue`` is where the refusal goes: a reply queue named in the *signed* body, so only for a message
    whose signature verified (None otherwise: an unauthenticated message gets no reply, so nobody can make a
    worker fill Redis with replies to queues nobody reads). ``caller`` is the registered caller it claims, or
    None for an unknown one (counted together).
    """

    def __init__(
        self, error: ServiceError, detail: str, *, caller: str | None = None, reply_queue: str | None = None
    ) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail
        self.caller = caller
        self.reply_queue = reply_queue


class _Duplicate(Exception):
    """Another delivery of the same request committed its record first."""


class _Refusal(Exception):
    """An authenticated request is refused before it runs; ``store`` makes the refusal its recorded outcome."""

    def __init__(self, error: ServiceError, *, store: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.store = store


# -- entry point -----------------------------------------------------------------------------------


def handle(ctx: WorkerContext, msg: Inbound, *, final_attempt: bool = False) -> Delivery:
    """Processes one request message and returns the reply to publish.

    Raises TransientError (HSM or database unavailable) unless ``final_attempt``, in which case the caller
    gets an ``unavailable`` reply instead. Never raises for bad input.
    """
    claim = _claim(msg.args)
    digest = args_digest(msg.args)
    call: _Call | None = None  # the authenticated request, once there is one
    try:
        try:
            # The success path is one transaction: the caller lookup (cached), the operation's rows and the
            # request record with its reply.
            with transaction(ctx.sessions) as db:
                request, body_hash, caller = _authenticate(ctx, db, msg, claim)
                call = _Call(request, body_hash, digest)
                _admit(ctx, db, msg, call, caller)
                return _serve(ctx, db, call, caller)
        except _Throttled as t:
            assert call is not None  # only _admit raises it
            return _throttled(ctx, call, t.error, t.answered)
        except (_Duplicate, Recorded):  # Recorded: a handler found the record before an effect it cannot undo
            assert call is not None  # only _serve raises them
            stored = _stored_reply(ctx, call)  # another delivery recorded it: its answer stands
            if stored is None:  # pruned meanwhile (worker.retention): only once every delivery is expired
                return _error_delivery(ctx, call, Expired(), store=False)
            return stored
    except _Rejection as r:
        return _reject(ctx, msg, r, digest)
    except Exception as e:
        if call is None:
            if isinstance(e, TransientError) and final_attempt:
                return _reject(ctx, msg, _unavailable_before_authentication(e, msg, claim), digest)
            raise
        return _failure(ctx, call, e, final_attempt)


def _unavailable_before_authentication(error: TransientError, msg: Inbound, claim: _Claim | None) -> _Rejection:
    """The last attempt found the database or HSM down before it could authenticate: answer ``unavailable`` to
    the claimed caller's reply queue (nobody can cause this, so it cannot be used to fill Redis)."""
    caller = claim.caller if claim is not None and NAME.fullmatch(claim.caller) else None
    queue = msg.reply_to if caller and msg.reply_to and reply_queue_belongs_to(msg.reply_to, caller) else None
    return _Rejection(error, "unavailable before authentication", caller=caller, reply_queue=queue)


def _failure(ctx: WorkerContext, call: _Call, error: Exception, final_attempt: bool) -> Delivery:
    """The reply for an authenticated request that did not succeed. Re-raises a TransientError to retry."""
    if isinstance(error, _Refusal):
        return _error_delivery(ctx, call, error.error, store=error.store)
    if isinstance(error, TransientError):
        if not final_attempt:
            raise error
        return _error_delivery(ctx, call, error, store=False)
    if isinstance(error, PermanentError):  # the request's outcome, stored unless the operation's never are
        return _error_delivery(ctx, call, error, store=call.operation.recorded)
    log.exception("internal error in %s %s", call.request.params.op, call.request.request_id, exc_info=error)
    return _error_delivery(ctx, call, ServiceError(), store=False)


# -- authentication --------------------------------------------------------------------------------


def _claim(args: Sequence[Any]) -> _Claim | None:
    if not isinstance(args, list | tuple) or len(args) != 4 or not all(isinstance(a, str) for a in args):
        return None
    caller, key_id, body, signature = args
    if len(caller) > 64 or len(key_id) > 32 or len(signature) > 128:
        return None
    return _Claim(caller, key_id, body, signature)


def _authenticate(ctx: WorkerContext, db: Session, msg: Inbound, claim: _Claim | None) -> tuple[Request, str, Caller]:
    if claim is None:
        raise _Rejection(InvalidRequest("malformed request message"), "malformed task arguments")
    if len(claim.body) > b64u_length(MAX_REQUEST_BYTES):
        raise _Rejection(InvalidRequest(f"request body exceeds {MAX_REQUEST_BYTES} bytes"), "oversized body")
    try:
        body = from_b64u(claim.body, max_len=MAX_REQUEST_BYTES)
    except WireError:
        raise _Rejection(InvalidRequest("malformed request message"), "body is not base64url") from None
    caller = _registered_caller(ctx, db, claim)
    known = caller.name
    if caller.signing_key_id != claim.key_id:
        raise _Rejection(Unauthenticated(), "unknown signing key", caller=known)
    try:
        verify(signing_public(caller.signing_key), claim.signature, request_signing_input(msg.task, body))
    except WireError:
        raise _Rejection(Unauthenticated(), "bad signature", caller=known) from None
    # From here on the caller really sent these bytes: a refusal goes to the reply queue they name.
    if caller.state != "enabled":
        queue = _signed_reply_queue(body, known)
        raise _Rejection(Unauthenticated(), "disabled caller", caller=known, reply_queue=queue)
    try:
        request = Request.model_validate_json(body)
    except pydantic.ValidationError as e:
        queue = _signed_reply_queue(body, known)
        error = InvalidRequest(_validation_message(e))
        raise _Rejection(error, "malformed body", caller=known, reply_queue=queue) from None
    _bind(ctx, msg, claim, request, caller)
    return request, hashlib.sha256(body).hexdigest(), caller


def _registered_caller(ctx: WorkerContext, db: Session, claim: _Claim) -> Caller:
    """The caller a message claims, as the worker trusts it. Raises _Rejection when it is not registered, its row
    fails its policy check, or no policy row is trusted now."""
    # A name that cannot be registered is not looked up (a NUL would even make Postgres raise).
    try:
        caller = ctx.rows.caller(db, claim.caller) if NAME.fullmatch(claim.caller) else None
    except PolicyNotAnchored:  # no policy row is trusted now (worker.policy_anchor): logged, counted
        raise _Rejection(Unauthenticated(), "policy rows not anchored", caller=claim.caller) from None
    except PolicyViolation:  # refused as if absent; counted under its name so that operators see it
        raise _Rejection(Unauthenticated(), "caller failed its policy check", caller=claim.caller) from None
    if caller is None:
        raise _Rejection(Unauthenticated(), "unknown caller")
    return caller


def _signed_reply_queue(body: bytes, caller: str) -> str | None:
    """The reply queue a signed body names, if it is one of ``caller``'s (read without the full model)."""
    try:
        queue = json.loads(body).get("reply_queue")
    except (ValueError, AttributeError, RecursionError):
        return None
    return queue if isinstance(queue, str) and reply_queue_belongs_to(queue, caller) else None


def _validation_message(error: pydantic.ValidationError) -> str:
    # Only the public field and what is wrong: pydantic's full text quotes the input, which may be secret.
    errors = error.errors(include_input=False, include_url=False, include_context=False)
    return public_message(errors, hidden=("params", *OPS), prefix="malformed request: ")


def _bind(ctx: WorkerContext, msg: Inbound, claim: _Claim, request: Request, caller: Caller) -> None:
    """Checks that the signed body agrees with the message it arrived in and with the caller's registration."""
    queue = request.reply_queue if reply_queue_belongs_to(request.reply_queue, caller.name) else None
    mismatch = (
        request.caller != claim.caller
        or request.key_id != claim.key_id
        or msg.task != task_name(request.params.op)
        or msg.reply_to != request.reply_queue
        or msg.message_id != str(request.request_id)
        or queue is None
    )
    if mismatch:
        # No reply: this is not the message the caller sent (a copy with other headers, whose answer would
        # carry the genuine request's id and arguments' digest and end the caller's wait with an error).
        raise _Rejection(Unauthenticated(), "signed body does not match the message headers", caller=caller.name)
    if request.pool != ctx.pool:
        wrong_pool = InvalidRequest(f"request for pool {request.pool} reached pool {ctx.pool}")
        raise _Rejection(wrong_pool, "wrong pool", caller=caller.name, reply_queue=queue)
    if request.reply_key != caller.reply_key:
        foreign = Forbidden("reply key is not the caller's registered reply key")
        raise _Rejection(foreign, "foreign reply key", caller=caller.name, reply_queue=queue)


def _reject(ctx: WorkerContext, msg: Inbound, rejection: _Rejection, digest: str) -> Delivery:
    """Counts a rejection and returns its reply, signed only when ``rejection.reply_queue`` is set: a refusal
    nobody is told (an unauthenticated message) costs no signature, and its delivery has no envelope.

    A flood of such messages must cost the pool little: no line per refusal is logged (at debug level only);
    the counter logs what it writes, at most once a second (worker.audit)."""
    request_id = _uuid_or_nil(msg.message_id)
    op = msg.task.removeprefix("kmsq.")[:64]
    caller = rejection.caller or UNKNOWN_CALLER
    ctx.rejections.add(ctx.pool, caller, op, rejection.error.code, rejection.detail, request_id)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("rejected %s %s from %s: %s", op, request_id, audit.printable(caller), rejection.detail)
    if rejection.reply_queue is None:
        return Delivery(None, {}, str(request_id), rejection.error.code)
    envelope = _envelope(ctx, request_id, caller, op, digest, error=rejection.error)
    return Delivery(rejection.reply_queue, envelope, str(request_id), rejection.error.code)


def _uuid_or_nil(text: str | None) -> uuid.UUID:
    try:
        return uuid.UUID(text or "")
    except ValueError:
        return _NIL


# -- admission: the caller's lane and quota ---------------------------------------------------------


class _Throttled(Exception):
    """An authenticated request over its caller's quota: nothing of it is done, and nothing is stored."""

    def __init__(self, error: RateLimited, answered: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.answered = answered  # a record of the request exists: a redelivery


def _admit(ctx: WorkerContext, db: Session, msg: Inbound, call: _Call, caller: Caller) -> None:
    """Admits an authenticated request to its pool's lane and its caller's quota (worker.quotas): raises _Refusal
    for a bulk-lane caller's request on the interactive lane, _Throttled when the caller is over its quota."""
    if caller.lane == "bulk" and msg.queue is not None and lane_of_queue(msg.queue) != "bulk":
        error = Forbidden(f"this caller's requests go to the bulk lane ({pool_queue(ctx.pool, 'bulk')})")
        raise _Refusal(error, store=False)
    quota = quotas.Quota.of(caller)
    if quota is None:
        return
    items = batch_items(call.request.params) or 1
    refused = quotas.take(ctx.sessions, ctx.pool, caller.name, quota, items, request_id=str(call.request.request_id),
                          open_transaction=db)  # fmt: skip
    if refused is not None:
        raise _Throttled(RateLimited(refused.retry_after, refused.what), refused.answered)


def _throttled(ctx: WorkerContext, call: _Call, error: RateLimited, answered: bool) -> Delivery:
    """The reply to a request over its quota: the stored reply when another delivery of it was answered (a
    redelivery is not a new request), else ``rate_limited`` with the wait, counted with the refused messages
    (worker.audit: a caller far over its quota costs the pool a count, not an audit record per request)."""
    stored = _stored_reply(ctx, call) if answered else None
    if stored is not None:
        return stored
    request = call.request
    ctx.rejections.add(ctx.pool, request.caller, request.params.op, error.code, "over quota", request.request_id)
    envelope = _envelope(ctx, request.request_id, request.caller, request.params.op, call.digest, error=error)
    return _delivered(request, envelope, error.code)


# -- serving ---------------------------------------------------------------------------------------


def _serve(ctx: WorkerContext, db: Session, call: _Call, caller: Caller) -> Delivery:
    """Runs an authenticated request in the open transaction ``db``: the effect first, then its record.

    The record's insert is the commit point of exactly-once: if another delivery recorded the request
    first, it raises _Duplicate and the caller rolls everything back and re-sends the stored reply. Raises
    _Refusal or the operation's PermanentError (rolled back, then recorded by the caller when the operation's
    outcome is recorded).
    """
    request = call.request
    lifetime = (request.expires_at - request.issued_at).total_seconds()
    if not 0 < lifetime <= MAX_REQUEST_TTL_SECONDS:
        error = InvalidRequest(f"expires_at must be 0-{MAX_REQUEST_TTL_SECONDS} s after issued_at")
        raise _Refusal(error, store=True)
    now = ctx.now()
    if now < request.issued_at - ctx.clock_skew or now > request.expires_at + ctx.clock_skew:
        record = RequestRepository(db).get(request.caller, str(request.request_id))
        if record is not None:  # answered while it was fresh: a late redelivery gets that answer
            raise _Duplicate()
        raise _Refusal(Expired(), store=True)
    try:
        callers.authorize(caller, permission_of(request.params), returns_plaintext(request.params))
    except Forbidden as e:
        raise _Refusal(e, store=True) from None
    disabled = ctx.rows.pool_refusal(db, ctx.pool)
    if disabled is not None:
        raise _Refusal(disabled, store=True)
    operation = call.operation
    keys = RootKeyAccess(ctx.rows, _root_key_check(ctx, caller), ctx.gate)
    permissions = frozenset(caller.allowed_ops.split(","))
    done = handler_of(operation.name)(OpCall(ctx.hsm, db, ctx.pool, request, keys, _sealed_input(ctx, call),
                                             permissions), request.params)  # fmt: skip
    result, secrets = _split(operation, request, done.reply)
    reply_key = sealing_public(caller.reply_key)
    sealed = {name: seal_reply_secret(reply_key, request.request_id, name, value) for name, value in secrets.items()}
    envelope = _envelope(
        ctx, request.request_id, request.caller, operation.name, call.digest, result=result, sealed=sealed
    )
    if operation.recorded:
        recorded = RequestRepository(db).record(
            request.caller, str(request.request_id), call.body_hash, operation.name,
            canonical_json(envelope).decode(), **_retention(ctx, request),
        )  # fmt: skip
        if not recorded:
            raise _Duplicate()
    audit_log.append(
        ctx.hsm,
        db,
        ctx.pool,
        actor=request.caller,
        action=operation.name,
        outcome="ok",
        root_key_id=done.root_key_id,
        root_key_version=done.root_key_version,
        request_id=str(request.request_id),
        detail=operation.audit(request.params, done.reply),
    )  # fmt: skip  (the transaction's last step: it locks the chain's head until the commit)
    for action, outcome, detail in done.item_audits:
        audit_log.append(ctx.hsm, db, ctx.pool, actor=request.caller, action=action, outcome=outcome,
                         request_id=str(request.request_id), detail=detail)  # fmt: skip
    return _delivered(request, envelope, None)


def _sealed_input(ctx: WorkerContext, call: _Call) -> bytes | None:
    """The operation's sealed input, opened with the pool's transport key (None when it has none). Raises
    InvalidRequest when it is not sealed to this pool for this request."""
    sealed = call.operation.sealed_input
    if sealed is None:
        return None
    request = call.request
    try:
        return open_private_key(ctx.fleet.transport, request.caller, request.request_id,
                                getattr(request.params, sealed.field))  # fmt: skip
    except WireError:
        raise InvalidRequest(f"{sealed.field} is not sealed to this pool's transport key for this request") from None


def _split(operation: Operation, request: Request, reply: BaseModel) -> tuple[ResultFields, dict[str, bytes]]:
    """A reply model as the wire carries it: its public fields, and its sealed fields (to seal to the caller). A
    batch's items carry their public fields; their sealed ones go together, in item order, as one JSON list
    ``items``, when the batch's items are of an operation that returns plaintext."""
    if operation.name not in BATCH_OPS:
        names = sealed_fields(type(reply))
        secrets = {name: str(getattr(reply, name)).encode() for name in names if getattr(reply, name) is not None}
        return reply.model_dump(mode="json", exclude=set(names)), secrets
    items: list[BaseModel] = list(getattr(reply, "items"))  # noqa: B009
    public: list[dict[str, str | None]] = []
    secret_items: list[str | None] = []
    for item in items:
        hidden = sealed_fields(type(item))
        public.append(item.model_dump(mode="json", exclude=set(hidden)))
        secret_items.append(getattr(item, hidden[0]) if hidden else None)
    secrets = {"items": canonical_json(secret_items)} if returns_plaintext(request.params) else {}
    return {"items": public}, secrets


def _retention(ctx: WorkerContext, request: Request) -> dict[str, Any]:
    """A request record's expiry and its signed retention stamp (worker.record_stamps)."""
    expiry = retention.record_expiry(request.expires_at, ctx.now(), ctx.clock_skew)
    keep = record_stamps.keep_until(expiry, ctx.clock_skew, ctx.reply_grace)
    stamp = ctx.stamper.stamp(request.caller, str(request.request_id), keep)
    return {"expires_at": expiry, "stamp": stamp}


def _delivered(request: Request, envelope: dict[str, str], code: str | None) -> Delivery:
    """The delivery of an authenticated request's reply, with what the worker's metrics need."""
    items = batch_items(request.params)
    return Delivery(request.reply_queue, envelope, str(request.request_id), code, request.issued_at, items,
                    request.caller)  # fmt: skip


def _stored_reply(ctx: WorkerContext, call: _Call) -> Delivery | None:
    """The stored reply when this request was already answered; Replayed for a reused request_id."""
    request = call.request
    with transaction(ctx.sessions) as db:
        record = db.get(RequestRecord, (request.caller, str(request.request_id)))
    if record is None:
        return None
    if record.request_hash != call.body_hash:
        return _error_delivery(ctx, call, Replayed(), store=False)
    return Delivery(request.reply_queue, json.loads(record.reply), str(request.request_id), record.error_code,
                    caller=request.caller)  # fmt: skip


def _root_key_check(ctx: WorkerContext, caller: Caller) -> service.RootKeyCheck:
    def check(root_key: RootKey) -> None:
        if root_key.pool != ctx.pool:
            raise InvalidRequest(f"root key {root_key.id} is in pool {root_key.pool}, not {ctx.pool}")
        callers.authorize_root_key(caller, root_key)

    return check


ResultFields = dict[str, ResultValue]


# -- replies and records ---------------------------------------------------------------------------


def _envelope(
    ctx: WorkerContext,
    request_id: uuid.UUID,
    caller: str,
    op: str,
    digest: str,
    *,
    result: ResultFields | None = None,
    sealed: dict[str, str] | None = None,
    error: ServiceError | None = None,
) -> dict[str, str]:
    reply = Reply(
        v=1,
        request_id=request_id,
        caller=caller,
        op=op,
        status="error" if error else "ok",
        result=result or {},
        sealed=sealed or {},
        error=ErrorBody(code=error.code, message=error.message, retry_after=getattr(error, "retry_after", None))
        if error
        else None,
        pool=ctx.pool,
        worker_key_id=ctx.fleet.signing_key_id,
        issued_at=ctx.now(),
        request_digest=digest,
    )
    body = canonical_json(reply.model_dump(mode="json"))
    signature = sign(ctx.fleet.signing, reply_signing_input(body))
    return ReplyEnvelope(body=b64u(body), signature=signature, key_id=ctx.fleet.signing_key_id).model_dump()


def _error_delivery(ctx: WorkerContext, call: _Call, error: ServiceError, *, store: bool) -> Delivery:
    """Builds an error reply; with ``store`` it becomes the request's recorded outcome (or, if another
    delivery recorded one first, that one is returned). Every error that is the request's outcome is audited;
    a redelivery that finds another delivery's outcome is not a second attempt and leaves no audit record."""
    request = call.request
    envelope = _envelope(ctx, request.request_id, request.caller, request.params.op, call.digest, error=error)
    delivery = _delivered(request, envelope, error.code)
    if not store:
        _audit(ctx, request.caller, str(request.request_id), request.params.op, error.code, error.message)
        return delivery
    with transaction(ctx.sessions) as db:
        recorded = RequestRepository(db).record(
            request.caller, str(request.request_id), call.body_hash, request.params.op,
            canonical_json(envelope).decode(), error.code, **_retention(ctx, request),
        )  # fmt: skip
        if recorded:
            # What the request named first: the audit column keeps 255 characters and a message can be long.
            named = call.operation.audit(request.params, None)
            audit_log.append(
                ctx.hsm, db, ctx.pool, actor=request.caller, action=request.params.op, outcome=error.code,
                request_id=str(request.request_id), detail=f"{named}: {error.message}" if named else error.message,
            )  # fmt: skip
    if not recorded:
        stored = _stored_reply(ctx, call)  # another delivery recorded an outcome first: that one stands
        if stored is not None:
            return stored
    return delivery


def _audit(ctx: WorkerContext, caller: str, request_id: str, op: str, code: str, detail: str) -> None:
    """Records a refusal that is not the request's stored outcome; a database failure here is logged, never
    raised (the reply matters more)."""
    try:
        with transaction(ctx.sessions) as db:
            audit_log.append(ctx.hsm, db, ctx.pool, actor=caller, action=op, outcome=code,
                             request_id=request_id, detail=detail)  # fmt: skip
    except (TransientError, sa_exc.SQLAlchemyError):
        log.warning("could not record the refusal of %s from %r", request_id, caller)
