"""The HTTP gateway: the replaced key-provider API, served by an ordinary kmsq caller.

The endpoints of the key-provider API with its paths, bodies and status codes (``POST /key``,
``GET /key/{pub}?source=``, ``POST /generateDataKey``, ``POST /decryptDataKey``, and for external signing
``POST /key/generate`` and ``POST /sign``), errors as ``{"message": ...}``, and ``/openapi.json``.
Each HTTP request becomes one signed kmsq request; secrets travel sealed between the gateway and the workers
and exist in plaintext only inside this process and on the HTTP connection (serve it with TLS).

Imports no HSM or database code: the gateway needs the caller install plus the ``gateway`` extra.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.coins import signing_family
from schemas.limits import (
    HTTP_HEAD_SECONDS,
    HTTP_KEEP_ALIVE_SECONDS,
    MAX_HTTP_BODY_BYTES,
    MAX_HTTP_BODY_MEMORY,
    MAX_HTTP_CONNECTIONS,
    MAX_HTTP_HEAD_BYTES,
    MAX_HTTP_HEADERS,
    Coin,
    EncryptedKey,
    KeyType,
    Prv,
    Pub,
    SignablePayload,
    Source,
    public_message,
)
from schemas.operations import OPERATIONS
from tasks.client import AsyncKmsClient, KmsClient, KmsError, KmsTimeout

log = logging.getLogger("kmsq.gateway")

STATUS_OF_CODE = {"invalid": 400, "not_exportable": 403, "policy_denied": 403, "not_found": 404, "conflict": 409,
                  "unavailable": 503}  # fmt: skip


class Message_(BaseModel):
    """An error: the only shape of a non-200 answer."""

    message: str


class _Body(BaseModel):
    # Old clients may send fields the old API ignored; they are ignored here too, never echoed.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class PutKeyBody(_Body):
    """``POST /key``: a private key to store."""

    prv: Prv
    pub: Pub
    coin: Coin
    source: Source
    type: KeyType


class PutKeyAnswer(BaseModel):
    """The stored key's public fields."""

    pub: str
    coin: str
    source: str
    type: str


class GetKeyAnswer(BaseModel):
    """A stored private key."""

    prv: str
    pub: str
    source: str
    type: str


class GenerateDataKeyBody(_Body):
    """``POST /generateDataKey``; AES-256 is the only key type, and the default."""

    keyType: Literal["AES-256"] = "AES-256"  # the old API's field names


class GenerateDataKeyAnswer(BaseModel):
    """A new data key: ``plaintextKey`` (base64 of 32 bytes) and the ``encryptedKey`` that gives it back."""

    plaintextKey: str
    encryptedKey: str


class DecryptDataKeyBody(_Body):
    """``POST /decryptDataKey``."""

    encryptedKey: EncryptedKey


class DecryptDataKeyAnswer(BaseModel):
    """The data key, exactly the string ``/generateDataKey`` returned."""

    plaintextKey: str


class GenerateKeyBody(_Body):
    """``POST /key/generate``: a key generated and kept inside kmsq (the wallet manager's external signing)."""

    coin: Coin
    source: Source
    type: KeyType


class SignBody(_Body):
    """``POST /sign``: what a generated key signs (a PSBT in hex, or ``0x`` and a 32-byte hash)."""

    pub: Pub
    source: Source
    signablePayload: SignablePayload
    algorithm: Literal["ecdsa", "eddsa"]


class SignAnswer(BaseModel):
    """The signature: the PSBT with this key's signatures (UTXO coins), or ``0x`` + r + s + v (ETH-like)."""

    signature: str


