"""The sjcl 1.0.8 codec: known answers from the real npm package, round trips, and every rejection."""

from __future__ import annotations

import base64
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.legacy import sjcl
from worker.legacy.sjcl import SjclError

VECTORS_PATH = Path(__file__).resolve().parent / "vectors" / "sjcl_vectors.json"
VECTOR_COUNT = 60  # tests/vectors/README.md
KEY_ORDER = ["iv", "v", "iter", "ks", "ts", "mode", "adata", "cipher", "salt", "ct"]
PASSWORD = "correct horse ☃"
PLAINTEXT = "a secret ∑ with unicode 😀"


@cache
def vectors() -> list[dict[str, str]]:
    """The vectors made by sjcl 1.0.8; fails (never skips) when the file is missing."""
    assert VECTORS_PATH.is_file(), f"sjcl test vectors missing: expected {VECTORS_PATH}"
    loaded: list[dict[str, str]] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))["vectors"]
    return loaded


def fields_of(envelope: str) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(envelope)
    return fields


def reencrypt(vector: dict[str, str]) -> str:
    """Encrypts a vector's plaintext again with every parameter its envelope names."""
    fields = fields_of(vector["envelope"])
    return sjcl.encrypt(
        vector["password"],
        vector["plaintext"],
        adata=vector["adata"],
        iter=fields["iter"],
        ks=fields["ks"],
        ts=fields["ts"],
        salt=base64.b64decode(fields["salt"]),
        iv=base64.b64decode(fields["iv"]),
    )


@cache
def sample() -> str:
    """A valid envelope with adata, small iter and a 12-byte iv."""
    return sjcl.encrypt(PASSWORD, PLAINTEXT, adata="row 7", iter=101, ks=256, ts=96, salt=b"s" * 8, iv=b"i" * 12)


def tampered(**changes: Any) -> str:
    """The sample envelope with fields replaced (``None`` removes a field)."""
    fields = fields_of(sample())
    for name, value in changes.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    return json.dumps(fields, separators=(",", ":"))


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- known answers from sjcl 1.0.8 -------------------------------------------------------------------


def test_the_vectors_are_all_there() -> None:
    assert len(vectors()) == VECTOR_COUNT
    envelopes = [fields_of(v["envelope"]) for v in vectors()]
    assert {e["ks"] for e in envelopes} == set(sjcl.KEY_SIZES) and {e["ts"] for e in envelopes} == set(sjcl.TAG_SIZES)
    assert max(len(v["plaintext"].encode()) for v in vectors()) >= 65536  # CCM's L=3 is covered


@pytest.mark.parametrize("index", range(VECTOR_COUNT))
def test_vector_decrypts(index: int) -> None:
    vector = vectors()[index]
    assert sjcl.decrypt(vector["password"], vector["envelope"]) == vector["plaintext"]
    assert sjcl.decrypt_bytes(vector["password"], vector["envelope"]) == vector["plaintext"].encode()


@pytest.mark.parametrize("index", range(VECTOR_COUNT))
def test_vector_reencrypts_byte_identical(index: int) -> None:
    vector = vectors()[index]
    ours = reencrypt(vector)
    assert [fields_of(ours)[k] for k in ("iv", "salt", "ct", "adata")] == [
        fields_of(vector["envelope"])[k] for k in ("iv", "salt", "ct", "adata")
    ]
    assert ours == vector["envelope"]  # the whole string: key order, padding, compact separators
    assert list(fields_of(ours)) == KEY_ORDER


def test_adata_is_base64_of_its_utf8() -> None:
    with_adata = [v for v in vectors() if v["adata"]]
    assert with_adata
    for vector in with_adata:
        assert base64.b64decode(fields_of(vector["envelope"])["adata"]) == vector["adata"].encode()


