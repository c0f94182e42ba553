"""``kmsq prune`` on the embedded default (SoftHSM2, SQLite): what it shows, that a dry run removes nothing,
that the audit chain verifies after it, and that a chain altered where it would be pruned is left alone."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import run_kmsq

pytestmark = pytest.mark.hsm  # kmsq init and prune on an embedded SoftHSM2 token, in processes of their own


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("prune")
    result = run_kmsq(home, "init")
    assert result.returncode == 0, result.stderr
    assert run_kmsq(home, "root-key", "create").returncode == 0
    return home


def _audit_rows(home: Path) -> int:
    with sqlite3.connect(home / "kmsq.db") as db:
        return int(db.execute("select count(*) from audit_log where pool = 'default'").fetchone()[0])


def test_prune_dry_run_then_prune_keeps_the_chain_verifiable(home: Path) -> None:
    before = _audit_rows(home)
    assert before >= 2
    time.sleep(1.1)
    short = {"KMSQ_AUDIT_RETENTION_SECONDS": "1"}
    dry = run_kmsq(home, "prune", "--dry-run", "--json", env=short)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True and report["audit_records"]["default"] == before
    assert _audit_rows(home) == before  # nothing removed
    done = run_kmsq(home, "prune", env=short)
    assert done.returncode == 0, done.stderr
    assert "audit records, chain default" in done.stdout and "removed" in done.stdout
    assert _audit_rows(home) == 0
    verify = run_kmsq(home, "audit", "verify", "--pool", "default")
    assert verify.returncode == 0 and f"(1-{before} pruned)" in verify.stdout and "intact" in verify.stdout
    again = json.loads(run_kmsq(home, "prune", "--json", env=short).stdout)
    assert again["total"] == 0 and again["retention"]["audit_retention_seconds"] == 1


def test_prune_leaves_a_chain_that_does_not_verify(home: Path) -> None:
    assert run_kmsq(home, "root-key", "create").returncode == 0
    with sqlite3.connect(home / "kmsq.db") as db:
        seq = db.execute("select max(seq) from audit_log where pool = 'default'").fetchone()[0]
        db.execute("update audit_log set outcome = 'forbidden' where pool = 'default' and seq = ?", (seq,))
    time.sleep(1.1)
    result = run_kmsq(home, "prune", "--json", env={"KMSQ_AUDIT_RETENTION_SECONDS": "1"})
    assert result.returncode == 7
    assert "altered" in json.loads(result.stdout)["refused_chains"]["default"]
    assert _audit_rows(home) == 1  # the altered record is still there for audit verify to show
    assert run_kmsq(home, "audit", "verify", "--pool", "default").returncode == 7


def test_prune_keeps_a_request_record_whose_signed_time_was_changed(home: Path) -> None:
    """Issue 22, item 6: a database writer lowers a record's times and puts a bad MAC under the pool's
    real fleet key id; `kmsq prune`, even with zero skew and grace, keeps the record, says so and exits 7."""
    fleet = json.loads((home / "fleet.json").read_text())
    key_id = fleet["pools"][fleet["default_pool"]]["signing_key_id"]
    with sqlite3.connect(home / "kmsq.db") as db:
        db.execute(
            "insert into requests (caller, request_id, request_hash, op, status, reply, created_at, expires_at,"
            " keep_until, keep_key_id, keep_mac) values ('c', ?, ?, 'generate_data_key', 'ok', '{}',"
            " '2000-01-01 00:00:00', '2000-01-01 00:00:00', '2000-01-01 00:00:00', ?, ?)",
            (str(uuid.uuid4()), "0" * 64, key_id, "A" * 43),
        )
    shorter = {"KMSQ_CLOCK_SKEW_SECONDS": "0", "KMSQ_REPLY_GRACE_SECONDS": "0"}
    result = run_kmsq(home, "prune", "--json", env=shorter)
    assert result.returncode == 7, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 0 and report["requests_refused"] == 1
    text = run_kmsq(home, "prune", env=shorter)
    assert text.returncode == 7 and "1 request records not pruned" in text.stdout and "does not verify" in text.stdout
    with sqlite3.connect(home / "kmsq.db") as db:
        assert db.execute("select count(*) from requests where caller = 'c'").fetchone()[0] == 1
