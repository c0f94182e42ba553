"""kmsq's ciphertext formats, version 1. The byte layouts are documented in docs/FORMAT.md.

Two strings leave the HSM host:

* ``encryptedKey``: a data key wrapped by a root key, naming the root key and version that can unwrap it;
* ``encryptedPrv``: a private key sealed with AES-256-GCM under such a data key, bound by associated data
  to its row (pub, source, coin, type, root key id, root key version).

Both are ``"kmsq:v1:"`` followed by unpadded URL-safe base64 of a binary record. Parsing is strict: every
length is bounds-checked, trailing bytes and non-canonical base64 are rejected, and every failure raises
:class:`FormatError` (which the service turns into one opaque integrity error).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from schemas.limits import MAX_PRV_BYTES, ROOT_KEY_ID
from schemas.wire import WireError, b64u, from_b64u

FORMAT_VERSION = 1
TEXT_PREFIX = "kmsq:v1:"
MAX_ROOT_KEY_ID_LEN = 64
MAX_ROOT_KEY_VERSION = 0x7FFFFFFF  # fits a signed 32-bit database integer
GCM_NONCE_LEN = 12
GCM_TAG_LEN = 16

_KIND_DATA_KEY = 0x01
_KIND_PRIVATE_KEY = 0x02
_AAD_LABEL = b"kmsq/private-key/v1"
_MAX_RECORD_BYTES = 2 * MAX_PRV_BYTES  # the largest record: a sealed private key of MAX_PRV_BYTES


class FormatError(ValueError):
    """A ciphertext string is not a well-formed kmsq v1 record."""


class KeySpec(IntEnum):
    """What a wrapped data key is."""

    AES_256 = 0x01


class WrapAlgorithm(IntEnum):
    """How the HSM wrapped the data key under the root key."""

    AES_KWP = 0x01  # RFC 5649 AES key wrap with padding (CKM_AES_KEY_WRAP_PAD / KWP)
    RSA_OAEP_SHA256 = 0x02  # RSAES-OAEP, SHA-256 and MGF1-SHA-256, empty label
    RSA_OAEP_SHA1 = 0x03  # RSAES-OAEP, SHA-1 and MGF1-SHA-1, for tokens without SHA-2 OAEP (SoftHSM2 2.6)


class Aead(IntEnum):
    """The AEAD that seals a stored private key."""

    AES_256_GCM = 0x01


KEY_SPEC_NAMES = {KeySpec.AES_256: "AES-256"}
KEY_SPEC_LENGTHS = {KeySpec.AES_256: 32}


def key_spec_from_name(name: str) -> KeySpec:
    """Returns the KeySpec named ``name`` (e.g. ``"AES-256"``). Raises FormatError for an unknown name."""
    for spec, spec_name in KEY_SPEC_NAMES.items():
        if spec_name == name:
            return spec
    raise FormatError("unknown key spec")


def _unwrap_text(text: str) -> bytes:
    if not isinstance(text, str) or not text.startswith(TEXT_PREFIX):
        raise FormatError("unknown format")
    try:  # the protocol's one base64url codec: canonical, unpadded
        return from_b64u(text[len(TEXT_PREFIX) :], max_len=_MAX_RECORD_BYTES)
    except WireError:
        raise FormatError("bad base64") from None


def _check_root_key_id(root_key_id: str) -> bytes:
    if not ROOT_KEY_ID.fullmatch(root_key_id):
        raise FormatError("bad root key id")
    return root_key_id.encode("ascii")


@dataclass(frozen=True)
class EncryptedDataKey:
    """A data key wrapped under root key ``root_key_id`` version ``root_key_version``."""

    key_spec: KeySpec
    wrap_algorithm: WrapAlgorithm
    root_key_id: str
    root_key_version: int
    wrapped: bytes

    def to_bytes(self) -> bytes:
        """Returns the binary record (docs/FORMAT.md, "encryptedKey")."""
        rid = _check_root_key_id(self.root_key_id)
        if not 1 <= self.root_key_version <= MAX_ROOT_KEY_VERSION:
            raise FormatError("bad root key version")
        if not 1 <= len(self.wrapped) <= 0xFFFF:
            raise FormatError("bad wrapped key length")
        head = struct.pack(">BBBBB", FORMAT_VERSION, _KIND_DATA_KEY, self.key_spec, self.wrap_algorithm, len(rid))
        return head + rid + struct.pack(">IH", self.root_key_version, len(self.wrapped)) + self.wrapped

    def to_text(self) -> str:
        """Returns the ``encryptedKey`` string."""
        return TEXT_PREFIX + b64u(self.to_bytes())

    @classmethod
    def from_bytes(cls, raw: bytes) -> EncryptedDataKey:
        """Parses a binary record. Raises FormatError on any deviation from the v1 layout."""
        if len(raw) < 5:
            raise FormatError("truncated")
        version, kind, spec, alg, id_len = struct.unpack_from(">BBBBB", raw, 0)
        if version != FORMAT_VERSION or kind != _KIND_DATA_KEY:
            raise FormatError("unknown format")
        try:
            key_spec, wrap_algorithm = KeySpec(spec), WrapAlgorithm(alg)
        except ValueError:
            raise FormatError("unknown algorithm") from None
        if not 1 <= id_len <= MAX_ROOT_KEY_ID_LEN or len(raw) < 5 + id_len + 6:
            raise FormatError("truncated")
        try:
            root_key_id = raw[5 : 5 + id_len].decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("bad root key id") from None
        _check_root_key_id(root_key_id)
        root_key_version, wrapped_len = struct.unpack_from(">IH", raw, 5 + id_len)
        wrapped = raw[11 + id_len :]
        if not 1 <= root_key_version <= MAX_ROOT_KEY_VERSION or wrapped_len < 1 or len(wrapped) != wrapped_len:
            raise FormatError("bad length")
        return cls(key_spec, wrap_algorithm, root_key_id, root_key_version, wrapped)

    @classmethod
    def from_text(cls, text: str) -> EncryptedDataKey:
        """Parses an ``encryptedKey`` string. Raises FormatError."""
        return cls.from_bytes(_unwrap_text(text))


@dataclass(frozen=True, kw_only=True)
class PrivateKeyContext:
    """The row a private key ciphertext belongs to; its canonical encoding is the GCM associated data."""

    pub: str
    source: str
    coin: str
    type: str
    root_key_id: str
    root_key_version: int
    # False for a key generated inside kmsq (never exported). It is part of the associated data only then, so
    # every other row's stays as it was; a row whose ``exportable`` column was set to true does not open.
    exportable: bool = True
    # The caller that generated a signing key (it alone signs with it, unless rules grant others): part of the
    # associated data only when set, so a row whose owner was changed or emptied does not open.
    owner: str | None = None

    def encode(self) -> bytes:
        """Returns the canonical encoding: a label, then each field as u16 name length, name, u32 value
        length, UTF-8 value, in fixed order. Unambiguous for any field contents."""
        fields = (
            ("pub", self.pub),
            ("source", self.source),
            ("coin", self.coin),
            ("type", self.type),
            ("root_key_id", self.root_key_id),
            ("root_key_version", str(self.root_key_version)),
            *((("exportable", "false"),) if not self.exportable else ()),
            *((("owner", self.owner),) if self.owner is not None else ()),
        )
        out = bytearray(_AAD_LABEL)
        for name, value in fields:
            n, v = name.encode("ascii"), value.encode("utf-8")
            out += struct.pack(">H", len(n)) + n + struct.pack(">I", len(v)) + v
        return bytes(out)

    def associated_data(self, header: bytes) -> bytes:
        """Returns the GCM associated data of a sealed private key: its ``encryptedPrv`` header bytes
        followed by :meth:`encode`."""
        return header + self.encode()


@dataclass(frozen=True)
class EncryptedPrivateKey:
    """A private key sealed with AES-256-GCM: ``nonce`` and ``ciphertext`` (with the 16-byte tag)."""

    aead: Aead
    nonce: bytes
    ciphertext: bytes

    def header(self) -> bytes:
        """Returns the three header bytes, which are part of the associated data."""
        return struct.pack(">BBB", FORMAT_VERSION, _KIND_PRIVATE_KEY, self.aead)

    def to_bytes(self) -> bytes:
        """Returns the binary record (docs/FORMAT.md, "encryptedPrv")."""
        if len(self.nonce) != GCM_NONCE_LEN or len(self.ciphertext) < GCM_TAG_LEN:
            raise FormatError("bad length")
        return self.header() + self.nonce + self.ciphertext

    def to_text(self) -> str:
        """Returns the ``encryptedPrv`` string."""
        return TEXT_PREFIX + b64u(self.to_bytes())

    @classmethod
    def from_bytes(cls, raw: bytes) -> EncryptedPrivateKey:
        """Parses a binary record. Raises FormatError."""
        if len(raw) < 3 + GCM_NONCE_LEN + GCM_TAG_LEN:
            raise FormatError("truncated")
        version, kind, aead = struct.unpack_from(">BBB", raw, 0)
        if version != FORMAT_VERSION or kind != _KIND_PRIVATE_KEY:
            raise FormatError("unknown format")
        try:
            aead_id = Aead(aead)
        except ValueError:
            raise FormatError("unknown algorithm") from None
        return cls(aead_id, raw[3 : 3 + GCM_NONCE_LEN], raw[3 + GCM_NONCE_LEN :])

    @classmethod
    def from_text(cls, text: str) -> EncryptedPrivateKey:
        """Parses an ``encryptedPrv`` string. Raises FormatError."""
        return cls.from_bytes(_unwrap_text(text))