def test_long_messages_use_sjcl_shorter_nonce() -> None:
    """From 64 KiB on, sjcl's CCM length field grows to 3 bytes, so a 16-byte iv gives a 12-byte nonce."""
    salt, iv, message = b"\x01" * 8, bytes(range(16)), b"m" * 65536
    ct = base64.b64decode(fields_of(sjcl.encrypt("pw", message, iter=101, salt=salt, iv=iv))["ct"])
    key = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 101, 16)
    assert ct == AESCCM(key, tag_length=8).encrypt(iv[:12], message, b"")
    short = base64.b64decode(fields_of(sjcl.encrypt("pw", message[:-1], iter=101, salt=salt, iv=iv))["ct"])
    assert short == AESCCM(key, tag_length=8).encrypt(iv[:13], message[:-1], b"")


@pytest.mark.parametrize(
    ("iv_len", "message_len", "nonce_len"),
    [(16, 0, 13), (16, 65535, 13), (16, 65536, 12), (16, (1 << 24) - 1, 12), (16, 1 << 24, 11), (12, 65536, 12),
     (12, 1 << 24, 11), (8, 0, 8), (8, 1 << 24, 8), (7, 0, 7)],
)  # fmt: skip
def test_nonce_length_follows_sjcl(iv_len: int, message_len: int, nonce_len: int) -> None:
    iv = bytes(range(iv_len))
    assert sjcl._nonce(iv, message_len) == iv[:nonce_len]


def test_defaults_are_sjcl_defaults() -> None:
    first, second = fields_of(sjcl.encrypt("pw", "x")), fields_of(sjcl.encrypt("pw", "x"))
    assert list(first) == KEY_ORDER
    assert (first["v"], first["iter"], first["ks"], first["ts"], first["mode"], first["cipher"]) == (
        1, 10000, 128, 64, "ccm", "aes"
    )  # fmt: skip
    assert first["adata"] == ""
    assert len(base64.b64decode(first["iv"])) == 16 and len(base64.b64decode(first["salt"])) == 8
    assert (first["iv"], first["salt"]) != (second["iv"], second["salt"])


def test_parsing_is_as_lenient_as_sjcl_where_harmless() -> None:
    fields = fields_of(sample())
    fields["extra"] = "ignored"  # sjcl copies unknown params into its envelopes
    fields["ct"] = fields["ct"].rstrip("=")  # sjcl's base64 decoder drops padding
    assert sjcl.decrypt(PASSWORD, json.dumps(fields, indent=2)) == PLAINTEXT


# -- round trips -------------------------------------------------------------------------------------