class GatewayError(Exception):
    """An HTTP error answer (with ``headers``, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": Message_, "description": text}
    for status, text in {
        400: "bad request body or parameters",
        403: "the key was generated inside kmsq and is never exported",
        404: "no such key",
        409: "(pub, source) already stored",
        429: "the gateway's caller is over its quota: retry after Retry-After seconds",
        500: "internal error",
        503: "no worker answered in time",
    }.items()
}


# Each endpoint's kmsq operation (schemas.operations) and its answer, which picks fields of the operation's reply
# model (under the old API's names, which are kmsq's: create_app checks that each answer field is one).
ENDPOINTS: dict[str, tuple[str, type[BaseModel]]] = {
    "POST /key": ("put_key", PutKeyAnswer),
    "GET /key/{pub}": ("get_key", GetKeyAnswer),
    "POST /generateDataKey": ("generate_data_key", GenerateDataKeyAnswer),
    "POST /decryptDataKey": ("decrypt_data_key", DecryptDataKeyAnswer),
    "POST /key/generate": ("generate_signing_key", PutKeyAnswer),
    "POST /sign": ("sign", SignAnswer),
}


def check_endpoints() -> None:
    """Raises RuntimeError when an endpoint's answer names a field its operation's reply does not have."""
    for endpoint, (op, answer) in ENDPOINTS.items():
        missing = set(answer.model_fields) - set(OPERATIONS[op].reply.model_fields)
        if missing:
            raise RuntimeError(f"{endpoint} answers {sorted(missing)}, which {op} does not return")


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway asks kmsq for: the root key for new keys (None: the pool's default), and whether
    ``/key/generate`` keeps ETH-like keys in the token (``in_hsm``) rather than as sealed xprvs."""

    root_key_id: str | None = None
    timeout: float = 30.0
    eth_keys_in_hsm: bool = False


class BodyBudget:
    """The request-body bytes one gateway process holds (HttpLimits.body_memory): each request's, from its first
    byte until it is answered. One event loop uses it, so it needs no lock."""

    def __init__(self, limit: int = MAX_HTTP_BODY_MEMORY) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Holds ``size`` bytes more; returns False (holding nothing) when that would exceed the limit."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        """Releases ``size`` bytes held by :meth:`take`."""
        self.held -= size


BODIES_IN_FLIGHT = "too many request bytes in flight"
_RETRY = {"retry-after": "1"}


class BodyLimit:
    """ASGI middleware: answers 400 to bodies over ``limit`` bytes before the application reads them, and 503
    when a body does not fit in ``budget`` (a declared Content-Length before it is read, a chunked body as it
    arrives). What a request takes is given back when it is answered."""

    def __init__(self, app: ASGIApp, limit: int = MAX_HTTP_BODY_BYTES, budget: BodyBudget | None = None) -> None:
        self.app = app
        self.limit = limit
        self.budget = budget if budget is not None else BodyBudget()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _refuse(scope, receive, send, 400, body_too_large(self.limit))
            return
        held = int(declared) if declared is not None else 0
        if not self.budget.take(held):
            await _refuse(scope, receive, send, 503, BODIES_IN_FLIGHT, _RETRY)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received, held
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise GatewayError(400, body_too_large(self.limit))
            if received > held:
                if not self.budget.take(received - held):
                    raise GatewayError(503, BODIES_IN_FLIGHT, _RETRY)
                held = received
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.budget.give_back(held)


def body_too_large(limit: int) -> str:
    """The answer to a body over ``limit`` bytes."""
    return f"request body exceeds {limit} bytes"


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, message: str, headers: dict[str, str] | None = None
) -> None:
    """Answers before the body is read. The connection stays open: uvicorn reads the rest of the body and drops it,
    so a client still sending it gets the answer, not a reset connection (closing with unread bytes sends RST)."""
    response = JSONResponse({"message": message}, status_code=status, headers=headers)
    await response(scope, receive, send)


def create_app(
    client: KmsClient, settings: GatewaySettings | None = None, body_memory: int = MAX_HTTP_BODY_MEMORY
) -> FastAPI:
    """Returns the ASGI application serving the old API through ``client``, holding at most ``body_memory``
    bytes of request bodies at once (:class:`BodyLimit`). The caller closes the client."""
    settings = settings or GatewaySettings()
    check_endpoints()
    app = FastAPI(
        title="kmsq key-provider gateway",
        version="1",
        description="The replaced key-provider API, served through signed kmsq requests.",
        docs_url=None,
        redoc_url=None,
        responses=ERRORS,
    )
    app.add_middleware(BodyLimit, budget=BodyBudget(body_memory))
    _install_error_handlers(app)
    _document_400_instead_of_422(app)

    call = _Calls(AsyncKmsClient(client), settings.timeout)
    gateway_pool = client.pool_for(settings.root_key_id)  # where keys made under the gateway's root key live

    @app.post("/key", response_model=PutKeyAnswer)
    async def put_key(body: PutKeyBody) -> PutKeyAnswer:
        """Stores a private key under the gateway's root key."""
        fields = {"pub": body.pub, "prv": body.prv, "coin": body.coin, "source": body.source, "type": body.type,
                  "root_key_id": settings.root_key_id}  # fmt: skip
        return PutKeyAnswer.model_validate(await call("put_key", fields))

    @app.post("/key/generate", response_model=PutKeyAnswer)
    async def generate_key(body: GenerateKeyBody) -> PutKeyAnswer:
        """Generates a key inside kmsq under the gateway's root key; ``pub`` is its xpub. It signs (``/sign``)
        and is never exported (``GET /key`` answers 403)."""
        in_hsm = settings.eth_keys_in_hsm and signing_family(body.coin) == "eth"
        fields = {"coin": body.coin, "source": body.source, "type": body.type, "root_key_id": settings.root_key_id,
                  "in_hsm": in_hsm}  # fmt: skip
        return PutKeyAnswer.model_validate(await call("generate_signing_key", fields))

    @app.post("/sign", response_model=SignAnswer)
    async def sign(body: SignBody) -> SignAnswer:
        """Signs with a key generated by ``/key/generate``."""
        fields = {"pub": body.pub, "source": body.source, "payload": body.signablePayload, "algorithm": body.algorithm}
        return SignAnswer.model_validate(await call("sign", fields, gateway_pool))

    @app.get("/key/{pub:path}", response_model=GetKeyAnswer)
    async def get_key(
        pub: Annotated[Pub, PathParam()],
        source: Annotated[Source, Query()],
    ) -> GetKeyAnswer:
        """Reads a stored private key. ``pub`` is percent-decoded; it may contain ``/`` and ``+``."""
        return GetKeyAnswer.model_validate(await call("get_key", {"pub": pub, "source": source}))

    @app.post("/generateDataKey", response_model=GenerateDataKeyAnswer)
    async def generate_data_key(body: GenerateDataKeyBody) -> GenerateDataKeyAnswer:
        """Generates an AES-256 data key under the gateway's root key."""
        fields = {"root_key_id": settings.root_key_id, "key_spec": body.keyType}
        return GenerateDataKeyAnswer.model_validate(await call("generate_data_key", fields))

    @app.post("/decryptDataKey", response_model=DecryptDataKeyAnswer)
    async def decrypt_data_key(body: DecryptDataKeyBody) -> DecryptDataKeyAnswer:
        """Gives back the plaintext data key of an ``encryptedKey``. The replaced system's SJCL envelope names
        no pool: it goes to the gateway's."""
        sjcl = body.encryptedKey.lstrip().startswith("{")
        fields = {"encrypted_key": body.encryptedKey}
        return DecryptDataKeyAnswer.model_validate(
            await call("decrypt_data_key", fields, gateway_pool if sjcl else None)
        )

    return app


