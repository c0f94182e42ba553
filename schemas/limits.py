"""Every limit on what a caller sends, defined once.

The gateway's models and its ``/openapi.json``, the queue messages, the worker's checks, the SDK and the
caller commands all use these definitions. A refusal names the field as the caller sent it (``prv must be at
most 1048576 bytes``), never an internal message path.

The field types (:data:`Prv`, :data:`Pub`, :data:`Coin`, :data:`EncryptedKey`) validate with the ``check_*``
functions, whose :class:`FieldError` texts pydantic reports as ``Value error, <text>``; their JSON schema
states the same limits for OpenAPI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, WithJsonSchema

# A private key's UTF-8 bytes. An ECDSA MPCv2 (DKLS) key share, which the Advanced Wallet Manager stores as
# base64(keyShare.toBytes()), is about 330,000 characters.
MAX_PRV_BYTES = 1024 * 1024
MAX_PUB_CHARS = 1024
MAX_COIN_CHARS = 128  # token names such as "hteth:bgerchv2" or an ERC-20 contract address
MAX_ENCRYPTED_KEY_CHARS = 8192  # a kmsq encryptedKey (RSA-4096: ~700) or an SJCL envelope of the old API
MAX_BATCH_ITEMS = 1000
# Quotas (docs/OPERATIONS.md, "Sharing a pool"): a caller's rates, per second, and the longest wait a rate_limited
# reply names (a batch of MAX_BATCH_ITEMS against the lowest items rate).
MIN_RATE_PER_SECOND = 0.001
MAX_RATE_PER_SECOND = 1_000_000.0
MAX_RETRY_AFTER_SECONDS = 3600.0
# A caller's lane in its registry entry: auto (its client picks: batch operations bulk) or bulk (every request).
DEFAULT_LANE = "auto"
CALLER_LANES = (DEFAULT_LANE, "bulk")
MAX_SIGNABLE_PAYLOAD_CHARS = 2 * 1024 * 1024  # a PSBT in hex (a 10-input wallet PSBT is ~10 KB) or a 0x hash
# The inputs and outputs of one PSBT ``sign`` takes. BitGo builds at most 200 unspents into a transaction (bulk
# consolidation and fan-out split at 200 per transaction, the custody web app selects up to 200) and fans out to
# fewer than 300; a standard transaction (100,000 vbytes) holds about 340 signed 2-of-3 p2sh inputs.
MAX_PSBT_INPUTS = 500
MAX_PSBT_OUTPUTS = 500
# A BitGo taproot output has three leaves (utxo-lib's PSBTs carry the one spent); each leaf holding the key is a
# signature, and 14,000 of them in one input took 3.7 s.
MAX_PSBT_TAP_LEAVES_PER_INPUT = 3
# The bytes the legacy (p2sh) sighashes of one PSBT may hash, counted before any key is opened: each legacy input
# hashes the whole transaction (its other inputs' outpoints and sequences, every output) with its redeem script,
# so the work grows with inputs x transaction size. A wallet PSBT at both caps (500 p2sh inputs, 500 outputs of
# up to 43 bytes) needs 21 MB; 32 MiB allows outputs of 92 bytes on average (an OP_RETURN's most) at the caps.
MAX_PSBT_LEGACY_SIGHASH_BYTES = 32 * 1024 * 1024
# A request message's body (JSON bytes, before base64url): a put_key of a full-size prv fits with room to
# spare, and a batch is bounded by this as well as by MAX_BATCH_ITEMS.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
# A reply's body (JSON bytes, before base64url): a get_key of a full-size prv, even wrapped by get_result.
MAX_REPLY_BYTES = 4 * MAX_REQUEST_BYTES
# The plaintext of one sealed field of a reply (a batch's secrets together, as a JSON list): what a worker seals
# at most and a caller opens at most. A get_keys batch answers the items past it ``too_large`` (ask for them
# alone: a single get_key of a full-size prv always fits), and the SDK's coalescer does so by itself.
MAX_REPLY_SECRET_BYTES = 8 * 1024 * 1024
# The gateway's largest HTTP body: a full-size prv even if every byte arrives JSON-escaped (\\u0000, 6x).
MAX_HTTP_BODY_BYTES = 8 * 1024 * 1024
# The gateway's HTTP request head (request line and header fields, counted while they arrive; 431, or 414 for
# the request target alone). The longest kmsq answers is GET /key/{pub} with a 1024-character pub of 4-byte
# characters percent-encoded (12,288 bytes), plus 16 KiB of header fields (h11's and Node.js's own limit).
# The wallet manager's KeyProviderClient (superagent) sends five fields: Host, Accept-Encoding, Content-Type,
# Content-Length, Connection; client certificates are TLS, not header fields.
MAX_HTTP_HEAD_BYTES = 32 * 1024
MAX_HTTP_HEADERS = 100
# What one gateway process serves at once (kmsq gateway --max-connections): beyond it requests are answered
# 503. bench G runs 256 keep-alive clients; each request may hold a body of MAX_HTTP_BODY_BYTES.
MAX_HTTP_CONNECTIONS = 512
# The request-body bytes one gateway process holds at once (kmsq gateway --body-memory-mib), each request's from
# its first byte until it is answered (its Content-Length up front, or what has arrived of a chunked body);
# beyond it a request is answered 503. 8 full-size bodies, or about 190 of the wallet manager's 330 KB MPCv2
# shares; without it 32 slow 8 MiB bodies made one process resident 257 MiB.
MAX_HTTP_BODY_MEMORY = 64 * 1024 * 1024
# How long a request head may take to arrive (kmsq gateway --header-timeout; 408 and the connection closed),
# from the connection's start or the request's first byte; and how long an idle keep-alive connection is kept:
# longer than the 5 s after which Node.js's agent drops its idle sockets, so the client closes first.
HTTP_HEAD_SECONDS = 10.0
HTTP_KEEP_ALIVE_SECONDS = 15

# Names: callers and pools; root key ids.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
NAME = re.compile(NAME_PATTERN)
ROOT_KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ROOT_KEY_ID = re.compile(ROOT_KEY_ID_PATTERN)
# A private key's source and type (the replaced API's values).
Source = Literal["user", "backup"]
KeyType = Literal["independent", "tss"]
SOURCES: tuple[str, ...] = get_args(Source)
KEY_TYPES: tuple[str, ...] = get_args(KeyType)

# A root key's type: an AES-256 key-wrap key, or an RSA key pair (OAEP) of that many bits.
RootKeyType = Literal["aes-256", "rsa-2048", "rsa-3072", "rsa-4096"]
ROOT_KEY_TYPES: tuple[str, ...] = get_args(RootKeyType)

# Unicode category Cc: C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # a lone surrogate (JSON "\ud800") has no UTF-8 encoding
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"


class FieldError(ValueError):
    """A field is out of its limits. The text names the field and the limit, never the value."""


def _text(name: str, value: str, max_chars: int, *, controls: bool) -> str:
    if not isinstance(value, str):
        raise FieldError(f"{name} must be a string")
    if not value:
        raise FieldError(f"{name} must not be empty")
    if len(value) > max_chars:
        raise FieldError(f"{name} must be at most {max_chars} characters")
    if _SURROGATE.search(value):
        raise FieldError(f"{name} must be valid Unicode text")
    if not controls and _CONTROL.search(value):
        raise FieldError(f"{name} must not contain control characters")
    return value


def check_pub(value: str) -> str:
    """Returns ``value`` if it is a valid ``pub``: 1-1024 characters, no control characters. Raises FieldError."""
    return _text("pub", value, MAX_PUB_CHARS, controls=False)


def check_coin(value: str) -> str:
    """Returns ``value`` if it is a valid ``coin``: 1-128 characters, no control characters. Raises FieldError.

    Any such name is kept exactly (``tBTC``, ``sol:usdc``, ``hteth:bgerchv2``): the replaced API took any
    non-empty string."""
    return _text("coin", value, MAX_COIN_CHARS, controls=False)


_HEX = re.compile(r"^(0x)?(?:[0-9a-fA-F]{2})+$")


def check_signable_payload(value: str) -> str:
    """Returns ``value`` if it is a ``signablePayload``: hex (an even number of digits, ``0x`` allowed), at
    most MAX_SIGNABLE_PAYLOAD_CHARS characters. Raises FieldError."""
    _text("signablePayload", value, MAX_SIGNABLE_PAYLOAD_CHARS, controls=False)
    if not _HEX.match(value):
        raise FieldError("signablePayload must be hex (an even number of digits, 0x allowed)")
    return value


def check_encrypted_key(value: str) -> str:
    """Returns ``value`` if it is an ``encryptedKey`` within 1-8192 characters. Raises FieldError."""
    return _text("encryptedKey", value, MAX_ENCRYPTED_KEY_CHARS, controls=True)


def prv_bytes(value: str) -> int:
    """Returns the UTF-8 size of a ``prv``. Raises FieldError when it has no UTF-8 encoding."""
    if not isinstance(value, str):
        raise FieldError("prv must be a string")
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise FieldError("prv must be valid Unicode text") from None


def check_prv_size(size: int) -> None:
    """Raises FieldError unless a ``prv`` of ``size`` UTF-8 bytes is within 1 byte to 1 MiB."""
    if size == 0:
        raise FieldError("prv must not be empty")
    if size > MAX_PRV_BYTES:
        raise FieldError(f"prv must be at most {MAX_PRV_BYTES} bytes")


def check_prv(value: str) -> str:
    """Returns ``value`` if it is a valid plaintext ``prv``: 1 byte to 1 MiB of UTF-8. Raises FieldError."""
    check_prv_size(prv_bytes(value))
    return value


def _schema(max_length: int, description: str, pattern: str | None = None) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": max_length, "description": description}
    if pattern is not None:
        schema["pattern"] = pattern
    return WithJsonSchema(schema)


Prv = Annotated[
    str,
    AfterValidator(check_prv),
    _schema(MAX_PRV_BYTES, f"the private key: 1 to {MAX_PRV_BYTES} bytes of UTF-8"),
]
Pub = Annotated[
    str,
    AfterValidator(check_pub),
    _schema(MAX_PUB_CHARS, f"1-{MAX_PUB_CHARS} characters, no control characters", NO_CONTROL_PATTERN),
]
Coin = Annotated[
    str,
    AfterValidator(check_coin),
    _schema(MAX_COIN_CHARS, f"1-{MAX_COIN_CHARS} characters, no control characters; kept exactly", NO_CONTROL_PATTERN),
]
_SIGNABLE_DESCRIPTION = "hex: a PSBT (UTXO coins) or 0x and a 32-byte hash (ETH-like coins)"
SignablePayload = Annotated[
    str,
    AfterValidator(check_signable_payload),
    _schema(MAX_SIGNABLE_PAYLOAD_CHARS, _SIGNABLE_DESCRIPTION, r"^(0x)?([0-9a-fA-F]{2})+$"),
]
EncryptedKey = Annotated[
    str,
    AfterValidator(check_encrypted_key),
    _schema(MAX_ENCRYPTED_KEY_CHARS, f"1-{MAX_ENCRYPTED_KEY_CHARS} characters"),
]


def public_message(errors: Iterable[Mapping[str, Any]], hidden: Iterable[str] = (), prefix: str = "") -> str:
    """Returns one line describing the first validation error: the field as the caller named it and what is
    wrong, never the value sent (which may be secret).

    ``errors`` are pydantic error dicts. A failed ``check_*`` gives its own text (``prv must be at most
    1048576 bytes``); any other error gives ``prefix`` + ``field: what is wrong``, where parts of the
    location in ``hidden`` (message internals such as ``params`` and an operation's tag, or FastAPI's
    ``body``) are left out and list indexes show as ``[i]``.
    """
    first = next(iter(errors), None)
    if first is None:
        return "bad request"
    if first.get("type") == "value_error":  # our checks: the text names the field already
        return str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    skip = set(hidden)
    where = ""
    for part in first.get("loc", ()):
        if isinstance(part, int):
            where += f"[{part}]"
        elif part not in skip:
            where += ("." if where else "") + str(part)
    message = str(first.get("msg", "invalid"))
    return prefix + (f"{where}: {message}" if where else message)
