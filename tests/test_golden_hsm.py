"""The golden vectors through the real HSM and database: the token's RFC 5649 wrap matches the vector, and
the service opens the golden ciphertexts; every negative vector fails with the one opaque integrity error."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from sqlalchemy import update

from schemas.envelope import EncryptedDataKey, WrapAlgorithm
from tests import golden
from tests.conftest import raw_session
from worker.config import Settings
from worker.errors import IntegrityError
from worker.runtime import KeyService
from worker.storage.models import PrivateKey, RootKey, RootKeyVersion

GOLDEN_HSM_ID = f"kmsq:{golden.ROOT_KEY_ID}:v{golden.ROOT_KEY_VERSION}".encode()
OPAQUE = "ciphertext failed integrity check"


@pytest.fixture(scope="module")
def golden_kek(hsm_settings: Settings) -> Iterator[None]:
    """Imports the vector's KEK as a token key (possible only in tests: real root keys are generated inside)."""
    session = raw_session(hsm_settings)
    kek = session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: golden.KEK,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.WRAP: True,
            Attribute.UNWRAP: True,
            Attribute.ID: GOLDEN_HSM_ID,
            Attribute.LABEL: GOLDEN_HSM_ID.decode(),
        }
    )
    yield
    kek.destroy()
    session.close()


@pytest.fixture
def golden_service(service: KeyService, golden_kek: None) -> KeyService:
    with service.sessions.begin() as db:
        db.add(RootKey(id=golden.ROOT_KEY_ID, type="aes-256", pool="golden", state="enabled", current_version=1))
        db.flush()
        db.add(
            RootKeyVersion(
                root_key_id=golden.ROOT_KEY_ID,
                version=1,
                hsm_id=GOLDEN_HSM_ID.hex(),
                hsm_label=GOLDEN_HSM_ID.decode(),
                wrap_algorithm=int(WrapAlgorithm.AES_KWP),
                state="enabled",
            )
        )
        db.flush()
        db.add(
            PrivateKey(
                pub=golden.PUB,
                source=golden.SOURCE,
                coin=golden.COIN,
                type=golden.TYPE,
                provider="kmsq",
                root_key=golden.ROOT_KEY_ID,
                root_key_version=1,
                format_version=1,
                encrypted_prv=golden.ENCRYPTED_PRV,
                encrypted_data_key=golden.ENCRYPTED_KEY,
            )
        )
    return service


def test_token_wraps_exactly_like_rfc5649_vector(hsm_settings: Settings, golden_kek: None) -> None:
    session = raw_session(hsm_settings)
    try:
        kek = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, id=GOLDEN_HSM_ID)
        data_key = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: golden.DATA_KEY,
                Attribute.TOKEN: False,
                Attribute.SENSITIVE: False,
                Attribute.EXTRACTABLE: True,
            }
        )
        assert kek.wrap_key(data_key, mechanism=Mechanism.AES_KEY_WRAP_PAD) == golden.WRAPPED
        data_key.destroy()
    finally:
        session.close()


def test_service_opens_golden_ciphertexts(golden_service: KeyService) -> None:
    assert golden_service.decrypt_data_key(golden.ENCRYPTED_KEY) == golden.PLAINTEXT_KEY
    record = golden_service.get_private_key(golden.PUB, golden.SOURCE)
    assert record.prv == golden.PRV


def _text(raw: bytes) -> str:
    return "kmsq:v1:" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_every_bit_flip_of_the_golden_key_fails_opaquely(golden_service: KeyService) -> None:
    raw = golden.ENCRYPTED_KEY_BYTES
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(IntegrityError) as info:
            golden_service.decrypt_data_key(_text(bytes(flipped)))
        assert str(info.value) == OPAQUE


def test_every_bit_flip_of_the_golden_private_key_fails_opaquely(golden_service: KeyService) -> None:
    raw = golden.ENCRYPTED_PRV_BYTES
    for bit in range(len(raw) * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with golden_service.sessions.begin() as db:
            db.execute(
                update(PrivateKey).where(PrivateKey.pub == golden.PUB).values(encrypted_prv=_text(bytes(flipped)))
            )
        with pytest.raises(IntegrityError) as info:
            golden_service.get_private_key(golden.PUB, golden.SOURCE)
        assert str(info.value) == OPAQUE


@pytest.mark.parametrize("cut", [0, 1, 5, 14, 19, 40, 59])
def test_truncated_golden_key_fails_opaquely(golden_service: KeyService, cut: int) -> None:
    with pytest.raises(IntegrityError) as info:
        golden_service.decrypt_data_key(_text(golden.ENCRYPTED_KEY_BYTES[:cut]))
    assert str(info.value) == OPAQUE


@pytest.mark.parametrize(
    "change",
    [
        {"root_key_id": "rk-unknown"},
        {"root_key_version": 2},
        {"wrap_algorithm": WrapAlgorithm.RSA_OAEP_SHA256},
    ],
)
def test_unknown_root_key_or_version_fails_opaquely(golden_service: KeyService, change: dict[str, object]) -> None:
    record = dataclasses.replace(EncryptedDataKey.from_text(golden.ENCRYPTED_KEY), **change)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError) as info:
        golden_service.decrypt_data_key(record.to_text())
    assert str(info.value) == OPAQUE


@pytest.mark.parametrize("version_byte", [0x00, 0x02, 0xFF])
def test_unknown_format_version_fails_opaquely(golden_service: KeyService, version_byte: int) -> None:
    with pytest.raises(IntegrityError) as info:
        golden_service.decrypt_data_key(_text(bytes([version_byte]) + golden.ENCRYPTED_KEY_BYTES[1:]))
    assert str(info.value) == OPAQUE


@pytest.mark.parametrize("column,value", [("coin", "eth"), ("type", "tss"), ("pub", "xpub-other")])
def test_wrong_associated_data_fails_opaquely(golden_service: KeyService, column: str, value: str) -> None:
    with golden_service.sessions.begin() as db:
        db.execute(update(PrivateKey).where(PrivateKey.pub == golden.PUB).values({column: value}))
    pub = value if column == "pub" else golden.PUB
    with pytest.raises(IntegrityError) as info:
        golden_service.get_private_key(pub, golden.SOURCE)
    assert str(info.value) == OPAQUE