class _Calls:
    """Runs one kmsq operation for an HTTP request and maps its outcome to the answer's."""

    def __init__(self, client: AsyncKmsClient, timeout: float) -> None:
        self.client = client
        self.timeout = timeout

    async def __call__(self, op: str, fields: dict[str, Any], pool: str | None = None) -> dict[str, Any]:
        """Returns the fields of operation ``op``'s reply (those of its reply model, which each endpoint's
        answer picks from). Raises GatewayError with the HTTP status and message."""
        try:
            return await self.client.run(lambda: self.client.client.call(op, fields, pool), self.timeout)
        except KmsTimeout:
            raise GatewayError(503, "no worker answered in time") from None
        except KmsError as error:
            raise _http_error(error) from None
        except (OperationalError, ConnectionError, OSError) as error:
            log.error("cannot publish to the broker: %s", type(error).__name__)
            raise GatewayError(503, "broker unavailable") from None


def _http_error(error: KmsError) -> GatewayError:
    if error.code == "rate_limited":  # the gateway's caller is over its quota: the HTTP client may come back
        wait = max(1, math.ceil(error.retry_after or 1.0))
        return GatewayError(429, "rate limited: retry later", {"Retry-After": str(wait)})
    status = STATUS_OF_CODE.get(error.code)
    if status is not None:
        return GatewayError(status, error.message)
    # forbidden, unauthenticated, expired, replayed, internal: the gateway's own setup is wrong, not the
    # HTTP client's request. Operators see the code in the log; clients get a stable message.
    log.error("kmsq refused the gateway's request %s: %s (%s)", error.request_id, error.code, error.message)
    return GatewayError(500, "internal error")


