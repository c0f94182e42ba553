"""``kmsq import-legacy`` from a real Postgres table shaped like the replaced system's, into the queue
deployment's database (SoftHSM2 root key), then read back through the queue by a real worker."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, make_url, select, text

from kmsq.output import EXIT_CONFIG, EXIT_INVALID
from tasks.client import KmsClient, KmsError
from tests.conftest import fresh_database, random_pub
from tests.queue_fixtures import Deployment, kmsq_command
from worker.legacy import sjcl
from worker.storage.models import LegacyImport, PrivateKey

VECTORS = Path(__file__).resolve().parent / "vectors" / "legacy_rows.json"
OLD_TABLE = """
CREATE TABLE private_keys (
    id SERIAL PRIMARY KEY,
    pub VARCHAR(255) NOT NULL,
    source VARCHAR(16) NOT NULL,
    coin VARCHAR(16) NOT NULL,
    type VARCHAR(16) NOT NULL,
    provider VARCHAR(32),
    "rootKey" VARCHAR(255) NOT NULL,
    "encryptedDataKey" TEXT NOT NULL,
    "encryptedPrv" TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""
COLUMNS = ("id", "pub", "source", "coin", "type", "provider", "rootKey", "encryptedDataKey", "encryptedPrv")


def tamper(envelope: str) -> str:
    """Flips one bit of an sjcl envelope's ct."""
    fields = json.loads(envelope)
    ct = bytearray(base64.b64decode(fields["ct"]))
    ct[0] ^= 1
    return json.dumps({**fields, "ct": base64.b64encode(bytes(ct)).decode()})


def legacy_row(row_id: int, pub: str, prv: str, source: str = "user") -> dict[str, Any]:
    """A row as the old system wrote it, for a key we choose."""
    data_key = base64.b64encode(os.urandom(32)).decode()
    return {
        "id": row_id, "pub": pub, "source": source, "coin": "btc", "type": "independent", "provider": "dinamo",
        "rootKey": "legacy-root", "encryptedDataKey": sjcl.encrypt("legacy-root", data_key, ks=256, ts=128),
        "encryptedPrv": sjcl.encrypt(data_key, prv, ks=256),
    }  # fmt: skip


@pytest.fixture(scope="module")
def vector_rows() -> list[dict[str, Any]]:
    assert VECTORS.exists(), f"test vectors missing: {VECTORS}"
    rows: list[dict[str, Any]] = json.loads(VECTORS.read_text())["rows"]
    assert len(rows) == 25
    return rows


@dataclass
class Legacy:
    """The old database, loaded, and what an import must do with it."""

    url: str
    expected: dict[int, dict[str, str]]  # old id -> pub, source, coin, type, prv
    corrupted: dict[int, str]  # old id -> reason fragment
    matched: int  # old id already stored in kmsq with the same key


@pytest.fixture(scope="module")
def legacy(deployment: Deployment, client: KmsClient, vector_rows: list[dict[str, Any]]) -> Iterator[Legacy]:
    """The 25 vector rows, plus rows that must fail (tampered, malformed, wrong rootKey, a (pub, source)
    kmsq holds with another key) and one kmsq already holds with the same key."""
    rows = [{c: r[c] for c in COLUMNS} for r in vector_rows]
    expected = {
        r["id"]: {k: r[k] for k in ("pub", "source", "coin", "type")} | {"prv": r["expected"]["prv"]}
        for r in vector_rows
    }
    for r in vector_rows:
        deployment.secrets += [r["expected"]["prv"].encode(), r["expected"]["dataKey"].encode()]
        deployment.secrets.append(r["rootKey"].encode())  # the old root key name: kept only sealed
    first = rows[0]
    corrupted = {
        101: ("encryptedPrv: authentication failed", {**first, "id": 101, "pub": random_pub(),
                                                       "encryptedPrv": tamper(first["encryptedPrv"])}),
        102: ("encryptedDataKey: envelope is not JSON", {**first, "id": 102, "pub": random_pub(),
                                                         "encryptedDataKey": "{not json"}),
        103: ("encryptedDataKey: authentication failed", {**first, "id": 103, "pub": random_pub(),
                                                          "rootKey": "another-root"}),
        104: ("coin must not contain control characters", {**first, "id": 104, "pub": random_pub(), "coin": "btc\t"}),
        105: ("NULL", {**first, "id": 105, "pub": random_pub(), "encryptedPrv": None}),
    }  # fmt: skip
    # Stored in kmsq before the import: once with the same key (matched), once with another (refused).
    same_pub, other_pub = random_pub(), random_pub()
    client.put_key(same_pub, "xprv-same-" + random_pub(), "btc", "user", "independent")
    same_prv = client.get_key(same_pub, "user")["prv"]
    client.put_key(other_pub, "xprv-kmsq-" + random_pub(), "btc", "user", "independent")
    rows.append(legacy_row(201, same_pub, same_prv))
    expected[201] = {"pub": same_pub, "source": "user", "coin": "btc", "type": "independent", "prv": same_prv}
    rows.append(legacy_row(202, other_pub, "xprv-legacy-" + random_pub()))
    reasons = {k: reason for k, (reason, _) in corrupted.items()}
    reasons[202] = "a different key is stored"
    rows += [row for _, row in corrupted.values()]
    with fresh_database("kmsq_legacy") as url:
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text(OLD_TABLE))
            conn.execute(text(
                'INSERT INTO private_keys (id, pub, source, coin, type, provider, "rootKey", "encryptedDataKey", '
                '"encryptedPrv") VALUES (:id, :pub, :source, :coin, :type, :provider, :rootKey, '
                ":encryptedDataKey, :encryptedPrv)"
            ), rows)  # fmt: skip
        engine.dispose()
        yield Legacy(url.replace("postgresql+psycopg://", "postgresql://"), expected, reasons, 201)


