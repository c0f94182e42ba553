"""The key operations end to end on SoftHSM2, against real Postgres and SQLite."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from schemas.envelope import EncryptedDataKey, EncryptedPrivateKey
from schemas.limits import MAX_COIN_CHARS, MAX_PRV_BYTES
from tests.conftest import random_pub
from worker.errors import Conflict, IntegrityError, InvalidRequest, NotFound
from worker.runtime import KeyService
from worker.storage.models import PrivateKey, RootKeyVersion

ROOT_TYPES = ["aes-256", "rsa-2048"]


def _count_private_keys(service: KeyService) -> int:
    with service.sessions() as db:
        return db.scalar(select(func.count()).select_from(PrivateKey)) or 0


@pytest.mark.parametrize("root_type", ROOT_TYPES)
def test_data_key_round_trip(service: KeyService, root_type: str) -> None:
    root = service.create_root_key(root_type)
    key = service.generate_data_key(root.id)
    assert key.plaintext_key is not None and len(base64.b64decode(key.plaintext_key, validate=True)) == 32
    parsed = EncryptedDataKey.from_text(key.encrypted_key)
    assert (parsed.root_key_id, parsed.root_key_version) == (root.id, 1)
    assert service.decrypt_data_key(key.encrypted_key) == key.plaintext_key
    assert key.plaintext_key not in repr(key)


@pytest.mark.parametrize("root_type", ROOT_TYPES)
def test_data_key_without_plaintext(service: KeyService, root_type: str) -> None:
    root = service.create_root_key(root_type)
    key = service.generate_data_key(root.id, with_plaintext=False)
    assert key.plaintext_key is None
    assert len(base64.b64decode(service.decrypt_data_key(key.encrypted_key))) == 32


@pytest.mark.parametrize("root_type", ROOT_TYPES)
def test_private_key_round_trip(service: KeyService, root_type: str) -> None:
    root = service.create_root_key(root_type)
    pub, prv = random_pub(), '{"share":"8905623b1de2","index":1} ünïcode'
    stored = service.store_private_key(pub=pub, prv=prv, coin="eth", source="backup", type="tss", root_key_id=root.id)
    assert (stored.root_key_id, stored.root_key_version) == (root.id, 1)
    record = service.get_private_key(pub, "backup")
    assert (record.prv, record.pub, record.source, record.type, record.coin) == (prv, pub, "backup", "tss", "eth")
    assert prv not in repr(record)


def test_default_root_key_is_the_pools_oldest(service: KeyService) -> None:
    with pytest.raises(NotFound):
        service.generate_data_key()
    first = service.create_root_key("aes-256")
    service.create_root_key("aes-256")
    assert EncryptedDataKey.from_text(service.generate_data_key().encrypted_key).root_key_id == first.id
    pub = random_pub()
    assert (
        service.store_private_key(pub=pub, prv="p", coin="btc", source="user", type="independent").root_key_id
        == first.id
    )


def test_data_key_of_one_root_does_not_open_under_another(service: KeyService) -> None:
    a, b = service.create_root_key("aes-256"), service.create_root_key("aes-256")
    key = EncryptedDataKey.from_text(service.generate_data_key(a.id).encrypted_key)
    moved = dataclasses.replace(key, root_key_id=b.id).to_text()
    with pytest.raises(IntegrityError):
        service.decrypt_data_key(moved)
    rsa = service.create_root_key("rsa-2048")
    rsa_key = EncryptedDataKey.from_text(service.generate_data_key(rsa.id).encrypted_key)
    with pytest.raises(IntegrityError):  # RSA ciphertext presented as an AES-KWP one of root a
        service.decrypt_data_key(
            dataclasses.replace(rsa_key, root_key_id=a.id, wrap_algorithm=key.wrap_algorithm).to_text()
        )


def test_rotation_keeps_old_versions_decrypting(service: KeyService) -> None:
    root = service.create_root_key("aes-256")
    old = service.generate_data_key(root.id)
    rotated = service.rotate_root_key(root.id)
    assert (rotated.version, rotated.versions) == (2, (1, 2))
    new = service.generate_data_key(root.id)
    assert EncryptedDataKey.from_text(new.encrypted_key).root_key_version == 2
    assert service.decrypt_data_key(old.encrypted_key) == old.plaintext_key
    assert service.decrypt_data_key(new.encrypted_key) == new.plaintext_key
    with service.sessions.begin() as db:
        db.execute(update(RootKeyVersion).where(RootKeyVersion.version == 1).values(state="disabled"))
    with pytest.raises(IntegrityError):
        service.decrypt_data_key(old.encrypted_key)
    assert service.decrypt_data_key(new.encrypted_key) == new.plaintext_key
    with pytest.raises(NotFound):
        service.rotate_root_key("rk-nope")


def test_conflict_and_not_found(service: KeyService) -> None:
    service.create_root_key("aes-256")
    pub = random_pub()
    service.store_private_key(pub=pub, prv="first", coin="btc", source="user", type="independent")
    with pytest.raises(Conflict):
        service.store_private_key(pub=pub, prv="second", coin="btc", source="user", type="independent")
    assert service.get_private_key(pub, "user").prv == "first"
    service.store_private_key(
        pub=pub, prv="backup-share", coin="btc", source="backup", type="independent"
    )  # other source is fine
    assert _count_private_keys(service) == 2
    with pytest.raises(NotFound):
        service.get_private_key(random_pub(), "user")
    with pytest.raises(NotFound):
        service.generate_data_key("rk-unknown")


@pytest.mark.parametrize(
    "fields",
    [
        {"source": "other"},
        {"type": "mpc"},
        {"pub": ""},
        {"pub": "x" * 1025},
        {"coin": "btc\x07"},
        {"coin": "c" * (MAX_COIN_CHARS + 1)},
        {"coin": ""},
        {"prv": ""},
        {"prv": "x" * (MAX_PRV_BYTES + 1)},
        {"prv": "\u00e9" * (MAX_PRV_BYTES // 2 + 1)},  # fewer characters than the limit, more UTF-8 bytes
    ],
)
def test_invalid_store_requests_change_nothing(service: KeyService, fields: dict[str, str]) -> None:
    service.create_root_key("aes-256")
    request = {"pub": random_pub(), "prv": "p", "coin": "btc", "source": "user", "type": "independent", **fields}
    with pytest.raises(InvalidRequest):
        service.store_private_key(**request)
    assert _count_private_keys(service) == 0


def test_invalid_root_key_requests(service: KeyService) -> None:
    with pytest.raises(InvalidRequest):
        service.create_root_key("aes-128")
    with pytest.raises(InvalidRequest):
        service.create_root_key("aes-256", pool="Bad Pool")
    service.create_root_key("aes-256")
    with pytest.raises(InvalidRequest):
        service.generate_data_key(key_spec="AES-128")
    with pytest.raises(IntegrityError):
        service.decrypt_data_key("not a ciphertext")


@pytest.mark.parametrize("column", ["encrypted_prv", "encrypted_data_key", "both"])
def test_swapping_ciphertexts_between_rows_fails(service: KeyService, column: str) -> None:
    service.create_root_key("aes-256")
    pub_a, pub_b = random_pub(), random_pub()
    service.store_private_key(pub=pub_a, prv="prv-a", coin="btc", source="user", type="independent")
    service.store_private_key(pub=pub_b, prv="prv-b", coin="btc", source="user", type="independent")
    with service.sessions.begin() as db:
        row_a, row_b = (db.scalars(select(PrivateKey).where(PrivateKey.pub == p)).one() for p in (pub_a, pub_b))
        names = ["encrypted_prv", "encrypted_data_key"] if column == "both" else [column]
        for name in names:
            value_a, value_b = getattr(row_a, name), getattr(row_b, name)
            setattr(row_a, name, value_b)
            setattr(row_b, name, value_a)
    for pub in (pub_a, pub_b):
        with pytest.raises(IntegrityError) as info:
            service.get_private_key(pub, "user")
        assert str(info.value) == "ciphertext failed integrity check"


def test_row_fields_are_bound_to_the_ciphertext(service: KeyService) -> None:
    service.create_root_key("aes-256")
    for change in ({"coin": "eth"}, {"type": "tss"}, {"source": "backup"}):
        pub = random_pub()
        service.store_private_key(pub=pub, prv="prv", coin="btc", source="user", type="independent")
        with service.sessions.begin() as db:
            db.execute(update(PrivateKey).where(PrivateKey.pub == pub).values(**change))
        with pytest.raises(IntegrityError):
            service.get_private_key(pub, change.get("source", "user"))


def _changed(raw: bytes, index: int, value: int) -> str:
    data = bytearray(raw)
    data[index % len(data)] = value
    return "kmsq:v1:" + base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_of_an_encrypted_key_is_rejected(service: KeyService, index: int, value: int) -> None:
    with service.sessions() as db:
        has_root = db.scalar(select(func.count()).select_from(RootKeyVersion))
    if not has_root:
        service.create_root_key("aes-256")
    key = service.generate_data_key()
    raw = EncryptedDataKey.from_text(key.encrypted_key).to_bytes()
    if raw[index % len(raw)] == value:
        value ^= 0xFF
    with pytest.raises(IntegrityError):
        service.decrypt_data_key(_changed(raw, index, value))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255), which=st.sampled_from(["prv", "dk"])
)
def test_any_single_byte_change_of_a_stored_private_key_is_rejected(
    service: KeyService, index: int, value: int, which: str
) -> None:
    with service.sessions() as db:
        has_root = db.scalar(select(func.count()).select_from(RootKeyVersion))
    if not has_root:
        service.create_root_key("aes-256")
    pub = random_pub()
    service.store_private_key(pub=pub, prv="xprv-secret", coin="btc", source="user", type="independent")
    with service.sessions.begin() as db:
        row = db.scalars(select(PrivateKey).where(PrivateKey.pub == pub)).one()
        if which == "prv":
            raw = EncryptedPrivateKey.from_text(row.encrypted_prv).to_bytes()
        else:
            raw = EncryptedDataKey.from_text(row.encrypted_data_key).to_bytes()
        if raw[index % len(raw)] == value:
            value ^= 0xFF
        if which == "prv":
            row.encrypted_prv = _changed(raw, index, value)
        else:
            row.encrypted_data_key = _changed(raw, index, value)
    with pytest.raises(IntegrityError):
        service.get_private_key(pub, "user")


def test_truncated_ciphertexts_are_rejected(service: KeyService) -> None:
    service.create_root_key("aes-256")
    key = service.generate_data_key()
    raw = EncryptedDataKey.from_text(key.encrypted_key).to_bytes()
    for length in range(len(raw)):
        with pytest.raises(IntegrityError):
            service.decrypt_data_key("kmsq:v1:" + base64.urlsafe_b64encode(raw[:length]).rstrip(b"=").decode())
