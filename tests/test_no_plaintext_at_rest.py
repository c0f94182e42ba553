"""After storing private keys and generating data keys, no table holds a secret in any common encoding."""

from __future__ import annotations

import base64
import secrets

from sqlalchemy import MetaData, select

from tests.conftest import random_pub
from worker.runtime import KeyService


def encodings(secret: bytes) -> list[bytes]:
    """The forms a leaked secret could take in a dump."""
    forms = [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]
    return [f for f in forms if len(f) >= 8]


def dump_database(service: KeyService) -> bytes:
    """Every value of every row of every table, as text."""
    metadata = MetaData()
    out = bytearray()
    with service.sessions() as db:
        metadata.reflect(bind=db.connection())
        for table in metadata.sorted_tables:
            for row in db.execute(select(table)):
                for value in row:
                    out += (value if isinstance(value, bytes) else str(value).encode("utf-8")) + b"\n"
    return bytes(out)


def test_database_dump_contains_no_secret(service: KeyService) -> None:
    service.create_root_key("aes-256")
    rsa = service.create_root_key("rsa-2048")
    stored: list[bytes] = []
    data_keys: list[bytes] = []
    for i in range(10):
        prv = "xprv9s21ZrQH143K" + secrets.token_urlsafe(64)
        service.store_private_key(
            pub=random_pub(), prv=prv, coin="btc", source="user" if i % 2 else "backup", type="independent",
            root_key_id=rsa.id if i % 3 == 0 else None,
        )  # fmt: skip
        stored.append(prv.encode())
    for i in range(10):
        key = service.generate_data_key(rsa.id if i % 2 else None)
        assert key.plaintext_key is not None
        data_keys.append(base64.b64decode(key.plaintext_key))
        data_keys.append(key.plaintext_key.encode())
        assert service.decrypt_data_key(key.encrypted_key) == key.plaintext_key
    dump = dump_database(service)
    assert b"kmsq:v1:" in dump and len(dump) > 2000  # the dump really holds the ciphertext rows
    for secret in stored + data_keys:
        for form in encodings(secret):
            assert form not in dump, "a secret is stored in plaintext"