def import_legacy(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*kmsq_command(), "import-legacy", *args]
    return subprocess.run(command, env=deployment.env(), capture_output=True, text=True, timeout=300, check=False)


def summary_of(result: subprocess.CompletedProcess[str], exit_code: int) -> dict[str, Any]:
    assert result.returncode == exit_code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def imported_rows(deployment: Deployment, legacy: Legacy) -> dict[int, LegacyImport]:
    """The legacy_imports rows of ``legacy``'s table (other tests import other tables)."""
    origin = f"{make_url(legacy.url).database}/private_keys"
    with deployment.sessions() as db:
        return {row.legacy_id: row for row in db.scalars(select(LegacyImport).where(LegacyImport.origin == origin))}


def assert_failures(summary: dict[str, Any], legacy: Legacy) -> None:
    failures = {f["legacy_id"]: f["reason"] for f in summary["failures"]}
    assert set(failures) == set(legacy.corrupted)
    for legacy_id, fragment in legacy.corrupted.items():
        assert fragment in failures[legacy_id], (legacy_id, failures[legacy_id])


def test_dry_run_checks_every_row_and_writes_nothing(deployment: Deployment, legacy: Legacy) -> None:
    before = deployment.count("private_keys")
    summary = summary_of(import_legacy(deployment, "--from", legacy.url, "--dry-run", "--json"), EXIT_INVALID)
    assert summary["dry_run"] is True and summary["rows"] == 25 + 2 + 5
    assert (summary["imported"], summary["matched"], summary["skipped"]) == (25, 1, 0)
    assert summary["root_key_names_registered"] == 2  # the vectors' rootKey and "legacy-root"
    assert_failures(summary, legacy)
    assert deployment.count("private_keys") == before and not imported_rows(deployment, legacy)


