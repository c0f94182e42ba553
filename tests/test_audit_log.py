"""The audit chain (worker.audit_log): what is recorded, that verify proves an untouched chain intact, and
that it finds the first bad record when a row is altered, deleted, reordered or inserted; concurrent
appends on Postgres never fork a chain."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from tasks.codec import KmsCodec
from tests.unit_fixtures import Unit, answer, refusal
from worker import audit_log
from worker.hsm import Hsm
from worker.runtime import KeyService
from worker.storage.db import transaction
from worker.storage.models import AuditHead, AuditRecord


def _chain(sessions: sessionmaker[Session], pool: str) -> list[AuditRecord]:
    with sessions() as db:
        return list(db.scalars(select(AuditRecord).where(AuditRecord.pool == pool).order_by(AuditRecord.seq)))


def _verify(unit: Unit, pool: str, **kwargs: object) -> audit_log.ChainReport:
    (report,) = unit.service.verify_audit(pool, **kwargs)  # type: ignore[arg-type]
    return report


def test_requests_and_operator_actions_are_recorded_without_secrets(unit: Unit, full: KmsCodec) -> None:
    key = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": unit.roots["aes"]}))
    assert refusal(full, unit.deliver(full, {"op": "get_key", "pub": "absent", "source": "user"}))[0] == "not_found"
    limited = unit.register("limited", ("generate_data_key_without_plaintext",), plaintext=False)
    assert refusal(limited, unit.deliver(limited, {"op": "generate_data_key"}))[0] == "forbidden"
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    unit.handle_args(request, [args[0], args[1], args[2], "A" * 86])  # a bad signature: counted, then chained
    unit.ctx.rejections.flush()
    unit.service.rotate_root_key(unit.roots["aes"])
    alpha = _chain(unit.service.sessions, "alpha")
    seen = [(r.actor, r.action, r.outcome) for r in alpha]
    assert ("full", "generate_data_key", "ok") in seen and ("full", "get_key", "not_found") in seen
    assert ("limited", "generate_data_key", "forbidden") in seen
    assert ("full", "generate_data_key", "rejected:unauthenticated") in seen
    assert seen[-1][1:] == ("root-key rotate", "ok") and seen[-1][0].startswith("operator:")
    ok = next(r for r in alpha if r.action == "generate_data_key" and r.outcome == "ok")
    assert (ok.root_key_id, ok.root_key_version, ok.request_id) == (unit.roots["aes"], 1, ok.request_id)
    assert [r.seq for r in alpha] == list(range(1, len(alpha) + 1))
    callers = [(r.action, r.detail.split(":")[0]) for r in _chain(unit.service.sessions, audit_log.GLOBAL_CHAIN)]
    assert ("caller add", "full") in callers and ("caller add", "limited") in callers
    text = " ".join(f"{r.detail} {r.request_id} {r.root_key_id}" for r in alpha)
    assert key["plaintextKey"] not in text and key["encryptedKey"] not in text
    assert all(_verify(unit, pool).ok for pool in ("alpha", "beta", audit_log.GLOBAL_CHAIN))


@pytest.fixture
def recorded(unit: Unit, full: KmsCodec) -> Unit:
    """Alpha's chain with 8 records (and the pool's operator records before them)."""
    for _ in range(8):
        answer(full, unit.deliver(full, {"op": "generate_data_key_without_plaintext"}))
    report = _verify(unit, "alpha")
    assert report.ok and report.records >= 8
    return unit


def _tamper(unit: Unit, *statements: object) -> None:
    with transaction(unit.service.sessions) as db:
        for statement in statements:
            db.execute(statement)  # type: ignore[call-overload]


def _seq(n: int) -> ColumnElement[bool]:
    return (AuditRecord.pool == "alpha") & (AuditRecord.seq == n)


def test_an_altered_record_is_found(recorded: Unit) -> None:
    _tamper(recorded, update(AuditRecord).where(_seq(5)).values(outcome="forbidden"))
    report = _verify(recorded, "alpha")
    assert (report.ok, report.bad_seq, report.problem) == (
        False, 5, "record 5 was altered (its fields do not match its hash)")  # fmt: skip


def test_an_altered_record_with_its_hash_recomputed_fails_its_mac(recorded: Unit) -> None:
    with transaction(recorded.service.sessions) as db:
        row = db.get(AuditRecord, ("alpha", 5))
        assert row is not None
        row.actor = "someone-else"
        row.hash = audit_log.record_hash(row)
    report = _verify(recorded, "alpha")
    assert (report.bad_seq, report.problem) == (5, "record 5 was altered or forged (its MAC does not verify)")


def test_a_deleted_record_is_found(recorded: Unit) -> None:
    _tamper(recorded, delete(AuditRecord).where(_seq(4)))
    report = _verify(recorded, "alpha")
    assert (report.bad_seq, report.problem) == (4, "record 4 is missing, the next is 5 (deleted?)")


def test_a_deleted_record_with_the_rest_renumbered_is_found(recorded: Unit) -> None:
    with transaction(recorded.service.sessions) as db:
        db.execute(delete(AuditRecord).where(_seq(4)))
        last = int(db.scalar(select(func.max(AuditRecord.seq)).where(AuditRecord.pool == "alpha")) or 0)
        for n in range(5, last + 1):
            db.execute(update(AuditRecord).where(_seq(n)).values(seq=n - 1))
        db.execute(update(AuditHead).where(AuditHead.pool == "alpha").values(seq=last - 1))
    report = _verify(recorded, "alpha")
    assert (report.bad_seq, report.problem) == (
        4, "record 4 does not follow record 3 (inserted, deleted or reordered)")  # fmt: skip


def test_reordered_records_are_found(recorded: Unit) -> None:
    _tamper(
        recorded,
        update(AuditRecord).where(_seq(3)).values(seq=-1),
        update(AuditRecord).where(_seq(6)).values(seq=3),
        update(AuditRecord).where(_seq(-1)).values(seq=6),
    )
    report = _verify(recorded, "alpha")
    assert (report.bad_seq, report.problem) == (
        3, "record 3 does not follow record 2 (inserted, deleted or reordered)")  # fmt: skip


def test_an_inserted_record_is_found(recorded: Unit) -> None:
    """A record slipped in after record 3, chained correctly (hashes recomputed for everything after it), with
    the MAC copied from its neighbour: its MAC cannot be made without the HSM."""
    with transaction(recorded.service.sessions) as db:
        chain = list(db.scalars(select(AuditRecord).where(AuditRecord.pool == "alpha").order_by(AuditRecord.seq)))
        for row in reversed(chain[3:]):
            db.execute(update(AuditRecord).where(_seq(row.seq)).values(seq=row.seq + 1))
        db.expunge_all()  # the loaded rows keep their old numbers
        forged = AuditRecord(pool="alpha", seq=4, at=chain[3].at, actor="full", action="get_key", outcome="ok",
                             detail="", prev_hash=chain[2].hash, mac=chain[2].mac)  # fmt: skip
        forged.hash = audit_log.record_hash(forged)
        db.add(forged)
    report = _verify(recorded, "alpha")
    assert (report.bad_seq, report.problem) == (4, "record 4 was altered or forged (its MAC does not verify)")


def test_a_truncated_tail_is_found_against_a_noted_head(recorded: Unit) -> None:
    noted = _chain(recorded.service.sessions, "alpha")[-1]
    with transaction(recorded.service.sessions) as db:  # the newest record gone, and the head rolled back
        db.execute(delete(AuditRecord).where(_seq(noted.seq)))
        before = db.get(AuditRecord, ("alpha", noted.seq - 1))
        assert before is not None
        db.execute(update(AuditHead).where(AuditHead.pool == "alpha").values(seq=before.seq, hash=before.hash))
    assert _verify(recorded, "alpha").ok  # the chain alone cannot tell
    report = _verify(recorded, "alpha", expect=(noted.seq, noted.hash))
    assert (report.ok, report.bad_seq) == (False, noted.seq)
    assert report.problem == f"record {noted.seq}, noted earlier, is missing (truncated?)"


def test_verify_from_a_time_on_trusts_its_first_record_as_far_as_its_mac(recorded: Unit) -> None:
    chain = _chain(recorded.service.sessions, "alpha")
    report = _verify(recorded, "alpha", since=chain[5].at)
    assert report.ok and report.first_seq is not None and report.first_seq <= chain[5].seq
    _tamper(recorded, update(AuditRecord).where(_seq(chain[-1].seq)).values(detail="changed"))
    assert _verify(recorded, "alpha", since=chain[5].at).bad_seq == chain[-1].seq


def test_concurrent_appends_never_fork_a_chain(hsm: Hsm, pg_engine: object) -> None:
    """Postgres: 8 threads, 25 appends each, in their own transactions: one chain of 200, intact."""
    from worker.storage.db import session_factory

    sessions = session_factory(pg_engine)  # type: ignore[arg-type]
    hsm.ensure_policy_key()
    pool = f"race-{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(25):
                with transaction(sessions) as db:
                    audit_log.append(hsm, db, pool, actor=f"t{n}", action="test", outcome="ok", detail=str(i))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    chain = _chain(sessions, pool)
    assert [r.seq for r in chain] == list(range(1, 201))
    with sessions() as db:
        assert audit_log.verify(hsm, db, pool).ok


def test_the_service_facade_verifies_every_chain(service: KeyService) -> None:
    service.create_root_key("aes-256", "facade")
    reports = {r.pool: r for r in service.verify_audit()}
    assert reports["facade"].ok and reports["facade"].records >= 1
