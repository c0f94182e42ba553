"""The byte-level queue protocol, version 1: key encodings, signatures and HPKE sealing.

Signatures (Ed25519) are made over domain-separated *raw bytes*, never over re-encoded objects:

* a request: ``b"kmsq/request/v1\\0" + task_name + b"\\0" + body`` where ``body`` is the exact JSON bytes
  carried in the message, so a message moved to another task fails verification;
* a reply: ``b"kmsq/reply/v1\\0" + body``.

Secrets cross the broker only sealed with HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256),
HKDF-SHA256, AES-256-GCM) to the recipient: a private key to the fleet's transport key of its pool, a
plaintext data key or private key to the caller's reply key. The HPKE ``info`` binds the seal to its request
(and, for replies, to the field it fills), so a sealed value cannot be moved to another request.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
import uuid
from typing import Any, Literal, get_args

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from schemas.limits import MAX_REPLY_SECRET_BYTES, MAX_REQUEST_BYTES

PROTOCOL_VERSION = 1
TASK_PREFIX = "kmsq."
QUEUE_PREFIX = "kms."
# Each pool has two queues, its lanes (docs/OPERATIONS.md, "Sharing a pool"): interactive work and bulk work.
LANES = ("interactive", "bulk")
BULK_SUFFIX = ".bulk"
REPLY_QUEUE_PREFIX = "kmsq.reply."
# The publisher's clock (epoch seconds) in a request message's headers: unsigned, read only for the estimate of how
# long a RabbitMQ queue's oldest message waits (tasks.metrics.HeadAges); never for a decision.
SENT_AT_HEADER = "kmsq_sent_at"
MAX_REQUEST_TTL_SECONDS = 3600
DEFAULT_REQUEST_TTL_SECONDS = 600  # longer than the broker's visibility timeout, so a redelivery is fresh
DEFAULT_CLOCK_SKEW_SECONDS = 300
# With no KMSQ_BROKER_URL, workers and callers meet on a private redis-server listening on this Unix socket
# under KMSQ_HOME (`kmsq broker start`).
EMBEDDED_BROKER_SOCKET = "broker.sock"
# Deployments (or test runs) sharing one Redis database each take a namespace: every Redis key they use,
# queues included, starts with "<namespace>:".
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")

# The error codes of replies: the only ones a worker sends and a caller sees (worker.errors maps each error
# class to one, and a test checks that they are these).
ErrorCode = Literal[
    "unauthenticated",
    "forbidden",
    "policy_denied",
    "expired",
    "replayed",
    "invalid",
    "conflict",
    "not_found",
    "not_exportable",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
]
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)

_REQUEST_DOMAIN = b"kmsq/request/v1\x00"
_REPLY_DOMAIN = b"kmsq/reply/v1\x00"
_REPLY_SECRET_INFO = b"kmsq/reply-secret/v1\x00"
_PRV_INFO = b"kmsq/put-key-prv/v1\x00"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_KEY_LEN = 32
_SEAL_OVERHEAD = 32 + 16  # HPKE enc (X25519 public key) and the AES-256-GCM tag


class WireError(ValueError):
    """A key, signature or sealed value is malformed or does not verify. Deliberately without detail."""


# -- encodings -------------------------------------------------------------------------------------


def b64u(data: bytes | bytearray) -> str:
    """Returns unpadded URL-safe base64."""
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def from_b64u(text: str, *, max_len: int) -> bytes:
    """Decodes unpadded URL-safe base64 of at most ``max_len`` bytes. Raises WireError for bad characters,
    padding or size."""
    if not isinstance(text, str) or len(text) > b64u_length(max_len) or "=" in text:
        raise WireError("malformed base64")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise WireError("malformed base64") from None
    if b64u(data) != text:
        raise WireError("malformed base64")
    return data


def canonical_json(data: Any) -> bytes:
    """Returns the canonical JSON bytes kmsq signs: sorted keys, no whitespace, ASCII only."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def args_digest(args: Any) -> str:
    """Returns the hex SHA-256 of a request message's task arguments in canonical JSON (or of their repr
    when they are not JSON at all)."""
    try:
        encoded = canonical_json(list(args) if isinstance(args, list | tuple) else args)
    except (TypeError, ValueError):
        encoded = repr(args).encode("utf-8", "replace")
    return hashlib.sha256(encoded).hexdigest()


def key_id(public_key: bytes) -> str:
    """Returns the id of an Ed25519 public key: ``ed25519:`` and 16 hex digits of its SHA-256."""
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


def embedded_broker_url(home: str) -> str:
    """Returns the URL of the embedded broker socket under ``home``."""
    return f"redis+socket://{home.rstrip('/')}/{EMBEDDED_BROKER_SOCKET}"


def namespace_key_prefix(namespace: str | None) -> str:
    """Returns the prefix of every Redis key of ``namespace`` (``""`` without one).

    Raises ValueError for a name that is not 1-32 characters of a-z, 0-9, '-' and '_'."""
    if not namespace:
        return ""
    if not NAMESPACE_PATTERN.fullmatch(namespace):
        raise ValueError("a namespace is 1-32 characters of a-z, 0-9, '-' and '_', starting with a letter or digit")
    return namespace + ":"


def task_name(op: str) -> str:
    """Returns the Celery task name of an operation."""
    return TASK_PREFIX + op