def test_import_recovers_every_row_once(deployment: Deployment, legacy: Legacy, client: KmsClient) -> None:
    root = deployment.roots[("alpha", "aes-256")]
    before = deployment.count("private_keys")
    result = import_legacy(deployment, "--from", legacy.url, "--root-key", root, "--json", "--threads", "2")
    summary = summary_of(result, EXIT_INVALID)
    assert (summary["imported"], summary["matched"], summary["skipped"], summary["failed"]) == (25, 1, 0, 6)
    assert summary["root_key_id"] == root and summary["origin"].endswith("/private_keys")
    assert summary["root_key_names_registered"] == 2
    assert_failures(summary, legacy)
    assert deployment.count("private_keys") == before + 25
    for secret in deployment.secrets:  # nothing recovered is printed
        assert secret.decode() not in result.stdout + result.stderr

    imported = imported_rows(deployment, legacy)
    assert set(imported) == set(legacy.expected)
    assert imported[legacy.matched].outcome == "matched" and imported[1].outcome == "imported"
    with deployment.sessions() as db:
        stored = {r.id: r for r in db.scalars(select(PrivateKey).where(PrivateKey.id.in_(
            [i.private_key_id for i in imported.values()])))}  # fmt: skip
    for legacy_id, want in legacy.expected.items():
        row = stored[imported[legacy_id].private_key_id]
        assert (row.pub, row.source) == (want["pub"], want["source"])
        assert row.encrypted_prv.startswith("kmsq:v1:") and row.encrypted_data_key.startswith("kmsq:v1:")
        # Readable through kmsq: a worker opens it in the HSM and seals it to the caller.
        got = client.get_key(want["pub"], want["source"], pool="alpha")
        assert got == {k: want[k] for k in ("pub", "prv", "coin", "source", "type")}

    again = summary_of(import_legacy(deployment, "--from", legacy.url, "--root-key", root, "--json"), EXIT_INVALID)
    assert (again["imported"], again["matched"], again["skipped"]) == (0, 0, 26)
    assert again["root_key_names_registered"] == 0
    assert_failures(again, legacy)
    assert deployment.count("private_keys") == before + 25 and len(imported_rows(deployment, legacy)) == 26


def test_human_output_names_failed_rows(deployment: Deployment, legacy: Legacy) -> None:
    result = import_legacy(deployment, "--from", legacy.url, "--dry-run")
    assert result.returncode == EXIT_INVALID, result.stderr
    assert "rows not imported" in result.stdout and "103" in result.stdout
    assert "dry run, nothing written" in result.stdout


@pytest.mark.parametrize(
    ("table", "fragment"),
    [("private_keys; DROP TABLE x", "bad table name"), ("no_such_table", "no table"), ("pg_catalog.pg_class", "lacks")],
)
def test_bad_tables_are_refused(deployment: Deployment, legacy: Legacy, table: str, fragment: str) -> None:
    result = import_legacy(deployment, "--from", legacy.url, "--table", table)
    assert result.returncode == EXIT_CONFIG, (result.stdout, result.stderr)
    assert result.stderr.startswith("kmsq: error: ") and fragment in result.stderr


def test_old_encrypted_keys_still_decrypt(
    deployment: Deployment, legacy: Legacy, client: KmsClient, vector_rows: list[dict[str, Any]]
) -> None:
    """The old generateDataKey's encryptedKey (an SJCL envelope under the root key's name) decrypts through
    kmsq once the import kept that name; the old client flow then opens its data with the string."""
    row = vector_rows[3]
    data_key = client.decrypt_data_key(row["encryptedDataKey"])["plaintextKey"]
    assert data_key == row["expected"]["dataKey"]
    assert sjcl.decrypt(data_key, row["encryptedPrv"]) == row["expected"]["prv"]

    fresh = base64.b64encode(os.urandom(32)).decode()
    deployment.secrets.append(fresh.encode())
    old_style = sjcl.encrypt(row["rootKey"], fresh, ks=256, ts=128, iter=10_000)
    batch = client.decrypt_data_keys([old_style, "kmsq:v1:AAAA", sjcl.encrypt("never-kept", fresh)])["items"]
    assert batch[0] == {"plaintextKey": fresh}
    assert batch[1]["error"] == batch[2]["error"] == "invalid"
    for refused in (
        sjcl.encrypt("never-kept", fresh, ks=256, ts=128),  # a name kmsq does not keep
        sjcl.encrypt(row["rootKey"], fresh, iter=200_000),  # more PBKDF2 work than a request may ask
        tamper(old_style),
        "{not an envelope",
    ):
        with pytest.raises(KmsError) as refusal:
            client.decrypt_data_key(refused)
        assert (refusal.value.code, refusal.value.message) == ("invalid", "ciphertext failed integrity check")