messages = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(65530, 65545).map(lambda n: "€" * (n // 3) + "x" * (n % 3)),  # around L=3
)


@settings(max_examples=150, deadline=None)
@given(
    password=st.text(max_size=40),
    message=messages,
    adata=st.one_of(st.text(max_size=40), st.binary(max_size=40)),
    iterations=st.integers(sjcl.MIN_ITERATIONS, sjcl.MIN_ITERATIONS + 20),
    ks=st.sampled_from(sjcl.KEY_SIZES),
    ts=st.sampled_from(sjcl.TAG_SIZES),
    salt=st.binary(min_size=sjcl.MIN_SALT_LEN, max_size=sjcl.MAX_SALT_LEN),
    iv=st.binary(min_size=sjcl.MIN_IV_LEN, max_size=sjcl.MAX_IV_LEN),
)
def test_round_trip(
    password: str, message: str | bytes, adata: str | bytes, iterations: int, ks: int, ts: int, salt: bytes, iv: bytes
) -> None:
    envelope = sjcl.encrypt(password, message, adata=adata, iter=iterations, ks=ks, ts=ts, salt=salt, iv=iv)
    fields = fields_of(envelope)
    assert list(fields) == KEY_ORDER
    assert (fields["iter"], fields["ks"], fields["ts"]) == (iterations, ks, ts)
    raw = message.encode() if isinstance(message, str) else message
    assert len(base64.b64decode(fields["ct"])) == len(raw) + ts // 8
    assert sjcl.decrypt_bytes(password, envelope) == raw
    if isinstance(message, str):
        assert sjcl.decrypt(password, envelope) == message


# -- rejections --------------------------------------------------------------------------------------

BAD_ENVELOPES = {
    "empty": ("", "envelope is not JSON"),
    "truncated": ('{"iv":', "envelope is not JSON"),
    "nested too deep": ("[" * 100_000, "envelope is not JSON"),
    "huge number": ('{"iter":' + "9" * 5000 + "}", "envelope is not JSON"),
    "array": ("[1, 2]", "envelope is not a JSON object"),
    "string": ('"ccm"', "envelope is not a JSON object"),
    **{f"no {name}": (tampered(**{name: None}), f"missing field {name}") for name in KEY_ORDER},
    "v as text": (tampered(v="1"), "invalid field v"),
    "v as float": (tampered(v=1.0), "invalid field v"),
    "iter as text": (tampered(iter="1000"), "invalid field iter"),
    "ks as bool": (tampered(ks=True), "invalid field ks"),
    "ts as list": (tampered(ts=[]), "invalid field ts"),
    "iv as number": (tampered(iv=12), "invalid field iv"),
    "iv not base64": (tampered(iv="aWlp$aWlpaWlpaWlp"), "invalid field iv"),
    "salt url-safe base64": (tampered(salt="_-_-_-_-_-8="), "invalid field salt"),
    "adata not base64": (tampered(adata="not base64!"), "invalid field adata"),
    "ct as list": (tampered(ct=["AAAA"]), "invalid field ct"),
    "v 2": (tampered(v=2), "unsupported v"),
    "v 0": (tampered(v=0), "unsupported v"),
    "mode gcm": (tampered(mode="gcm"), "unsupported mode"),
    "mode ocb2": (tampered(mode="ocb2"), "unsupported mode"),
    "mode upper case": (tampered(mode="CCM"), "unsupported mode"),
    "cipher": (tampered(cipher="des"), "unsupported cipher"),
    "ks 64": (tampered(ks=64), "unsupported ks"),
    "ks 512": (tampered(ks=512), "unsupported ks"),
    "ts 32": (tampered(ts=32), "unsupported ts"),
    "ts 112": (tampered(ts=112), "unsupported ts"),
    "iter 0": (tampered(iter=0), "iter out of bounds"),
    "iter negative": (tampered(iter=-5), "iter out of bounds"),
    "iter 100 (sjcl's floor)": (tampered(iter=100), "iter out of bounds"),
    "iter above the ceiling": (tampered(iter=sjcl.MAX_ITERATIONS + 1), "iter out of bounds"),
    "iter huge": (tampered(iter=10**12), "iter out of bounds"),
    "iv 6 bytes": (tampered(iv=b64(b"i" * 6)), "bad iv length"),
    "iv 17 bytes": (tampered(iv=b64(b"i" * 17)), "bad iv length"),
    "iv empty": (tampered(iv=""), "bad iv length"),
    "salt 7 bytes": (tampered(salt=b64(b"s" * 7)), "bad salt length"),
    "salt 65 bytes": (tampered(salt=b64(b"s" * 65)), "bad salt length"),
    "ct empty": (tampered(ct=""), "ct shorter than the tag"),
    "ct one byte short of the tag": (tampered(ct=b64(b"c" * 11)), "ct shorter than the tag"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENVELOPES))
def test_bad_envelope(case: str) -> None:
    envelope, message = BAD_ENVELOPES[case]
    with pytest.raises(SjclError) as caught:
        sjcl.decrypt(PASSWORD, envelope)
    assert str(caught.value) == message


def test_not_a_string() -> None:
    with pytest.raises(SjclError, match=r"^envelope is not a string$"):
        sjcl.decrypt(PASSWORD, sample().encode())  # type: ignore[arg-type]


def test_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sjcl, "MAX_ENVELOPE_CHARS", len(sample()) - 1)
    with pytest.raises(SjclError, match=r"^envelope too large$"):
        sjcl.decrypt(PASSWORD, sample())
    with pytest.raises(SjclError, match=r"^envelope too large$"):
        sjcl.encrypt(PASSWORD, PLAINTEXT, adata="row 7", iter=101, ks=256, ts=96, salt=b"s" * 8, iv=b"i" * 12)