def pool_queue(pool: str, lane: str = "interactive") -> str:
    """Returns the queue of an HSM pool's lane: ``kms.<pool>`` for interactive work, ``kms.<pool>.bulk`` for bulk
    work (a pool name has no dot, so no pool's queue is another's bulk lane). Raises ValueError for another lane."""
    if lane == "interactive":
        return QUEUE_PREFIX + pool
    if lane == "bulk":
        return QUEUE_PREFIX + pool + BULK_SUFFIX
    raise ValueError(f"no lane {lane!r} (lanes: {', '.join(LANES)})")


def lane_of_queue(queue: str) -> str:
    """Returns the lane a pool queue serves (``bulk`` for ``kms.<pool>.bulk``, else ``interactive``)."""
    return "bulk" if queue.endswith(BULK_SUFFIX) else "interactive"


# -- keys ------------------------------------------------------------------------------------------


# Workers parse the same few callers' keys for every request; key objects are immutable, so they are kept
# (bounded) instead of being parsed again. Errors are not cached.
@functools.lru_cache(maxsize=1024)
def signing_public(encoded: str) -> Ed25519PublicKey:
    """Parses an Ed25519 public key (cached). Raises WireError."""
    raw = from_b64u(encoded, max_len=_KEY_LEN)
    if len(raw) != _KEY_LEN:
        raise WireError("bad Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)


@functools.lru_cache(maxsize=1024)
def sealing_public(encoded: str) -> X25519PublicKey:
    """Parses an X25519 (HPKE) public key (cached). Raises WireError."""
    raw = from_b64u(encoded, max_len=_KEY_LEN)
    if len(raw) != _KEY_LEN:
        raise WireError("bad X25519 public key")
    return X25519PublicKey.from_public_bytes(raw)


def public_bytes(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    """Returns the raw 32-byte public key."""
    return key.public_bytes_raw()


# -- signatures ------------------------------------------------------------------------------------


def request_signing_input(task: str, body: bytes) -> bytes:
    """Returns the bytes a request signature covers."""
    return _REQUEST_DOMAIN + task.encode("ascii") + b"\x00" + body


def reply_signing_input(body: bytes) -> bytes:
    """Returns the bytes a reply signature covers."""
    return _REPLY_DOMAIN + body


def sign(key: Ed25519PrivateKey, data: bytes) -> str:
    """Returns the Ed25519 signature of ``data``, base64url."""
    return b64u(key.sign(data))


def verify(key: Ed25519PublicKey, signature: str, data: bytes) -> None:
    """Checks an Ed25519 signature. Raises WireError when it is malformed or does not verify."""
    raw = from_b64u(signature, max_len=64)
    try:
        key.verify(raw, data)
    except InvalidSignature:
        raise WireError("bad signature") from None


# -- sealing ---------------------------------------------------------------------------------------


def b64u_length(size: int) -> int:
    """Returns the length in characters of the unpadded base64url of ``size`` bytes."""
    return (4 * size + 2) // 3


def sealed_length(plaintext_bytes: int) -> int:
    """Returns the length in characters of the base64url seal of ``plaintext_bytes`` bytes."""
    return b64u_length(plaintext_bytes + _SEAL_OVERHEAD)


def _reply_info(request_id: uuid.UUID, field: str) -> bytes:
    return _REPLY_SECRET_INFO + request_id.bytes + b"\x00" + field.encode("ascii")


def _prv_info(caller: str, request_id: uuid.UUID) -> bytes:
    return _PRV_INFO + caller.encode("ascii") + b"\x00" + request_id.bytes


def seal_reply_secret(reply_key: X25519PublicKey, request_id: uuid.UUID, field: str, secret: bytes | bytearray) -> str:
    """Seals one secret field of a reply to the caller's reply key; returns base64url."""
    return b64u(_SUITE.encrypt(bytes(secret), reply_key, info=_reply_info(request_id, field)))


def open_reply_secret(reply_key: X25519PrivateKey, request_id: uuid.UUID, field: str, sealed: str) -> bytes:
    """Opens a sealed reply field (of at most MAX_REPLY_SECRET_BYTES). Raises WireError for anything wrong
    (opaque)."""
    return _open(reply_key, sealed, _reply_info(request_id, field), MAX_REPLY_SECRET_BYTES)


def seal_private_key(transport_key: X25519PublicKey, caller: str, request_id: uuid.UUID, prv: bytes) -> str:
    """Seals a private key for a ``put_key`` request to the pool's transport key; returns base64url."""
    return b64u(_SUITE.encrypt(prv, transport_key, info=_prv_info(caller, request_id)))


def open_private_key(transport_key: X25519PrivateKey, caller: str, request_id: uuid.UUID, sealed: str) -> bytes:
    """Opens the sealed ``prv`` of a ``put_key`` request. Raises WireError (opaque)."""
    return _open(transport_key, sealed, _prv_info(caller, request_id), MAX_REQUEST_BYTES)


def _open(key: X25519PrivateKey, sealed: str, info: bytes, max_plaintext: int) -> bytes:
    ciphertext = from_b64u(sealed, max_len=max_plaintext + _SEAL_OVERHEAD)
    try:
        return _SUITE.decrypt(ciphertext, key, info=info)
    except (InvalidTag, ValueError):
        raise WireError("sealed value does not open") from None
