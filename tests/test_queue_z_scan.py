"""After the queue tests stored and fetched private keys and data keys: no plaintext secret in Redis (every key:
queues, kombu's unacked hash, anything else), in the worker and caller logs, or in a dump of the database.

The file name sorts it after the other queue tests so that it also scans what they left behind; it makes its
own secrets too, so it proves something when run alone.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Any

import redis

from schemas.wire import namespace_key_prefix, seal_private_key
from tasks.client import KmsClient
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment
from tests.test_no_plaintext_at_rest import dump_database, encodings


def dump_redis(url: str, namespace: str) -> bytes:
    """Every key of ``namespace`` in the test Redis database and its value, whatever its type."""
    client: Any = redis.Redis.from_url(url)  # untyped use: redis-py's stubs mix sync and async results
    out = bytearray()
    for key in client.scan_iter(match=namespace_key_prefix(namespace) + "*", count=1000):
        kind = client.type(key)
        out += key + b"\n"
        if kind == b"string":
            out += (client.get(key) or b"") + b"\n"
        elif kind == b"list":
            out += b"\n".join(client.lrange(key, 0, -1)) + b"\n"
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                out += field + b"=" + value + b"\n"
        elif kind == b"set":
            out += b"\n".join(client.smembers(key)) + b"\n"
        elif kind == b"zset":
            out += b"\n".join(member for member, _ in client.zrange(key, 0, -1, withscores=True)) + b"\n"
    client.close()
    return bytes(out)


def test_no_plaintext_secret_in_redis_logs_or_database(deployment: Deployment, client: KmsClient) -> None:
    own: list[bytes] = []
    for _ in range(5):
        pub, prv = random_pub(), "xprv9s21ZrQH143K" + secrets.token_urlsafe(48)
        client.put_key(pub, prv, "btc", "user", "independent")
        assert client.get_key(pub, "user")["prv"] == prv
        key = client.generate_data_key()
        assert client.decrypt_data_key(key["encryptedKey"]) == {"plaintextKey": key["plaintextKey"]}
        own += [prv.encode(), key["plaintextKey"].encode(), base64.b64decode(key["plaintextKey"])]
    # Keys generated inside kmsq, used to sign: their xprvs must not leave the worker either.
    for coin in ("tbtc", "hteth"):
        generated = client.generate_signing_key(coin, "user")
        if coin == "hteth":
            client.sign(generated["pub"], "user", "0x" + secrets.token_hex(32))
    own += generated_secrets(deployment)
    # Leave messages sitting in Redis as well: requests for a pool nobody serves, one with a sealed prv.
    prv = "xprv-parked-" + secrets.token_hex(24)
    own.append(prv.encode())
    request_id = uuid.uuid4()
    sealed = seal_private_key(
        client.fleet.pools["alpha"].transport_key, client.identity.caller, request_id, prv.encode()
    )
    params = {"op": "put_key", "pub": random_pub(), "prv": sealed, "coin": "btc", "source": "user", "type": "tss"}
    request, args = client.build_request(params, "alpha", request_id)
    client.publish("kmsq.put_key", args, str(request_id), "parked", request.reply_queue)

    redis_dump = dump_redis(deployment.broker_url, NAMESPACE)
    database = dump_database(deployment.service)
    logs = b"".join(w.log.read_bytes() for w in deployment.workers.values())
    logs += b"".join(p.read_bytes() for p in deployment.directory.glob("worker-*.log"))
    logs += b"".join(p.read_bytes() for p in deployment.directory.glob("gateway-*.log"))
    logs += deployment.caller_log.read_bytes()
    assert b"kms.parked" in redis_dump and b"kmsq:v1:" in database and b"ready." in logs  # the dumps are real
    count = len(own) + len(deployment.secrets)  # a count, so that a failure does not print the secrets
    assert count >= 16
    forms = [form for secret in own + deployment.secrets for form in encodings(secret)]
    scan = Scanner(forms)
    assert scan.finds(own[0] + b" " + encodings(own[0])[1]), "the scanner finds what it looks for"  # it can fail
    assert not scan.finds(redis_dump), "a plaintext secret is in Redis"
    assert not scan.finds(database), "a plaintext secret is in the database"
    assert not scan.finds(logs), "a plaintext secret is in a log"


def generated_secrets(deployment: Deployment) -> list[bytes]:
    """The xprv and the private key of every key generated inside kmsq that the run stored (opened here with
    the test's access to the token: they are unknown to any caller)."""
    from embit import bip32
    from sqlalchemy import select

    from worker import service, signing
    from worker.storage.models import PrivateKey

    found: list[bytes] = []
    with deployment.sessions() as db:
        rows = db.scalars(select(PrivateKey).where(PrivateKey.exportable.is_(False))).all()
        for row in rows:
            key = service.get_private_key(deployment.service.hsm, db, row.pub, row.source, for_signing=True)
            if signing.token_key_of(key.prv) is None:
                found += [key.prv.encode(), bip32.HDKey.from_string(key.prv).key.secret]
    assert len(found) >= 2, "no generated key was opened"
    return found


class Scanner:
    """Every form of every secret, looked for in one pass over a dump (Aho-Corasick): a ``bytes.find`` per
    form and dump took 94 s of the suite once the suite had handled thousands of secrets."""

    def __init__(self, forms: list[bytes]) -> None:
        import ahocorasick

        self._automaton = ahocorasick.Automaton()
        for form in forms:
            self._automaton.add_word(form.decode("latin-1"), len(form))  # bytes as code points 0-255
        self._automaton.make_automaton()

    def finds(self, dump: bytes) -> bool:
        """True when any form occurs in ``dump``."""
        return next(self._automaton.iter(dump.decode("latin-1")), None) is not None
