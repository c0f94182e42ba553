"""The v1 ciphertext formats without an HSM: golden bytes, strict parsing, canonical encodings."""

from __future__ import annotations

import base64
import contextlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding, aes_key_wrap_with_padding
from hypothesis import given
from hypothesis import strategies as st

from schemas.envelope import (
    Aead,
    EncryptedDataKey,
    EncryptedPrivateKey,
    FormatError,
    KeySpec,
    PrivateKeyContext,
    WrapAlgorithm,
)
from tests import golden


def test_encrypted_key_golden_bytes() -> None:
    assert aes_key_wrap_with_padding(golden.KEK, golden.DATA_KEY) == golden.WRAPPED
    record = EncryptedDataKey(
        KeySpec.AES_256, WrapAlgorithm.AES_KWP, golden.ROOT_KEY_ID, golden.ROOT_KEY_VERSION, golden.WRAPPED
    )
    assert record.to_bytes() == golden.ENCRYPTED_KEY_BYTES
    assert record.to_text() == golden.ENCRYPTED_KEY
    assert EncryptedDataKey.from_text(golden.ENCRYPTED_KEY) == record
    assert base64.b64encode(golden.DATA_KEY).decode() == golden.PLAINTEXT_KEY


def test_private_key_golden_bytes() -> None:
    context = PrivateKeyContext(
        pub=golden.PUB, source=golden.SOURCE, coin=golden.COIN, type=golden.TYPE,
        root_key_id=golden.ROOT_KEY_ID, root_key_version=golden.ROOT_KEY_VERSION,
    )  # fmt: skip
    shell = EncryptedPrivateKey(Aead.AES_256_GCM, golden.NONCE, b"")
    assert context.associated_data(shell.header()) == golden.AAD
    ciphertext = AESGCM(golden.DATA_KEY).encrypt(golden.NONCE, golden.PRV.encode(), golden.AAD)
    record = EncryptedPrivateKey(Aead.AES_256_GCM, golden.NONCE, ciphertext)
    assert record.to_bytes() == golden.ENCRYPTED_PRV_BYTES
    assert record.to_text() == golden.ENCRYPTED_PRV
    parsed = EncryptedPrivateKey.from_text(golden.ENCRYPTED_PRV)
    assert AESGCM(golden.DATA_KEY).decrypt(parsed.nonce, parsed.ciphertext, golden.AAD) == golden.PRV.encode()
    assert aes_key_unwrap_with_padding(golden.KEK, golden.WRAPPED) == golden.DATA_KEY


def _text(raw: bytes) -> str:
    return "kmsq:v1:" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


NEGATIVE_ENCRYPTED_KEYS = {
    "empty": "",
    "no prefix": golden.ENCRYPTED_KEY[len("kmsq:v1:") :],
    "other prefix": golden.ENCRYPTED_KEY.replace("kmsq:v1:", "kmsq:v2:"),
    "format version 2": _text(b"\x02" + golden.ENCRYPTED_KEY_BYTES[1:]),
    "private key kind": _text(golden.ENCRYPTED_KEY_BYTES[:1] + b"\x02" + golden.ENCRYPTED_KEY_BYTES[2:]),
    "unknown key spec": _text(golden.ENCRYPTED_KEY_BYTES[:2] + b"\x09" + golden.ENCRYPTED_KEY_BYTES[3:]),
    "unknown wrap algorithm": _text(golden.ENCRYPTED_KEY_BYTES[:3] + b"\x7f" + golden.ENCRYPTED_KEY_BYTES[4:]),
    "id length zero": _text(golden.ENCRYPTED_KEY_BYTES[:4] + b"\x00" + golden.ENCRYPTED_KEY_BYTES[5:]),
    "id length past end": _text(golden.ENCRYPTED_KEY_BYTES[:4] + b"\xff" + golden.ENCRYPTED_KEY_BYTES[5:]),
    "version zero": _text(golden.ENCRYPTED_KEY_BYTES[:14] + b"\x00\x00\x00\x00" + golden.ENCRYPTED_KEY_BYTES[18:]),
    "version past 2**31-1": _text(
        golden.ENCRYPTED_KEY_BYTES[:14] + b"\x80\x00\x00\x00" + golden.ENCRYPTED_KEY_BYTES[18:]
    ),
    "truncated": golden.ENCRYPTED_KEY[:-4],
    "trailing byte": _text(golden.ENCRYPTED_KEY_BYTES + b"\x00"),
    "padding chars": golden.ENCRYPTED_KEY + "==",
    "whitespace": golden.ENCRYPTED_KEY[:20] + " " + golden.ENCRYPTED_KEY[20:],
}


@pytest.mark.parametrize("name", sorted(NEGATIVE_ENCRYPTED_KEYS))
def test_encrypted_key_negative_vectors(name: str) -> None:
    with pytest.raises(FormatError):
        EncryptedDataKey.from_text(NEGATIVE_ENCRYPTED_KEYS[name])


NEGATIVE_PRIVATE_KEYS = {
    "truncated below minimum": _text(golden.ENCRYPTED_PRV_BYTES[:30]),
    "format version 2": _text(b"\x02" + golden.ENCRYPTED_PRV_BYTES[1:]),
    "data key kind": _text(b"\x01\x01" + golden.ENCRYPTED_PRV_BYTES[2:]),
    "unknown aead": _text(b"\x01\x02\x05" + golden.ENCRYPTED_PRV_BYTES[3:]),
    "no prefix": golden.ENCRYPTED_PRV[8:],
    # 49 bytes: the last base64 character carries 2 bits and 4 unused ones, which must be zero.
    "non-canonical base64": golden.ENCRYPTED_PRV[:-1] + "x",
    "standard base64 alphabet": "kmsq:v1:" + base64.b64encode(golden.ENCRYPTED_PRV_BYTES).decode().rstrip("="),
    "padding chars": golden.ENCRYPTED_PRV + "==",
}


@pytest.mark.parametrize("name", sorted(NEGATIVE_PRIVATE_KEYS))
def test_private_key_negative_vectors(name: str) -> None:
    with pytest.raises(FormatError):
        EncryptedPrivateKey.from_text(NEGATIVE_PRIVATE_KEYS[name])


def test_context_encoding_is_unambiguous() -> None:
    a = PrivateKeyContext(pub="ab", source="user", coin="c", type="tss", root_key_id="rk-1", root_key_version=1)
    b = PrivateKeyContext(pub="a", source="buser", coin="c", type="tss", root_key_id="rk-1", root_key_version=1)
    assert a.encode() != b.encode()


@given(st.binary(max_size=200))
def test_parser_rejects_garbage_with_format_error_only(raw: bytes) -> None:
    for parse in (EncryptedDataKey.from_bytes, EncryptedPrivateKey.from_bytes):
        try:
            parsed = parse(raw)
        except FormatError:
            continue
        assert parsed.to_bytes() == raw  # whatever parses re-encodes to the same bytes


@given(st.text(max_size=120))
def test_text_parser_never_raises_other_errors(text: str) -> None:
    for parse in (EncryptedDataKey.from_text, EncryptedPrivateKey.from_text):
        with contextlib.suppress(FormatError):
            parse("kmsq:v1:" + text)
