"""``kmsq root-key rewrap`` on a real deployment: Postgres, SoftHSM2 and workers that keep answering
``get_key`` for the keys being rewrapped, and a job killed (SIGKILL) in the middle and run again."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from schemas.envelope import EncryptedDataKey
from tasks.client import AsyncKmsClient, KmsClient
from tasks.identity import Fleet
from tests.conftest import random_pub
from tests.queue_fixtures import NAMESPACE, Deployment, kmsq_command
from worker.storage.models import Job, PrivateKey

ROWS = 300


@dataclass
class Stored:
    root: str
    client: KmsClient
    keys: dict[str, str]


@pytest.fixture(scope="module")
def stored(deployment: Deployment) -> Iterator[Stored]:
    """ROWS private keys stored under a root key of their own in pool alpha."""
    root = deployment.service.create_root_key("aes-256", "alpha").id
    fleet = Fleet.from_document(deployment.service.fleet_document())
    client = KmsClient(deployment.broker_url, deployment.register("rewrapper"), fleet, timeout=60, namespace=NAMESPACE)
    keys = {random_pub(): "xprv" + secrets.token_hex(32) for _ in range(ROWS)}
    deployment.secrets.extend(prv.encode() for prv in keys.values())
    items = [{"pub": p, "prv": k, "coin": "btc", "source": "user", "type": "tss"} for p, k in keys.items()]
    for start in range(0, ROWS, 100):
        replies = client.put_keys(items[start : start + 100], root_key_id=root)["items"]
        assert all("error" not in r for r in replies), replies
    try:
        yield Stored(root, client, keys)
    finally:
        client.close()


@dataclass
class Reader:
    """Reads random stored keys through the queue until stopped; every answer must be the stored key."""

    stored: Stored
    answers: list[float] = field(default_factory=list)  # when each correct answer came
    wrong: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        pubs = list(self.stored.keys)
        while not self.stop.is_set():
            pub = random.choice(pubs)
            try:
                got = self.stored.client.get_key(pub, "user")["prv"]
            except Exception as e:  # any refusal during the rewrap is a defect
                self.wrong.append(f"{pub}: {e}")
                continue
            if got == self.stored.keys[pub]:
                self.answers.append(time.monotonic())
            else:
                self.wrong.append(f"{pub}: another key")


def _job(deployment: Deployment, name: str) -> Job | None:
    with deployment.sessions() as db:
        return db.get(Job, name)


def _versions(deployment: Deployment, root: str) -> dict[str, tuple[int, int | None, str]]:
    with deployment.sessions() as db:
        rows = db.scalars(select(PrivateKey).where(PrivateKey.root_key == root))
        return {r.pub: (r.root_key_version, r.sealed_version, r.encrypted_prv) for r in rows}


def test_a_rewrap_killed_midway_finishes_when_run_again_while_workers_serve_get_key(
    deployment: Deployment, stored: Stored
) -> None:
    before = _versions(deployment, stored.root)
    assert {v[:2] for v in before.values()} == {(1, None)}
    deployment.service.rotate_root_key(stored.root)
    reader = Reader(stored)
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    command = [*kmsq_command(), "root-key", "rewrap", stored.root, "--batch", "5", "--job", "killed", "--json"]
    first = subprocess.Popen(command, env=deployment.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    deadline = started + 120
    while time.monotonic() < deadline:
        job = _job(deployment, "killed")
        if job is not None and job.done >= 20:
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    killed_at = time.monotonic()
    job = _job(deployment, "killed")
    assert job is not None and job.state == "running" and 20 <= job.done < ROWS, job and job.done
    half = _versions(deployment, stored.root)
    assert sum(v[0] == 2 for v in half.values()) == job.done  # exactly the committed batches
    second = subprocess.run(command, env=deployment.env(), capture_output=True, text=True, timeout=300, check=False)
    reader.stop.set()
    thread.join(timeout=90)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert (summary["done_before"], summary["rewrapped"], summary["remaining"], summary["failed"]) == (
        job.done, ROWS - job.done, 0, 0)  # fmt: skip
    finished = _job(deployment, "killed")
    assert finished is not None and (finished.state, finished.done, finished.failed) == ("finished", ROWS, 0)
    after = _versions(deployment, stored.root)
    assert {v[:2] for v in after.values()} == {(2, 1)}
    assert all(after[pub][2] == before[pub][2] for pub in before)  # ciphertexts untouched
    assert not reader.wrong, reader.wrong[:5]
    assert any(started <= t <= killed_at for t in reader.answers), "no get_key was answered during the rewrap"
    for pub in random.sample(list(stored.keys), 20):
        assert stored.client.get_key(pub, "user")["prv"] == stored.keys[pub]


def test_caller_data_keys_are_rewrapped_through_the_queue(deployment: Deployment, tmp_path: Path) -> None:
    """rewrap_data_key(s) against real workers, from the SDK (sync and async) and `kmsq rewrap-data-key`: the
    results open to the same keys under the new version; the caller has no plaintext permission."""
    root = deployment.service.create_root_key("aes-256", "alpha").id
    document = deployment.service.fleet_document()
    identity = deployment.register("rewrap-only", ("generate_data_key_without_plaintext", "rewrap_data_key"),
                                   plaintext=False)  # fmt: skip
    with KmsClient(
        deployment.broker_url, identity, Fleet.from_document(document), timeout=60, namespace=NAMESPACE
    ) as kms:
        old = [k["encryptedKey"] for k in kms.generate_data_keys(4, root_key_id=root, with_plaintext=False)["items"]]
        deployment.service.rotate_root_key(root)
        # Each worker process sees a rotation within KMSQ_CACHE_SECONDS (1 s here); until then the old version
        # is current for it.
        time.sleep(1.5)
        deadline = time.monotonic() + 30
        single = kms.rewrap_data_key(old[0])["encryptedKey"]
        while single == old[0] and time.monotonic() < deadline:
            time.sleep(0.2)
            single = kms.rewrap_data_key(old[0])["encryptedKey"]
        items = kms.rewrap_data_keys(old)["items"]
        from_async = asyncio.run(AsyncKmsClient(kms).rewrap_data_key(old[1]))["encryptedKey"]
    fleet_file = tmp_path / "fleet.json"
    fleet_file.write_text(json.dumps(document), encoding="utf-8")
    cli = subprocess.run(
        [*kmsq_command(), "rewrap-data-key", old[2], "--fleet", str(fleet_file),
         "--identity", str(deployment.directory / "callers" / "rewrap-only.key.json")],
        env=deployment.env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)["encryptedKey"]
    for before, after in [(old[0], single), (old[1], from_async), (old[2], from_cli),
                          *((o, i["encryptedKey"]) for o, i in zip(old, items, strict=True))]:  # fmt: skip
        assert EncryptedDataKey.from_text(after).root_key_version == 2
        assert deployment.service.decrypt_data_key(after) == deployment.service.decrypt_data_key(before)
