"""A codec for the JSON envelopes of sjcl 1.0.8 (``sjcl.encrypt`` / ``sjcl.decrypt``), AES-CCM only.

The legacy system stored secrets as sjcl envelopes, a flat JSON object in this key order::

    {"iv":"<b64>","v":1,"iter":10000,"ks":128,"ts":64,"mode":"ccm","adata":"<b64>","cipher":"aes",
     "salt":"<b64>","ct":"<b64>"}

* the AES key is PBKDF2-HMAC-SHA256(UTF-8 password, salt, iter) truncated to ``ks`` bits;
* ``ct`` is the AES-CCM ciphertext followed by its ``ts``-bit tag; ``adata`` (base64 of the UTF-8 adata string)
  is the CCM associated data;
* the CCM nonce is ``iv`` truncated to ``15 - L`` bytes, where sjcl's length-field size ``L`` grows with the
  message: 2, 3 from 64 KiB, 4 from 16 MiB, and at least ``15 - len(iv)`` (sjcl core/ccm.js).

Parsing is strict where sjcl is lenient (every field required, typed and bounded; ``v`` must be 1) and every
failure raises :class:`SjclError` with a fixed message that names no secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

VERSION = 1
MODE = "ccm"
CIPHER = "aes"
KEY_SIZES = (128, 192, 256)  # ks, bits
TAG_SIZES = (64, 96, 128)  # ts, bits: the only ones sjcl.json accepts
# sjcl.json takes an iv of 2 to 4 32-bit words and CCM needs at least 7 bytes: 7 to 16 bytes.
MIN_IV_LEN, MAX_IV_LEN = 7, 16
# sjcl draws 8 bytes; sjcl itself takes any length, kmsq asks for at least sjcl's own and bounds the rest.
MIN_SALT_LEN, MAX_SALT_LEN = 8, 64
# sjcl.json rejects iter <= 100 for a password; the upper bound is ours, so a hostile envelope cannot make
# PBKDF2 burn CPU (sjcl's default is 10,000).
MIN_ITERATIONS, MAX_ITERATIONS = 101, 1_000_000
# The longest envelope accepted or produced (characters of JSON), enough for CCM's L=4 (16 MiB plaintexts).
MAX_ENVELOPE_CHARS = 32 * 1024 * 1024

DEFAULT_ITERATIONS = 10_000  # sjcl.json.defaults in sjcl 1.0.8
DEFAULT_KEY_SIZE = 128
DEFAULT_TAG_SIZE = 64
DEFAULT_IV_LEN = 16  # sjcl.random.randomWords(4)
DEFAULT_SALT_LEN = 8  # sjcl.random.randomWords(2)

_AUTH_FAILED = "authentication failed"  # wrong password and tampered ct alike (never say which)


class SjclError(ValueError):
    """An sjcl envelope is malformed, unsupported or does not authenticate. Messages never carry secrets."""


@dataclass(frozen=True)
class _Params:
    """The non-secret parameters of one envelope."""

    iv: bytes
    iter: int
    ks: int
    ts: int
    adata: bytes
    salt: bytes


def _check(params: _Params) -> None:
    """Raises SjclError unless the parameters are ones sjcl accepts and within kmsq's bounds."""
    if params.ks not in KEY_SIZES:
        raise SjclError("unsupported ks")
    if params.ts not in TAG_SIZES:
        raise SjclError("unsupported ts")
    if not MIN_ITERATIONS <= params.iter <= MAX_ITERATIONS:
        raise SjclError("iter out of bounds")
    if not MIN_IV_LEN <= len(params.iv) <= MAX_IV_LEN:
        raise SjclError("bad iv length")
    if not MIN_SALT_LEN <= len(params.salt) <= MAX_SALT_LEN:
        raise SjclError("bad salt length")


def _utf8(text: str | bytes, what: str) -> bytes:
    """Returns ``text`` as UTF-8 bytes (bytes pass through). Raises SjclError naming only ``what``."""
    if isinstance(text, bytes):
        return text
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise SjclError(f"{what} is not valid Unicode") from None


def _nonce(iv: bytes, message_len: int) -> bytes:
    """Returns the CCM nonce sjcl derives from ``iv`` for a message of ``message_len`` bytes."""
    size_len = 2
    while size_len < 4 and message_len >> (8 * size_len):
        size_len += 1
    return iv[: 15 - max(size_len, 15 - len(iv))]


