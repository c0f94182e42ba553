"""A pool on two HSMs (issue 23, item 2), with real processes: token A and token B are embedded SoftHSM2 tokens
in token directories of their own (two KMSQ_HOMEs), sharing one Postgres database and Redis. Keys, data keys, a
sealed signing key, a token signing key and the audit chain are made through a worker on A; B is enrolled,
trusted by A's security officer and replicated with the ``kmsq hsm`` commands; then A's token directory is
deleted and its worker killed, and a worker on B opens, signs and verifies everything. Then the restore drill
(item 3): B's keys are backed up for three custodians, two needed; B's token directory is deleted too, one
custodian alone and an altered backup are refused, two custodians restore into a new token C, and a worker on C
opens, signs and verifies everything again."""

from __future__ import annotations

import json
import secrets
import shutil
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import create_engine, text

from schemas.operations import ALLOWABLE_OPS
from tasks.client import KmsClient
from tasks.identity import CallerIdentity, Fleet
from tests.conftest import fresh_database, host_env, run_kmsq
from tests.queue_fixtures import delete_namespace, start_worker

pytestmark = pytest.mark.process
FAST = {"KMSQ_DEFAULT_POOL": "default", "KMSQ_REPLICATE_INTERVAL_SECONDS": "1"}  # workers replicate every ~1 s


def _wait_for_copies(url: str, target: str, prefixes: tuple[str, ...], within: float) -> None:
    """Waits until a copy for ``target`` of a key with each label prefix waits in the database."""
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        deadline = time.monotonic() + within
        while True:
            with engine.connect() as conn:
                labels = [row[0] for row in conn.execute(text("select label from key_copies where target = :t"),
                                                         {"t": target})]  # fmt: skip
            if all(any(label.startswith(prefix) for label in labels) for prefix in prefixes):
                return
            assert time.monotonic() < deadline, f"no copies for {target} of {prefixes}: {labels}"
            time.sleep(0.2)
    finally:
        engine.dispose()


def _ok(home: Path, *args: str, env: dict[str, str]) -> str:
    result = run_kmsq(home, *args, env=env)
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout


def test_a_pool_survives_the_loss_of_the_token_that_made_its_keys(tmp_path: Path, redis_url: str) -> None:
    namespace = f"custody-{uuid.uuid4().hex[:10]}"
    home_a, home_b, home_c = tmp_path / "host-a", tmp_path / "host-b", tmp_path / "host-c"
    with fresh_database("kmsq_custody") as url:
        env_a, env_b = host_env(home_a, url, redis_url, namespace), host_env(home_b, url, redis_url, namespace)
        _ok(home_a, "init", env=env_a)
        for host in (home_b, home_c):  # every HSM host pins the deployment's operator set (docs/DUAL_CONTROL.md)
            host.mkdir(parents=True, exist_ok=True)
            shutil.copy(home_a / "operator-set.json", host / "operator-set.json")
        _ok(home_a, "caller", "keygen", "app", "--dir", str(home_a), env=env_a)
        _ok(home_a, "caller", "add", "app", "--public-key", str(home_a / "app.pub.json"),
            "--allow", ",".join(ALLOWABLE_OPS), "--all-root-keys", "--plaintext", env=env_a)  # fmt: skip
        identity = CallerIdentity.load(home_a / "app.key.json")
        fleet = Fleet.from_document(json.loads(_ok(home_a, "fleet-key", "export", env=env_a)))
        worker_a = start_worker("default", 1, {**env_a, **FAST}, tmp_path / "worker-a.log")
        worker_b = worker_c = None
        try:
            with KmsClient(redis_url, identity, fleet, timeout=60, namespace=namespace) as client:
                prv = "xprv9s21ZrQH143K" + secrets.token_urlsafe(60)
                pub = "xpub661MyMwAqRbc" + secrets.token_urlsafe(60)
                client.put_key(pub, prv, "btc", "user", "independent")
                made = client.generate_data_key()
                sealed_key = client.generate_signing_key("hteth", "backup")  # a sealed xprv, not in the token
                token_key = client.generate_signing_key("hteth", "user", in_hsm=True)
                digest = "0x" + secrets.token_hex(32)
                before = client.sign(token_key["pub"], "user", digest)["signature"]

                enrolled = json.loads(_ok(home_b, "hsm", "enroll", "--json", env=env_b))
                wrong = run_kmsq(home_a, "hsm", "trust", enrolled["name"], "--fingerprint", "00" * 32, env=env_a)
                assert wrong.returncode == 3 and "nothing was trusted" in wrong.stderr
                _ok(home_a, "hsm", "trust", enrolled["name"], "--fingerprint", enrolled["fingerprint"], env=env_a)
                _ok(home_a, "hsm", "replicate", env=env_a)  # (or A's worker does, as it replicates every second)
                _wait_for_copies(url, enrolled["name"], ("kmsq:rk-", "kmsq-policy-v1", "kmsq-ec-"), 5)
                imported = json.loads(_ok(home_b, "hsm", "replicate", "--json", env=env_b))
                assert imported["anchor_adopted"] and not imported["refused"]
                listing = json.loads(_ok(home_a, "hsm", "list", "--json", env=env_a))
                for label, entry in listing["keys"].items():
                    assert len(set(entry["tokens"].values())) == 1 and len(entry["tokens"]) == 2, (label, entry)
                anchors = listing["policy_anchor"]  # each token's anchor digest: B took A's
                assert len(anchors) == 2 and len(set(anchors.values())) == 1, anchors
                tokens = json.loads(_ok(home_a, "status", "--json", env=env_a))["tokens"]
                assert len(tokens["keys"]) == 2 and len(set(tokens["keys"].values())) == 1, tokens
                assert tokens["on_fewer_than_all"] == []
                checked = json.loads(_ok(home_b, "hsm", "check", "--json", env=env_b))
                assert checked["missing"] == [] and checked["capabilities"], checked
                checks = json.loads(_ok(home_a, "status", "--json", env=env_a))["tokens"]["checks"]
                by = {name: check["checked_by"] for name, check in checks.items()}
                assert by[enrolled["name"]] == "kmsq hsm check" and "worker default" in by.values(), checks
                assert all(check["missing"] == [] for check in checks.values()), checks

                # After the operator's replication, the workers replicate by themselves: a root key rotated on A
                # (a new version, and the policy anchor moved), a data key under it and a new token key reach B
                # through A's worker, which wraps them, and B's worker, which takes them before it serves.
                rotated = json.loads(_ok(home_a, "root-key", "list", "--json", env=env_a))[0]["id"]
                _ok(home_a, "root-key", "rotate", rotated, env=env_a)
                time.sleep(2)  # the worker's policy cache (KMSQ_CACHE_SECONDS=1)
                late = client.generate_data_key()
                late_key = client.generate_signing_key("hteth", "backup", in_hsm=True)
                _wait_for_copies(url, enrolled["name"], ("kmsq:" + rotated + ":v2", "kmsq-ec-"), 4)

                assert worker_a.stop() == 0
                shutil.rmtree(home_a / "tokens")  # HSM A is gone, with every key it held
                worker_b = start_worker("default", 1, {**env_b, **FAST}, tmp_path / "worker-b.log")
                assert client.decrypt_data_key(late["encryptedKey"])["plaintextKey"] == late["plaintextKey"]
                _recovers(late_key["pub"], digest, client.sign(late_key["pub"], "backup", digest)["signature"])

                assert client.get_key(pub, "user")["prv"] == prv
                assert client.decrypt_data_key(made["encryptedKey"])["plaintextKey"] == made["plaintextKey"]
                _recovers(sealed_key["pub"], digest, client.sign(sealed_key["pub"], "backup", digest)["signature"])
                after = client.sign(token_key["pub"], "user", digest)["signature"]
                for signature in (before, after):  # the token key signs in B as it did in A
                    _recovers(token_key["pub"], digest, signature)
                newer = client.generate_data_key()  # and B makes new ones
                assert "intact" in _ok(home_b, "audit", "verify", env=env_b)

                # The restore drill (item 3): B's keys backed up for three custodians, two needed; then B is lost
                # too, and a new token C is restored from the backup by two custodians.
                backup_file = _backed_up(tmp_path, home_b, env_b)
                assert worker_b.stop() == 0
                shutil.rmtree(home_b / "tokens")  # every token is gone
                env_c = host_env(home_c, url, redis_url, namespace)
                _restore_refusals(tmp_path, home_c, env_c, backup_file)
                restored = json.loads(_ok(home_c, "backup", "restore", str(backup_file), "--fingerprint",
                                          (tmp_path / "backup-fingerprint").read_text(), "--custodian-key",
                                          str(tmp_path / "custodians/alice.custodian-key.json"), "--custodian-key",
                                          str(tmp_path / "custodians/carol.custodian-key.json"), "--json",
                                          "--operator-key", str(home_a / "operators" / "admin.operator.json"),
                                          env=env_c))  # fmt: skip
                assert restored["restored"] and not restored["already_here"], restored
                worker_c = start_worker("default", 1, {**env_c, **FAST}, tmp_path / "worker-c.log")
                assert client.get_key(pub, "user")["prv"] == prv
                for data_key in (made, late, newer):
                    assert client.decrypt_data_key(data_key["encryptedKey"])["plaintextKey"] == data_key["plaintextKey"]
                for key, path in ((sealed_key, "backup"), (token_key, "user"), (late_key, "backup")):
                    _recovers(key["pub"], digest, client.sign(key["pub"], path, digest)["signature"])
            assert "intact" in _ok(home_c, "audit", "verify", env=env_c)
        finally:
            for worker in (worker_a, worker_b, worker_c):
                if worker is not None:
                    worker.stop()
            delete_namespace(redis_url, namespace)