def flip(field: str, byte: int) -> str:
    raw = bytearray(base64.b64decode(fields_of(sample())[field]))
    raw[byte] ^= 0x01
    return tampered(**{field: b64(bytes(raw))})


AUTHENTICATION_FAILURES = {
    "wrong password": ("correct horse ☂", sample()),
    "empty password": ("", sample()),
    "ct first bit": (PASSWORD, flip("ct", 0)),
    "ct tag last bit": (PASSWORD, flip("ct", -1)),
    "ct truncated": (PASSWORD, tampered(ct=b64(base64.b64decode(fields_of(sample())["ct"])[:-1]))),
    "iv": (PASSWORD, flip("iv", 3)),
    "salt": (PASSWORD, flip("salt", 0)),
    "adata": (PASSWORD, flip("adata", 0)),
    "adata removed": (PASSWORD, tampered(adata="")),
    "iter": (PASSWORD, tampered(iter=102)),
    "ks": (PASSWORD, tampered(ks=128)),
    "ts": (PASSWORD, tampered(ts=64)),
}


@pytest.mark.parametrize("case", sorted(AUTHENTICATION_FAILURES))
def test_authentication_failure_is_opaque(case: str) -> None:
    password, envelope = AUTHENTICATION_FAILURES[case]
    with pytest.raises(SjclError) as caught:
        sjcl.decrypt(password, envelope)
    assert str(caught.value) == "authentication failed"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert PASSWORD not in repr(caught.value) and PLAINTEXT not in repr(caught.value)


def test_plaintext_not_utf8() -> None:
    envelope = sjcl.encrypt(PASSWORD, b"\xff\xfe", iter=101)
    assert sjcl.decrypt_bytes(PASSWORD, envelope) == b"\xff\xfe"
    with pytest.raises(SjclError, match=r"^plaintext is not UTF-8$"):
        sjcl.decrypt(PASSWORD, envelope)


BAD_ENCRYPT_PARAMETERS: dict[str, tuple[dict[str, Any], str]] = {
    "ks": ({"ks": 512}, "unsupported ks"),
    "ts": ({"ts": 32}, "unsupported ts"),
    "iter at sjcl's floor": ({"iter": 100}, "iter out of bounds"),
    "iter above the ceiling": ({"iter": sjcl.MAX_ITERATIONS + 1}, "iter out of bounds"),
    "iv short": ({"iv": b"i" * 6}, "bad iv length"),
    "iv long": ({"iv": b"i" * 17}, "bad iv length"),
    "salt short": ({"salt": b"s" * 7}, "bad salt length"),
    "salt long": ({"salt": b"s" * 65}, "bad salt length"),
    "adata lone surrogate": ({"adata": "\ud800"}, "adata is not valid Unicode"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENCRYPT_PARAMETERS))
def test_encrypt_rejects(case: str) -> None:
    overrides, message = BAD_ENCRYPT_PARAMETERS[case]
    arguments: dict[str, Any] = {"iter": 101, **overrides}
    with pytest.raises(SjclError) as caught:
        sjcl.encrypt(PASSWORD, PLAINTEXT, **arguments)
    assert str(caught.value) == message


def test_encrypt_rejects_text_that_is_not_unicode_without_echoing_it() -> None:
    for password, plaintext, what in (("pw\udfff", "x", "password"), ("pw", "secret\ud800", "plaintext")):
        with pytest.raises(SjclError) as caught:
            sjcl.encrypt(password, plaintext, iter=101)
        assert str(caught.value) == f"{what} is not valid Unicode"
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