def _ccm(password: str, params: _Params) -> AESCCM:
    """Returns the AES-CCM cipher keyed by PBKDF2-HMAC-SHA256 of the password, as sjcl.misc.cachedPbkdf2."""
    key = hashlib.pbkdf2_hmac("sha256", _utf8(password, "password"), params.salt, params.iter, params.ks // 8)
    return AESCCM(key, tag_length=params.ts // 8)


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64decode(value: object, name: str) -> bytes:
    """Decodes a standard base64 field (padding optional, as in sjcl). Raises SjclError."""
    if not isinstance(value, str):
        raise SjclError(f"invalid field {name}")
    stripped = value.rstrip("=")
    try:
        return base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SjclError(f"invalid field {name}") from None


def _field(fields: dict[str, Any], name: str) -> object:
    if name not in fields:
        raise SjclError(f"missing field {name}")
    return fields[name]


def _int_field(fields: dict[str, Any], name: str) -> int:
    value = _field(fields, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SjclError(f"invalid field {name}")
    return value


def _load(envelope: str) -> dict[str, Any]:
    """Returns the JSON object of an envelope. Raises SjclError."""
    if not isinstance(envelope, str):
        raise SjclError("envelope is not a string")
    if len(envelope) > MAX_ENVELOPE_CHARS:
        raise SjclError("envelope too large")
    try:
        fields = json.loads(envelope)
    except (ValueError, RecursionError):
        raise SjclError("envelope is not JSON") from None
    if not isinstance(fields, dict):
        raise SjclError("envelope is not a JSON object")
    return fields


def _parse(envelope: str) -> tuple[_Params, bytes]:
    """Returns the checked parameters and the ``ct`` bytes of an envelope. Unknown extra keys are ignored,
    as sjcl does. Raises SjclError."""
    fields = _load(envelope)
    if _int_field(fields, "v") != VERSION:
        raise SjclError("unsupported v")
    if _field(fields, "mode") != MODE:
        raise SjclError("unsupported mode")
    if _field(fields, "cipher") != CIPHER:
        raise SjclError("unsupported cipher")
    params = _Params(
        iv=_b64decode(_field(fields, "iv"), "iv"),
        iter=_int_field(fields, "iter"),
        ks=_int_field(fields, "ks"),
        ts=_int_field(fields, "ts"),
        adata=_b64decode(_field(fields, "adata"), "adata"),
        salt=_b64decode(_field(fields, "salt"), "salt"),
    )
    _check(params)
    ct = _b64decode(_field(fields, "ct"), "ct")
    if len(ct) < params.ts // 8:
        raise SjclError("ct shorter than the tag")
    return params, ct


def decrypt_bytes(password: str, envelope: str) -> bytes:
    """Returns the plaintext bytes of an sjcl envelope (sjcl's ``raw: 1``).

    Raises SjclError for a malformed or unsupported envelope, and ``"authentication failed"`` alike for a
    wrong password and a tampered envelope.
    """
    params, ct = _parse(envelope)
    nonce = _nonce(params.iv, len(ct) - params.ts // 8)
    try:
        return _ccm(password, params).decrypt(nonce, ct, params.adata)
    except InvalidTag:
        raise SjclError(_AUTH_FAILED) from None


def decrypt(password: str, envelope: str) -> str:
    """Returns the plaintext of an sjcl envelope as text, like ``sjcl.decrypt``.

    Raises SjclError as :func:`decrypt_bytes`, and when the plaintext is not UTF-8.
    """
    try:
        return decrypt_bytes(password, envelope).decode("utf-8")
    except UnicodeDecodeError:
        raise SjclError("plaintext is not UTF-8") from None


def encrypt(
    password: str,
    plaintext: str | bytes,
    *,
    adata: str | bytes = b"",
    iter: int = DEFAULT_ITERATIONS,
    ks: int = DEFAULT_KEY_SIZE,
    ts: int = DEFAULT_TAG_SIZE,
    salt: bytes | None = None,
    iv: bytes | None = None,
) -> str:
    """Returns the sjcl envelope of ``plaintext``, the exact string ``sjcl.encrypt`` returns for the same
    parameters. Text is encoded as UTF-8; ``salt`` (8 bytes) and ``iv`` (16 bytes) are random when omitted.

    Raises SjclError for parameters sjcl or kmsq's bounds reject, or text that is not valid Unicode.
    """
    params = _Params(
        iv=os.urandom(DEFAULT_IV_LEN) if iv is None else bytes(iv),
        iter=iter,
        ks=ks,
        ts=ts,
        adata=_utf8(adata, "adata"),
        salt=os.urandom(DEFAULT_SALT_LEN) if salt is None else bytes(salt),
    )
    _check(params)
    message = _utf8(plaintext, "plaintext")
    ct = _ccm(password, params).encrypt(_nonce(params.iv, len(message)), message, params.adata)
    fields = {
        "iv": _b64encode(params.iv),
        "v": VERSION,
        "iter": params.iter,
        "ks": params.ks,
        "ts": params.ts,
        "mode": MODE,
        "adata": _b64encode(params.adata),
        "cipher": CIPHER,
        "salt": _b64encode(params.salt),
        "ct": _b64encode(ct),
    }
    envelope = json.dumps(fields, separators=(",", ":"))
    if len(envelope) > MAX_ENVELOPE_CHARS:
        raise SjclError("envelope too large")
    return envelope