def _install_error_handlers(app: FastAPI) -> None:
    async def gateway_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return JSONResponse({"message": exc.message}, status_code=exc.status, headers=exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"message": describe_validation_error(exc)}, status_code=400)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, GatewayError):  # raised while FastAPI read the body (BodyLimit)
            return await gateway_error(_request, exc.__cause__)
        status = exc.status_code if exc.status_code in (404, 405) else 400
        text = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "bad request")
        # Starlette puts the 405's Allow header (RFC 9110 requires it) on the exception.
        return JSONResponse({"message": text}, status_code=status, headers=exc.headers)

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("gateway error: %s", type(exc).__name__)  # the text could hold request data: not logged
        return JSONResponse({"message": "internal error"}, status_code=500)

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        GatewayError: gateway_error,
        RequestValidationError: validation_error,
        StarletteHTTPException: http_error,
        Exception: unexpected,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


def describe_validation_error(exc: RequestValidationError) -> str:
    """Returns a one-line description of the first problem: the field as the client named it and what is
    wrong (schemas.limits), never the value sent."""
    errors = exc.errors()
    if not errors:
        return "bad request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON"
    if first.get("type") == "model_attributes_type" or tuple(first.get("loc", ())) == ("body",):
        return "request body must be a JSON object"
    return public_message(errors, hidden=("body", "query", "path"))


def _document_400_instead_of_422(app: FastAPI) -> None:
    """Drops FastAPI's 422 answers from ``/openapi.json``: the gateway answers a bad request with 400 and
    ``{"message"}``, like the replaced API, and documents only what it answers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate and key, and optionally the CA that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def listening_socket(host: str, port: int) -> socket.socket:
    """Returns a socket bound to ``host:port`` and listening, for several gateway processes to share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class HttpLimits:
    """What HTTP clients, whom the gateway does not authenticate (mTLS aside), can make one gateway process
    hold (schemas.limits): the request head's bytes and header fields, connections, request bodies, and time."""

    max_head_bytes: int = MAX_HTTP_HEAD_BYTES
    max_headers: int = MAX_HTTP_HEADERS
    max_connections: int = MAX_HTTP_CONNECTIONS
    body_memory: int = MAX_HTTP_BODY_MEMORY  # applied by create_app's BodyLimit
    head_seconds: float = HTTP_HEAD_SECONDS
    keep_alive_seconds: int = HTTP_KEEP_ALIVE_SECONDS


# After a refusal the answer is sent (and the sending side shut down, but under TLS), and what the client still
# sends is read and dropped for this long or this much: a client that writes its whole request before it reads
# (most do) gets the answer instead of a reset connection.
LINGER_SECONDS = 1.0
LINGER_BYTES = 1024 * 1024
# After an answer given before its request's body has all arrived (400 over 8 MiB, 503 over the body memory)
# on a connection the client asked to close (the wallet manager's client sends ``Connection: close``): what
# still arrives of the body is dropped for LINGER_SECONDS or this much, then the connection closes.
DRAIN_BYTES = 2 * MAX_HTTP_BODY_BYTES


class _Refused(Exception):
    """Raised in a parser callback: the request is answered ``refusal`` and the connection closed."""


if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol
else:
    _HttpToolsProtocol = object  # imported by http_protocol(), with uvicorn


