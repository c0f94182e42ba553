"""Two deployments on one broker (a Redis database, or a RabbitMQ server), each in its namespace (a key prefix, or
a vhost): the same pool name, a caller of the same name and the same reply queue suffix, their own databases and
fleet keys, real workers. Neither takes the other's requests or replies (without namespaces each would get the
other's messages: "reply signed by an unknown key")."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from schemas.operations import ALLOWABLE_OPS
from tasks.client import KmsClient, KmsError
from tasks.identity import CallerIdentity, Fleet
from tests.conftest import fresh_database
from tests.queue_fixtures import (
    NAMESPACE,
    Deployment,
    delete_namespace,
    rabbitmq_vhost,
    start_worker,
    subprocess_env,
)
from worker import callers
from worker.fleet import ensure_fleet_key
from worker.runtime import KeyService
from worker.storage.db import create_db_engine, migrate, session_factory, transaction

pytestmark = pytest.mark.brokers
OTHER = NAMESPACE + "-b"


class Other:
    """The second deployment: its database, fleet, caller "full" and a worker of pool alpha."""

    def __init__(self, deployment: Deployment, url: str, directory: Path) -> None:
        self.engine = create_db_engine(url)
        migrate(self.engine)
        self.service = KeyService(deployment.service.hsm, session_factory(self.engine), default_pool="alpha")
        self.service.create_root_key("aes-256", "alpha")
        with transaction(self.service.sessions) as db:
            ensure_fleet_key(deployment.service.hsm, db, "alpha")
        self.fleet = Fleet.from_document(self.service.fleet_document())
        self.identity = CallerIdentity.generate("full")
        self.identity.write(directory)
        with transaction(self.service.sessions) as db:
            public = callers.read_public_identity(directory / "full.pub.json")
            callers.add_caller(deployment.service.hsm, db, "full", public, list(ALLOWABLE_OPS), None, True)
        env = subprocess_env(deployment.settings, url, deployment.broker_url, KMSQ_NAMESPACE=OTHER)
        self.worker = start_worker("alpha", 1, env, directory / "worker-b.log")


@pytest.fixture(scope="module")
def other(deployment: Deployment, broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Other]:
    with ExitStack() as stack:
        if broker == "rabbitmq":
            stack.enter_context(rabbitmq_vhost(OTHER))  # the second deployment's vhost, deleted afterwards
        url = stack.enter_context(fresh_database("kmsq_namespace"))
        second = Other(deployment, url, tmp_path_factory.mktemp("namespace-b"))
        try:
            yield second
        finally:
            second.worker.stop()
            second.engine.dispose()
            if broker == "redis":
                delete_namespace(deployment.broker_url, OTHER)


def test_each_namespace_serves_only_its_own_requests(
    deployment: Deployment, full_caller: CallerIdentity, other: Other
) -> None:
    assert deployment.fleet.pools["alpha"].signing_key_id != other.fleet.pools["alpha"].signing_key_id
    with (
        deployment.client(full_caller, reply_queue="shared") as a,
        KmsClient(deployment.broker_url, other.identity, other.fleet, namespace=OTHER, reply_queue="shared",
                  timeout=60) as b,
    ):  # fmt: skip
        assert a.reply_queue == b.reply_queue == "kmsq.reply.full.shared"
        futures_a = [a.submit_generate_data_key() for _ in range(30)]
        futures_b = [b.submit_generate_data_key() for _ in range(30)]
        keys_a = [a.wait(f) for f in futures_a]
        keys_b = [b.wait(f) for f in futures_b]
        assert {f.reply.worker_key_id for f in futures_a if f.reply} == {a.fleet.pools["alpha"].signing_key_id}
        assert {f.reply.worker_key_id for f in futures_b if f.reply} == {other.fleet.pools["alpha"].signing_key_id}
        deployment.secrets += [k["plaintextKey"].encode() for k in keys_a + keys_b]
        assert b.decrypt_data_key(keys_b[0]["encryptedKey"]) == {"plaintextKey": keys_b[0]["plaintextKey"]}
        with pytest.raises(KmsError) as foreign:  # B's worker does not know A's root key
            b.decrypt_data_key(keys_a[0]["encryptedKey"])
        assert foreign.value.code == "invalid"
        assert not a.take_unclaimed() and not b.take_unclaimed()
    served = re.findall(r"kmsq\.\w+ [0-9a-f-]{36} -> ", other.worker.log.read_text())
    assert len(served) == 32  # B's 30 keys and 2 decryptions, nothing of A's


@pytest.mark.brokers("redis")
def test_every_redis_key_of_a_namespace_carries_its_prefix(deployment: Deployment, other: Other) -> None:
    client = redis.Redis.from_url(deployment.broker_url)
    try:
        ours = [k.decode() for k in client.scan_iter(match="*kms.alpha*", count=1000)]
        ours += [k.decode() for k in client.scan_iter(match="*kmsq.reply.full.*", count=1000)]
        both = [k for k in ours if k.startswith((NAMESPACE + ":", OTHER + ":"))]
        assert any(k.startswith(OTHER + ":") for k in both) and any(k.startswith(NAMESPACE + ":") for k in both)
        assert not [k for k in ours if k.startswith(("kms.", "kmsq.", "_kombu."))]  # nothing outside a namespace
    finally:
        client.close()
