"""The lifecycle commands against a real worker: a pool of its own (``lambda``) whose worker sees each change
within KMSQ_CACHE_SECONDS (1 s in the tests), driven through the ``kmsq`` command as an operator would."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from tasks.client import KmsClient, KmsError
from tasks.identity import Fleet
from tests.conftest import approved_at
from tests.queue_fixtures import NAMESPACE, Deployment, WorkerProcess, kmsq_command, start_worker
from worker.fleet import ensure_fleet_key
from worker.storage.db import transaction
from worker.storage.models import RootKeyVersion

POOL = "lambda"
CACHE_SECONDS = 1  # tests.queue_fixtures.subprocess_env


@dataclass
class Lambda:
    root: str
    client: KmsClient
    worker: WorkerProcess


@pytest.fixture(scope="module")
def lam(deployment: Deployment) -> Iterator[Lambda]:
    root = deployment.service.create_root_key("aes-256", POOL).id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, POOL)
    fleet = Fleet.from_document(deployment.service.fleet_document() | {"default_pool": POOL})
    # Its scheduler looks every second for what fell due (a version's destruction after its wait).
    worker = start_worker(POOL, 1, deployment.env(KMSQ_SCHEDULE_INTERVAL_SECONDS="1"),
                          deployment.directory / "worker-lambda.log")  # fmt: skip
    client = KmsClient(deployment.broker_url, deployment.register("operator-watch"), fleet, timeout=60,
                       namespace=NAMESPACE)  # fmt: skip
    try:
        yield Lambda(root, client, worker)
    finally:
        client.close()
        worker.stop()


def kmsq(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*kmsq_command(), *args], env=deployment.env(), capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def _version(deployment: Deployment, root: str, version: int) -> RootKeyVersion:
    with deployment.sessions() as db:
        row = db.get(RootKeyVersion, (root, version))
        assert row is not None
        db.expunge(row)
        return row


def _on_token(deployment: Deployment, label: str) -> bool:
    """Whether the token holds ``label`` now (read by a new process: kmsq hsm list)."""
    listed = kmsq(deployment, "hsm", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    return report["this_token"] in report["keys"].get(label, {}).get("tokens", {})


def outcome(call: Callable[[], object]) -> str:
    """``ok``, or the refusal as ``code: message``."""
    try:
        call()
    except KmsError as e:
        return f"{e.code}: {e.message}"
    return "ok"


def seconds_until(expected: str, call: Callable[[], object], timeout: float = 20) -> float:
    """How long until ``call`` has the outcome ``expected`` (fails after ``timeout``)."""
    start = time.monotonic()
    while (got := outcome(call)) != expected:
        assert time.monotonic() - start < timeout, f"still {got!r}, expected {expected!r}"
        time.sleep(0.1)
    return time.monotonic() - start


def test_pool_and_root_key_states_reach_the_worker_within_the_cache_period(deployment: Deployment, lam: Lambda) -> None:
    generate = lambda: lam.client.generate_data_key(lam.root, with_plaintext=False)  # noqa: E731
    assert outcome(generate) == "ok"
    assert kmsq(deployment, "pool", "disable", POOL).returncode == 0
    took = seconds_until(f"invalid: pool {POOL} is disabled", generate)
    assert took <= CACHE_SECONDS + 2, took
    listed = json.loads(kmsq(deployment, "pool", "list", "--json").stdout)
    row = next(p for p in listed if p["name"] == POOL)
    assert (row["state"], row["root_keys"]) == ("disabled", 1)
    assert kmsq(deployment, "pool", "enable", POOL).returncode == 0
    assert seconds_until("ok", generate) <= CACHE_SECONDS + 2
    assert kmsq(deployment, "root-key", "disable", lam.root).returncode == 0
    assert seconds_until(f"invalid: root key {lam.root} is disabled", generate) <= CACHE_SECONDS + 2
    assert kmsq(deployment, "root-key", "enable", lam.root).returncode == 0
    assert seconds_until("ok", generate) <= CACHE_SECONDS + 2


def test_a_version_is_retired_and_destroyed_through_the_commands(deployment: Deployment, lam: Lambda) -> None:
    old = lam.client.generate_data_key(lam.root, with_plaintext=False)["encryptedKey"]
    lam.client.put_keys([{"pub": "xpub-lambda", "prv": "xprv-lambda", "coin": "btc", "source": "user",
                          "type": "tss"}], root_key_id=lam.root)  # fmt: skip
    deployment.secrets.append(b"xprv-lambda")
    assert kmsq(deployment, "root-key", "rotate", lam.root).returncode == 0
    refused = kmsq(deployment, "root-key", "destroy-version", lam.root, "1")
    assert refused.returncode == 7 and "not below the minimum decryption version 1" in refused.stderr
    assert kmsq(deployment, "root-key", "set", lam.root, "--min-decryption-version", "2").returncode == 0
    decrypt = lambda: lam.client.decrypt_data_key(old)  # noqa: E731
    below = f"invalid: ciphertext is under version 1 of root key {lam.root}, below its minimum decryption version 2"
    assert seconds_until(below, decrypt) <= CACHE_SECONDS + 2
    used = kmsq(deployment, "root-key", "destroy-version", lam.root, "1")
    assert used.returncode == 6 and f"run `kmsq root-key rewrap {lam.root}` first" in used.stderr
    rewrapped = kmsq(deployment, "root-key", "rewrap", lam.root, "--json")
    assert rewrapped.returncode == 0 and json.loads(rewrapped.stdout)["rewrapped"] == 2  # the key and fleet keys
    scheduled = kmsq(deployment, "root-key", "destroy-version", lam.root, "1", "--json")
    assert scheduled.returncode == 0, scheduled.stderr
    info = json.loads(scheduled.stdout)
    assert (info["versions"], info["destroyed_versions"], info["min_decryption_version"]) == ([1, 2], [], 2)
    [(version, due)] = info["pending_destruction"]
    waited = datetime.fromisoformat(due) - datetime.now(UTC)
    assert version == 1 and timedelta(days=6, hours=23) < waited <= timedelta(days=7), waited  # the default wait
    status = json.loads(kmsq(deployment, "status", "--json").stdout)
    [mine] = [k for p in status["pools"] if p["pool"] == POOL for k in p["root_keys"]]
    assert mine["pending_destruction"] == [{"version": 1, "due": due}]
    time.sleep(2.5)  # two runs of the worker's scheduler: nothing is due, nothing destroyed
    assert json.loads(kmsq(deployment, "root-key", "list", "--json").stdout)[-1]["destroyed_versions"] == []
    again = kmsq(deployment, "root-key", "destroy-version", lam.root, "1")
    assert again.returncode == 7 and "pending destroy already" in again.stderr, again.stderr
    lowered = kmsq(deployment, "root-key", "set", lam.root, "--min-decryption-version", "1")
    assert lowered.returncode == 7 and "waits for destruction (cancel it first" in lowered.stderr, lowered.stderr
    cancelled = kmsq(deployment, "root-key", "cancel-destroy", lam.root, "1", "--json")  # one operator keeps it
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["pending_destruction"] == []

    # Approved 8 days ago with a wait of 7 (the operator's approval is dated then): the worker destroys it.
    label = _version(deployment, lam.root, 1).hsm_label
    assert _on_token(deployment, label)
    with approved_at(datetime.now(UTC) - timedelta(days=8)):
        deployment.service.destroy_root_key_version(lam.root, 1, 7)
    deadline = time.monotonic() + 20
    while _version(deployment, lam.root, 1).state != "destroyed":
        assert time.monotonic() < deadline, "the worker did not destroy the version that fell due"
        time.sleep(0.2)
    listed = json.loads(kmsq(deployment, "root-key", "list", "--json").stdout)
    info = next(k for k in listed if k["id"] == lam.root)
    assert (info["versions"], info["destroyed_versions"], info["pending_destruction"]) == ([2], [1], [])
    assert not _on_token(deployment, label)  # its HSM object is gone from the token
    assert lam.client.get_key("xpub-lambda", "user", pool=POOL)["prv"] == "xprv-lambda"
    assert outcome(decrypt) == below
    records = json.loads(kmsq(deployment, "audit", "tail", "--pool", POOL, "-n", "50", "--json").stdout)
    done = [r for r in records if r["action"] == "root-key version destroyed"]
    assert len(done) == 1 and done[0]["actor"] == "kmsq:schedule" and done[0]["root_key_version"] == 1


def test_a_rotation_period_is_applied_by_the_pools_worker(deployment: Deployment, lam: Lambda) -> None:
    def current() -> dict[str, object]:
        return next(k for k in json.loads(kmsq(deployment, "root-key", "list", "--json").stdout) if k["id"] == lam.root)

    before = int(str(current()["version"]))
    with approved_at(datetime.now(UTC) - timedelta(days=2)):  # a period of one day, set two days ago: due
        deployment.service.set_rotation_period(lam.root, 1)
    deadline = time.monotonic() + 20
    while int(str(current()["version"])) == before:
        assert time.monotonic() < deadline, "the worker did not rotate the root key that fell due"
        time.sleep(0.2)
    time.sleep(2.5)  # two more runs of its scheduler: once only
    key = current()
    assert key["version"] == before + 1 and key["rotation_period_days"] == 1
    assert datetime.fromisoformat(str(key["next_rotation"])) - datetime.now(UTC) > timedelta(hours=23)
    made = lam.client.generate_data_key(lam.root, with_plaintext=True)
    assert lam.client.decrypt_data_key(made["encryptedKey"])["plaintextKey"] == made["plaintextKey"]
    records = json.loads(kmsq(deployment, "audit", "tail", "--pool", POOL, "-n", "50", "--json").stdout)
    rotations = [r for r in records if r["action"] == "root-key rotate" and r["actor"] == "kmsq:schedule"]
    assert [r["root_key_version"] for r in rotations] == [before + 1]
    shown = kmsq(deployment, "root-key", "set", lam.root, "--no-rotation-period")
    assert shown.returncode == 0 and "rotated only by an operator" in shown.stdout, shown.stderr


def test_adding_a_pool_and_a_worker_restarts_nothing(deployment: Deployment, lam: Lambda) -> None:
    """A new pool with its worker, and a second worker on an existing pool, while the others keep their
    processes and keep answering. The root key and fleet key are created in this process after a subprocess
    created a version (``kmsq root-key rotate`` above): SoftHSM2 then misses that version until it re-reads
    the token, which the adapter does on a missing key."""
    before = {pool: w.process.pid for pool, w in deployment.workers.items()}
    root = deployment.service.create_root_key("aes-256", "omicron").id
    with transaction(deployment.sessions) as db:
        ensure_fleet_key(deployment.service.hsm, db, "omicron")
    fleet = Fleet.from_document(deployment.service.fleet_document())
    new_pool = start_worker("omicron", 1, deployment.env(), deployment.directory / "worker-omicron.log")
    second = start_worker(POOL, 1, deployment.env(), deployment.directory / "worker-lambda-2.log")
    try:
        with KmsClient(deployment.broker_url, deployment.register("grower"), fleet, timeout=60,
                       namespace=NAMESPACE) as kms:  # fmt: skip
            assert "encryptedKey" in kms.generate_data_key(root, with_plaintext=False)
            for pool, roots in (("alpha", deployment.roots[("alpha", "aes-256")]), (POOL, lam.root)):
                assert "encryptedKey" in kms.generate_data_key(roots, with_plaintext=False), pool
    finally:
        second.stop()
        new_pool.stop()
    assert {pool: w.process.pid for pool, w in deployment.workers.items()} == before
    assert all(w.process.poll() is None for w in deployment.workers.values()) and lam.worker.process.poll() is None