class _BoundedHttpToolsProtocol(_HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded while it reads (:func:`http_protocol` makes the class)."""

    limits: ClassVar[HttpLimits]
    max_head_bytes: ClassVar[int]  # limits', read on every request
    max_headers: ClassVar[int]
    upgrade: ClassVar[type[Exception]]  # httptools.HttpParserUpgrade
    invalid: ClassVar[type[Exception]]  # httptools.HttpParserError

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served_app = self.app
        self.messages = 0  # requests begun on this connection
        self.head_open = False  # a request's head has begun and is not complete
        self.head_bytes = 0  # its header fields as the parser reported them (the target is self.url)
        self.head_reads = 0  # the bytes of the reads that began and ended inside it (a field not reported yet)
        self.header_fields = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.refusal: tuple[int, str] | None = None
        self.drop_limit = 0  # after a refusal, or an answer given before its body arrived: bytes to drop at most
        self.dropped = 0  # bytes read and dropped since
        self.close_after_response = False  # the client asked to close (Connection: close, HTTP/1.0)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.limits.head_seconds, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.drop_limit:
            self.dropped += len(data)
            if self.dropped > self.drop_limit:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        was_open, messages = self.head_open, self.messages
        try:
            self.parser.feed_data(data)
        except self.upgrade:  # as uvicorn does; kmsq serves no upgrade (ws="none")
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except self.invalid:
            self.refuse(*(self.refusal or (400, "invalid HTTP request")))
            return
        if self.head_open:  # a head is still arriving (a whole one in one read, the usual, costs nothing here)
            if was_open and self.messages == messages:  # all of this read was head
                self.head_reads += len(data)
            if self.head_reads > self.max_head_bytes or len(self.url) > self.max_head_bytes:
                self.refuse(*self.too_large())
            elif self.head_timer is None:
                self.head_timer = self.loop.call_later(self.limits.head_seconds, self.head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.messages += 1
        self.head_open, self.head_bytes, self.head_reads, self.header_fields = True, 0, 0, 0

    def on_header(self, name: bytes, value: bytes) -> None:  # the hot path: once per field of every request
        self.header_fields += 1
        self.head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self.header_fields > self.max_headers or self.head_bytes > self.max_head_bytes:
            raise self.refusing(*self.too_large())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.head_open = False
        if self.head_timer is not None:
            self.cancel_head_timer()
        if self.head_bytes + len(self.url) > self.max_head_bytes:
            raise self.refusing(*self.too_large())
        limit = self.limits.max_connections
        if len(self.connections) <= limit and len(self.tasks) < limit:
            super().on_headers_complete()
            self.close_by_lingering()
            return
        _overloaded.note(len(self.connections), len(self.tasks), limit)
        self.app = _overloaded
        try:
            super().on_headers_complete()
        finally:
            self.app = self.served_app

    def close_by_lingering(self) -> None:
        """Where the client asked to close, uvicorn would close as soon as the answer is written, even with the
        request's body still arriving: the unread bytes make the kernel send a reset, and a client that writes its
        whole body before it reads loses the answer (``write ECONNRESET``). Here the cycle keeps the connection,
        and :meth:`on_response_complete` closes it, after lingering if the body is still arriving."""
        if self.cycle is not None and not self.cycle.keep_alive:
            self.cycle.keep_alive = True
            self.close_after_response = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.close_after_response or self.transport.is_closing():
            return
        self.close_after_response = False
        self._unset_keepalive_if_required()
        if self.cycle is not None and self.cycle.more_body:  # answered before the body arrived
            self.linger(DRAIN_BYTES)
        else:
            self.transport.close()

    def linger(self, drop_limit: int) -> None:
        """Closes the connection once the client has had the answer: the sending side is shut down (but under
        TLS), and what still arrives is dropped for LINGER_SECONDS or ``drop_limit`` bytes."""
        self.drop_limit = drop_limit
        if self.transport.can_write_eof():  # not under TLS: the client reads the answer's Content-Length
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def too_large(self) -> tuple[int, str]:
        """The refusal of a head over the limits: 414 when the request target alone is too long."""
        if self.header_fields > self.max_headers:
            return 431, f"more than {self.max_headers} request header fields"
        if len(self.url) > self.max_head_bytes:
            return 414, f"request target exceeds {self.max_head_bytes} bytes"
        return 431, head_too_large(self.max_head_bytes)

    def refusing(self, status: int, message: str) -> _Refused:
        """What a parser callback raises to refuse the request (data_received answers it)."""
        self.refusal = (status, message)
        return _Refused(message)

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.refusal is not None:
            return
        if self.head_open:
            self.refuse(408, f"request head not received within {self.limits.head_seconds:g} s")
        elif self.cycle is None:  # connected, and sent nothing
            self.transport.close()

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def refuse(self, status: int, message: str) -> None:
        """Answers ``status`` with ``{"message"}`` and closes the connection, after lingering."""
        self.refusal = (status, message)
        self.cancel_head_timer()
        self._unset_keepalive_if_required()
        log.warning("refused an HTTP request from %s: %d %s", _address(self.client), status, message)
        if self.cycle is not None and not self.cycle.response_complete:  # pipelined behind an answer
            self.transport.close()
            return
        body = json.dumps({"message": message}).encode()
        content = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                    b"\r\nconnection: close\r\n\r\n", body]  # fmt: skip
        self.transport.write(b"".join(content))
        self.linger(LINGER_BYTES)


def http_protocol(limits: HttpLimits) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol (kept for its speed: docs/PERFORMANCE.md), bounded while it reads.

    httptools has no limit of its own: it gathers a header field whole before it reports it, and uvicorn the
    request target, so one endless field grew the process without bound. Here the head's bytes are counted as
    they arrive (the target and the fields the parser reports, and every read that left the head unfinished),
    and its fields as the parser reports them: over ``limits`` the request is answered 431 (414 for the target)
    with ``{"message"}`` and the connection closed, having held at most the limit and a read or two. A head must
    arrive within ``head_seconds`` (408); over ``max_connections`` connections, or as many requests in flight,
    a request is answered 503 and its connection closed."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    attributes = {"limits": limits, "max_head_bytes": limits.max_head_bytes, "max_headers": limits.max_headers,
                  "upgrade": httptools.HttpParserUpgrade, "invalid": httptools.HttpParserError}  # fmt: skip
    protocol: type[asyncio.Protocol] = type(
        "LimitedHttpToolsProtocol", (_BoundedHttpToolsProtocol, HttpToolsProtocol), attributes
    )
    return protocol


def head_too_large(limit: int) -> str:
    """The answer to a request head over ``limit`` bytes."""
    return f"request header fields exceed {limit} bytes"


def _address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


class _Overloaded:
    """The ASGI application answering a request over the connection limit: 503, and the connection closed.
    Logs at most every 10 s how many it answered."""

    BODY = json.dumps({"message": "too many connections"}).encode()

    def __init__(self) -> None:
        self.answered = 0
        self.logged = -math.inf

    def note(self, connections: int, in_flight: int, limit: int) -> None:
        self.answered += 1
        if time.monotonic() - self.logged >= 10:
            log.warning("over the connection limit (%d; now %d connections, %d requests in flight): answered 503 "
                        "%d times since the last such line", limit, connections, in_flight, self.answered)  # fmt: skip
            self.answered, self.logged = 0, time.monotonic()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.BODY)).encode()),
                   (b"connection", b"close"), (b"retry-after", b"1")]  # fmt: skip
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": self.BODY})


_overloaded = _Overloaded()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or a name: every address it resolves to) is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(address)).is_loopback for address in addresses)


def plain_http_warning(host: str, port: int, tls: TlsFiles | None) -> str | None:
    """The warning for serving without TLS beyond loopback (None when there is none to give)."""
    if tls is not None or is_loopback(host):
        return None
    return (f"serving plain HTTP on {host}:{port}, beyond loopback: plaintext keys cross the network in the clear "
            "and anyone who reaches the port uses the gateway's permissions; use --tls-cert/--tls-key and "
            "--client-ca, or listen on 127.0.0.1")  # fmt: skip


def configure_logging() -> None:
    """The gateway's log: stderr, uvicorn's format (unless the process configured logging already)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")


def warn_if_exposed(host: str, port: int, tls: TlsFiles | None) -> None:
    """Logs :func:`plain_http_warning` (one line on stderr, in the gateway's log), if there is one."""
    warning = plain_http_warning(host, port, tls)
    if warning is not None:
        configure_logging()
        log.warning(warning)


def serve(
    app: FastAPI,
    host: str,
    port: int,
    tls: TlsFiles | None = None,
    sock: socket.socket | None = None,
    limits: HttpLimits | None = None,
) -> None:
    """Runs the gateway until SIGINT/SIGTERM, on ``sock`` when given (shared by several processes). With
    ``tls`` it serves HTTPS; with a client CA, mTLS only. HTTP clients are held to ``limits``
    (:func:`http_protocol`). The caller warns about plain HTTP beyond loopback (:func:`warn_if_exposed`)."""
    import uvicorn

    limits = limits or HttpLimits()
    options: dict[str, Any] = {}
    if tls is not None:
        options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    configure_logging()
    config = uvicorn.Config(app, host=host, port=port, log_level="info", server_header=False,
                            http=http_protocol(limits), ws="none", timeout_keep_alive=limits.keep_alive_seconds,
                            **options)  # fmt: skip
    uvicorn.Server(config).run(sockets=None if sock is None else [sock])