def _backed_up(tmp_path: Path, home: Path, env: dict[str, str]) -> Path:
    """Three custodians' keys, a backup key needing two of them (trusted by the token of ``home``) and a backup;
    returns the backup file (the fingerprint is left in tmp_path/backup-fingerprint)."""
    custodians = tmp_path / "custodians"
    for name in ("alice", "bob", "carol"):
        _ok(home, "backup", "custodian-key", name, "--dir", str(custodians), "--no-passphrase", env=env)
    key = json.loads(_ok(home, "backup", "init", "--threshold", "2", "--out", str(tmp_path / "backup-key.json"),
                         *(arg for name in ("alice", "bob", "carol")
                           for arg in ("--custodian", str(custodians / f"{name}.custodian.json"))),
                         "--json", env=env))  # fmt: skip
    (tmp_path / "backup-fingerprint").write_text(key["fingerprint"])
    made = json.loads(_ok(home, "backup", "create", "--key", str(tmp_path / "backup-key.json"), "--out",
                          str(tmp_path / "pool.kmsq-backup"), "--json", env=env))  # fmt: skip
    assert made["keys"] >= 5 and made["left_out"] == [], made  # 2 root key versions, the policy key, 2 token keys
    return tmp_path / "pool.kmsq-backup"


def _restore_refusals(tmp_path: Path, home: Path, env: dict[str, str], backup_file: Path) -> None:
    """Without the operators' approval nothing is restored; one custodian cannot restore; an altered backup is
    refused; none of them leaves a key in the token."""
    fingerprint = (tmp_path / "backup-fingerprint").read_text()
    alice, bob = (str(tmp_path / f"custodians/{name}.custodian-key.json") for name in ("alice", "bob"))
    unapproved = run_kmsq(home, "backup", "restore", str(backup_file), "--fingerprint", fingerprint,
                          "--custodian-key", alice, "--custodian-key", bob, env=env)  # fmt: skip
    assert unapproved.returncode == 9, unapproved.stderr
    assert "backup.restore needs 1 of 1 (admin): propose it (kmsq propose backup restore" in unapproved.stderr
    env = env | {"KMSQ_OPERATOR_KEY": str(home.parent / "host-a" / "operators" / "admin.operator.json")}
    alone = run_kmsq(home, "backup", "restore", str(backup_file), "--fingerprint", fingerprint, "--custodian-key",
                     alice, env=env)  # fmt: skip
    assert alone.returncode == 7 and "needs 2 of its 3 custodians; 1 opened a share" in alone.stderr, alone.stderr
    document = json.loads(backup_file.read_text())
    document["body"]["created_at"] = "2020-01-01T00:00:00+00:00"
    altered = tmp_path / "altered.kmsq-backup"
    altered.write_text(json.dumps(document))
    refused = run_kmsq(home, "backup", "restore", str(altered), "--fingerprint", fingerprint, "--custodian-key",
                       alice, "--custodian-key", bob, env=env)  # fmt: skip
    assert refused.returncode == 7 and "the backup file does not verify" in refused.stderr, refused.stderr
    listing = json.loads(_ok(home, "hsm", "list", "--json", env=env))
    here = listing["this_token"]
    assert not any(here in entry["tokens"] for entry in listing["keys"].values()), listing


def _recovers(xpub: str, digest: str, signature: str) -> None:
    """The signature (0x r s v) is by the xpub's key: eth-keys recovers the same public key."""
    from embit import bip32
    from eth_keys.datatypes import Signature

    raw = bytes.fromhex(signature[2:])
    recovered = Signature(raw[:64] + bytes([raw[64] - 27])).recover_public_key_from_msg_hash(bytes.fromhex(digest[2:]))
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), bip32.HDKey.from_string(xpub).key.sec())
    assert recovered.to_bytes() == point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