def test_the_pbkdf2_work_of_a_message_is_bounded_up_front(
    deployment: Deployment, legacy: Legacy, client: KmsClient, vector_rows: list[dict[str, Any]]
) -> None:
    """A signed batch of old envelopes asking for the most PBKDF2 each: 600 of them ran 410 s, past the
    visibility timeout, and then a second time. Now the message is refused before any PBKDF2 runs."""
    from worker.legacy.root_key_names import MAX_ITERATIONS, MAX_PBKDF2_ITERATIONS_PER_MESSAGE, add_legacy_root_key
    from worker.storage.db import transaction

    with transaction(deployment.sessions) as db:  # at least one name the caller may try in pool alpha
        add_legacy_root_key(deployment.service.hsm, db, vector_rows[1]["rootKey"], None, "alpha")
    heavy = [json.dumps({"iter": MAX_ITERATIONS, "v": 1, "ct": f"c{i}"}) for i in range(600)]
    before = deployment.count("requests")
    with pytest.raises(KmsError) as refusal:
        client.decrypt_data_keys(heavy)
    assert refusal.value.code == "invalid"
    assert "PBKDF2 iterations; a message may need at most 16000000" in refusal.value.message
    assert deployment.count("requests") == before + 1  # refused once, recorded like any outcome

    # Within the budget the same envelopes are simply tried (and fail: they are no ciphertexts).
    few = heavy[: MAX_PBKDF2_ITERATIONS_PER_MESSAGE // (MAX_ITERATIONS * 16)]
    items = client.decrypt_data_keys([*few, vector_rows[1]["encryptedDataKey"]])["items"]
    assert all(item["error"] == "invalid" for item in items[:-1])
    assert items[-1] == {"plaintextKey": vector_rows[1]["expected"]["dataKey"]}


def test_old_encrypted_keys_need_the_root_key_permission(
    deployment: Deployment, legacy: Legacy, vector_rows: list[dict[str, Any]]
) -> None:
    beta_only = deployment.register("legacy-beta", ("decrypt_data_key",), [deployment.roots[("beta", "aes-256")]])
    with deployment.client(beta_only) as kms, pytest.raises(KmsError) as refusal:
        kms.decrypt_data_key(vector_rows[0]["encryptedDataKey"])
    assert refusal.value.code == "invalid"


def test_old_encrypted_keys_through_the_gateway(
    deployment: Deployment, legacy: Legacy, vector_rows: list[dict[str, Any]]
) -> None:
    from tests.gateway_fixtures import GATEWAY_OPS, start_gateway

    deployment.register("gateway-legacy", GATEWAY_OPS)
    gateway = start_gateway(deployment, "gateway-legacy", deployment.service.fleet_document())
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as http:
            for row in vector_rows[:3]:
                answer = http.post("/decryptDataKey", json={"encryptedKey": row["encryptedDataKey"]})
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"plaintextKey": row["expected"]["dataKey"]}
    finally:
        gateway.stop()


def test_root_key_name_commands(deployment: Deployment, legacy: Legacy) -> None:
    def add(name: str) -> subprocess.CompletedProcess[str]:
        command = [*kmsq_command(), "legacy-root-key", "add", "--json"]
        return subprocess.run(command, env=deployment.env(), input=name + "\n", capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip

    again = add("legacy-root")
    assert again.returncode == 0 and json.loads(again.stdout)["created"] is False, again.stderr
    deployment.secrets.append(b"operator-added-name")
    created = add("operator-added-name")
    assert created.returncode == 0 and json.loads(created.stdout)["created"] is True, created.stderr
    assert add("").returncode == EXIT_INVALID
    listed = subprocess.run([*kmsq_command(), "legacy-root-key", "list", "--json"], env=deployment.env(),
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert len(json.loads(listed.stdout)) == 3
    assert "legacy-root" not in listed.stdout and "operator-added-name" not in created.stdout + listed.stdout
