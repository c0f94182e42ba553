"""Retention (worker.retention) in the unit tier: which request records pruning removes and which it keeps,
what a redelivery and get_result answer after it, and audit chains that stay verifiable across pruning
(checkpoints) and are not pruned where they do not verify."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update

from tasks.codec import KmsCodec
from tests.unit_fixtures import Unit, answer, refusal
from worker import audit_log, retention
from worker.record_stamps import StampVerifier
from worker.storage.db import transaction
from worker.storage.models import (
    AuditCheckpoint,
    AuditHead,
    AuditRecord,
    PrivateKey,
    RejectionCount,
    RequestRecord,
)

SKEW = timedelta(seconds=300)
GRACE = timedelta(seconds=600)
POLICY = retention.RetentionPolicy(SKEW, GRACE, timedelta(days=30))


def _records(unit: Unit) -> dict[str, RequestRecord]:
    with unit.service.sessions() as db:
        return {r.request_id: r for r in db.scalars(select(RequestRecord))}


def _prune(unit: Unit, at: datetime, chains: tuple[str, ...] = (), batch: int = 500) -> retention.PruneCounts:
    return retention.prune(unit.service.hsm, unit.service.sessions, POLICY, chains=chains, batch=batch, now=at)


def _prunable(unit: Unit, at: datetime) -> retention.PruneCounts:
    with unit.service.sessions() as db:
        return retention.prunable(db, POLICY, at)


def test_a_record_is_kept_until_its_expiry_plus_skew_plus_grace(unit: Unit, full: KmsCodec) -> None:
    delivery = unit.deliver(full, {"op": "generate_data_key_without_plaintext"})
    answer(full, delivery)
    (record,) = _records(unit).values()
    expires = audit_log.utc(record.expires_at)
    assert abs(expires - (datetime.now(UTC) + full.ttl)) < timedelta(seconds=5)  # the request's own expiry
    last_moment = expires + SKEW + GRACE
    assert _prune(unit, last_moment - timedelta(seconds=1)).requests == 0
    assert _prunable(unit, last_moment - timedelta(seconds=1)).requests == 0
    assert _prunable(unit, last_moment + timedelta(seconds=1)).requests == 1  # the dry run removes nothing
    assert _prune(unit, last_moment + timedelta(seconds=1)).requests == 1
    assert _records(unit) == {}


def test_within_retention_a_late_redelivery_and_get_result_still_get_the_reply(unit: Unit, full: KmsCodec) -> None:
    request, args = full.build_request({"op": "generate_data_key_without_plaintext"}, "alpha")
    first = answer(full, unit.handle_args(request, args))
    expiry = audit_log.utc(_records(unit)[str(request.request_id)].expires_at)
    unit.clock[0] = expiry + SKEW + timedelta(seconds=5)  # the request itself has expired
    _prune(unit, expiry + SKEW + GRACE - timedelta(seconds=1))  # still within retention
    assert answer(full, unit.handle_args(request, args)) == first  # the stored reply, not `expired`
    unit.clock[0] = datetime.now(UTC)  # get_result is a new request, signed now
    assert answer(full, unit.deliver(full, {"op": "get_result", "request_id": str(request.request_id)})) == first


def test_after_retention_a_redelivery_is_expired_and_changes_nothing(unit: Unit, full: KmsCodec) -> None:
    request_id = uuid.uuid4()
    params, _ = full.put_key_params("xpub-retention", "xprv-retention", "btc", "user", "tss", None, request_id)
    request, args = full.build_request(params, "alpha", request_id)
    answer(full, unit.handle_args(request, args))
    expiry = audit_log.utc(_records(unit)[str(request.request_id)].expires_at)
    assert _prune(unit, expiry + SKEW + GRACE + timedelta(seconds=1)).requests == 1
    assert _records(unit) == {}
    get_result = {"op": "get_result", "request_id": str(request.request_id)}
    assert refusal(full, unit.deliver(full, get_result))[0] == "not_found"
    unit.clock[0] = expiry + SKEW + timedelta(seconds=1)  # any delivery from now on is expired
    assert refusal(full, unit.handle_args(request, args))[0] == "expired"
    records = _records(unit)
    # The refusal is recorded (already past retention: the next run removes it), and nothing else happened.
    assert records[str(request.request_id)].error_code == "expired" and len(records) == 1
    assert unit.service.get_private_key("xpub-retention", "user").prv == "xprv-retention"
    with unit.service.sessions() as db:
        assert db.scalar(select(func.count()).select_from(PrivateKey)) == 1


def test_pruning_goes_in_batches_oldest_first(unit: Unit, full: KmsCodec) -> None:
    for _ in range(7):
        answer(full, unit.deliver(full, {"op": "generate_data_key_without_plaintext"}))
    later = KmsCodec(full.identity, unit.fleet, ttl_seconds=3000)  # expires 40 minutes after the others
    keep = unit.deliver(later, {"op": "generate_data_key_without_plaintext"})
    answer(full, keep)
    with unit.service.sessions() as db:
        expiries = sorted(audit_log.utc(e) for e in db.scalars(select(RequestRecord.expires_at)))
    at = expiries[-2] + SKEW + GRACE + timedelta(seconds=1)
    with transaction(unit.service.sessions) as db:
        assert retention.prune_requests(db, StampVerifier(unit.service.hsm), POLICY, at, 3) == (3, 3)
    assert _prune(unit, at, batch=3).requests == 4
    assert list(_records(unit)) == [keep.request_id]


def _pool_records(unit: Unit, pool: str) -> list[AuditRecord]:
    with unit.service.sessions() as db:
        return list(db.scalars(select(AuditRecord).where(AuditRecord.pool == pool).order_by(AuditRecord.seq)))


def _age(unit: Unit, pool: str, through: int, days: int) -> None:
    """Makes records 1..through of a chain look ``days`` old (pruning reads ``at``, not the hash, to decide)."""
    # Changing `at` changes the hash input, so the records are rewritten the way a real chain of that age
    # would have been written: same fields, older times, hashes and MACs made again by the HSM.
    with transaction(unit.service.sessions) as db:
        chain = list(db.scalars(select(AuditRecord).where(AuditRecord.pool == pool).order_by(AuditRecord.seq)))
        prev = audit_log.GENESIS
        for record in chain:
            if record.seq <= through:
                record.at = audit_log.utc(record.at) - timedelta(days=days)
            record.prev_hash = prev
            record.hash = audit_log.record_hash(record)
            record.mac = audit_log.record_mac(unit.service.hsm, record.hash)
            prev = record.hash
        db.execute(update(AuditHead).where(AuditHead.pool == pool).values(hash=prev))


def _chain_of(unit: Unit, full: KmsCodec, n: int) -> list[AuditRecord]:
    for _ in range(n):
        answer(full, unit.deliver(full, {"op": "generate_data_key_without_plaintext"}))
    return _pool_records(unit, "alpha")


def test_an_audit_chain_pruned_to_a_checkpoint_still_verifies(unit: Unit, full: KmsCodec) -> None:
    chain = _chain_of(unit, full, 10)
    old = chain[5].seq
    _age(unit, "alpha", old, days=31)
    counts = _prune(unit, datetime.now(UTC), chains=("alpha",), batch=2)
    assert counts.audit_records == {"alpha": old}
    assert [r.seq for r in _pool_records(unit, "alpha")] == [r.seq for r in chain[6:]]
    (report,) = unit.service.verify_audit("alpha")
    assert report.ok and report.pruned_through == old and report.first_seq == old + 1
    assert report.last_seq == chain[-1].seq
    # Verifying against a head noted before the pruning (now pruned) still passes.
    (noted,) = unit.service.verify_audit("alpha", expect=(chain[2].seq, chain[2].hash))
    assert noted.ok
    assert _prune(unit, datetime.now(UTC), chains=("alpha",)).audit_records == {}  # nothing more is old enough


def test_records_deleted_after_a_checkpoint_or_a_forged_checkpoint_are_found(unit: Unit, full: KmsCodec) -> None:
    chain = _chain_of(unit, full, 10)
    _age(unit, "alpha", chain[3].seq, days=31)
    _prune(unit, datetime.now(UTC), chains=("alpha",))
    with transaction(unit.service.sessions) as db:  # delete two more records, within the retention period
        db.execute(delete(AuditRecord).where(AuditRecord.pool == "alpha", AuditRecord.seq <= chain[5].seq))
    (report,) = unit.service.verify_audit("alpha")
    assert not report.ok and report.bad_seq == chain[4].seq and "missing" in report.problem
    with transaction(unit.service.sessions) as db:  # ... and move the checkpoint over them, without the HSM
        db.execute(
            update(AuditCheckpoint).where(AuditCheckpoint.pool == "alpha")
            .values(seq=chain[5].seq, hash=chain[5].hash, at=chain[5].at)
        )  # fmt: skip
    (report,) = unit.service.verify_audit("alpha")
    assert not report.ok and "checkpoint" in report.problem and "forged" in report.problem
    assert _prune(unit, datetime.now(UTC), chains=("alpha",)).refused_chains["alpha"].startswith("the checkpoint")


def test_a_chain_that_does_not_verify_is_not_pruned(unit: Unit, full: KmsCodec) -> None:
    chain = _chain_of(unit, full, 6)
    _age(unit, "alpha", chain[4].seq, days=31)
    with transaction(unit.service.sessions) as db:  # an old record altered: pruning must not erase the evidence
        db.execute(
            update(AuditRecord).where(AuditRecord.pool == "alpha", AuditRecord.seq == chain[2].seq)
            .values(outcome="forbidden")
        )  # fmt: skip
    counts = _prune(unit, datetime.now(UTC), chains=("alpha",))
    assert counts.audit_records == {} and "altered" in counts.refused_chains["alpha"]
    assert len(_pool_records(unit, "alpha")) == len(chain)
    (report,) = unit.service.verify_audit("alpha")
    assert not report.ok and report.bad_seq == chain[2].seq


def test_everything_pruned_leaves_a_verifiable_empty_chain(unit: Unit, full: KmsCodec) -> None:
    chain = _chain_of(unit, full, 3)
    _age(unit, "alpha", chain[-1].seq, days=31)
    assert _prune(unit, datetime.now(UTC), chains=("alpha",)).audit_records == {"alpha": len(chain)}
    (report,) = unit.service.verify_audit("alpha")
    assert report.ok and report.records == 0 and report.pruned_through == chain[-1].seq
    answer(full, unit.deliver(full, {"op": "generate_data_key_without_plaintext"}))  # the chain goes on
    (report,) = unit.service.verify_audit("alpha")
    assert report.ok and report.records == 1 and report.first_seq == chain[-1].seq + 1


def test_rejection_counts_follow_the_audit_retention(unit: Unit, full: KmsCodec) -> None:
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    unit.handle_args(request, [args[0], args[1], args[2], "A" * 86])  # a bad signature: counted
    unit.ctx.rejections.flush()
    assert unit.count(RejectionCount) >= 1
    dry = _prunable(unit, datetime.now(UTC) + timedelta(days=31))
    assert dry.rejection_counts == unit.count(RejectionCount)
    assert _prune(unit, datetime.now(UTC) + timedelta(days=29)).rejection_counts == 0
    counts = _prune(unit, datetime.now(UTC) + timedelta(days=31))
    assert counts.rejection_counts >= 1 and unit.count(RejectionCount) == 0


def test_no_audit_retention_keeps_audit_records_forever(unit: Unit, full: KmsCodec) -> None:
    chain = _chain_of(unit, full, 3)
    _age(unit, "alpha", chain[-1].seq, days=3650)
    forever = retention.RetentionPolicy(SKEW, GRACE, None)
    counts = retention.prune(unit.service.hsm, unit.service.sessions, forever, chains=("alpha",))
    assert counts.audit_records == {} and len(_pool_records(unit, "alpha")) == len(chain)


def test_record_expiry_is_bounded_by_the_longest_valid_request() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert retention.record_expiry(now + timedelta(seconds=600), now, SKEW) == now + timedelta(seconds=600)
    far = retention.record_expiry(datetime(9999, 1, 1, tzinfo=UTC), now, SKEW)
    assert far == now + timedelta(seconds=3600) + SKEW


def test_a_rehashed_change_in_the_pruned_prefix_is_caught_by_the_last_mac(unit: Unit, full: KmsCodec) -> None:
    chain = _chain_of(unit, full, 8)
    _age(unit, "alpha", chain[5].seq, days=31)
    with transaction(unit.service.sessions) as db:  # change record 3 and rehash the chain after it, without the HSM
        records = list(db.scalars(select(AuditRecord).where(AuditRecord.pool == "alpha").order_by(AuditRecord.seq)))
        prev = audit_log.GENESIS
        for record in records:
            if record.seq == chain[2].seq:
                record.outcome = "forbidden"
            record.prev_hash = prev
            record.hash = audit_log.record_hash(record)
            prev = record.hash
        db.execute(update(AuditHead).where(AuditHead.pool == "alpha").values(hash=prev))
    counts = _prune(unit, datetime.now(UTC), chains=("alpha",))
    assert counts.audit_records == {} and "MAC" in counts.refused_chains["alpha"]
    assert len(_pool_records(unit, "alpha")) == len(chain)
