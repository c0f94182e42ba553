"""worker.proposals with 2 of 3 operators: a caller is added only once two distinct operators approved the exact
change before it expired; approvals that do not count are refused; every step is in the audit chain."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from schemas.quorum import OperatorIdentity, OperatorSet, approve
from tasks.identity import CallerIdentity
from tests.fake_hsm import FakeHsm
from tests.unit_fixtures import UnitTemplate, copy_of_schema
from worker import audit_log, proposals
from worker.actions import ACTIONS
from worker.approvals import (
    ApprovalError,
    LocalOperators,
    OperatorSets,
    QuorumRequired,
    load_operator_sets,
    verify_evidence,
)
from worker.errors import Conflict, Forbidden, InvalidRequest
from worker.policy import AUTHORIZER
from worker.runtime import KeyService
from worker.storage.db import session_factory, transaction
from worker.storage.models import AuditRecord, Caller, Proposal

ALICE, BOB, CAROL = (OperatorIdentity.generate(n) for n in ("alice", "bob", "carol"))
TRIO = OperatorSet((ALICE.public, BOB.public, CAROL.public), 2)


@pytest.fixture
def unit(tmp_path: Path, unit_template: UnitTemplate) -> Iterator[Trio]:
    """An empty deployment of its own (not the test run's operator's): the three operators adopt it."""
    engine = copy_of_schema(unit_template, tmp_path / "trio.db")
    service = KeyService(FakeHsm(), session_factory(engine), default_pool="alpha")
    yield Trio(service)
    engine.dispose()


@dataclass
class Trio:
    service: KeyService


def _adopted(unit: Trio) -> OperatorSets:
    with transaction(unit.service.sessions) as db:
        LocalOperators([ALICE, BOB, CAROL], TRIO).sets(db)
    with unit.service.sessions() as db:
        return load_operator_sets(db, TRIO.digest)


def _caller_add(name: str) -> dict[str, object]:
    identity = CallerIdentity.generate(name).public_document()
    return {"name": name, "signing_key": identity["signing_key"], "reply_key": identity["reply_key"],
            "allowed_ops": ["generate_data_key"], "root_keys": None, "plaintext": False}  # fmt: skip


def _approve(unit: Trio, sets: OperatorSets, proposal: proposals.ProposalInfo, who: OperatorIdentity) -> None:
    proposals.add_approval(unit.service.hsm, unit.service.sessions, sets, proposal.id, approve(who, proposal.digest))


def test_two_of_three_add_a_caller_one_cannot(unit: Trio) -> None:
    sets = _adopted(unit)
    hsm, sessions = unit.service.hsm, unit.service.sessions
    proposal = proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("wallet"), "alice")
    assert proposal.state == "pending" and proposal.quorum == 2 and not proposal.approved_by
    assert [r["row"] for r in proposal.rows] == ["caller:wallet"]
    with sessions() as db:
        assert db.get(Caller, "wallet") is None  # the dry run left nothing
    _approve(unit, sets, proposal, ALICE)
    with pytest.raises(Conflict, match=r"approved proposal .* already"):
        _approve(unit, sets, proposal, ALICE)  # the same operator twice counts once
    with pytest.raises(Forbidden, match=r"has the approvals of alice; it needs 2 of 3"):
        proposals.apply(hsm, sessions, sets, proposal.id, "alice")
    with sessions() as db:
        assert db.get(Caller, "wallet") is None
    _approve(unit, sets, proposal, BOB)
    applied = proposals.apply(hsm, sessions, sets, proposal.id, "bob")
    assert applied.state == "applied" and set(applied.approved_by) == {"alice", "bob"}
    with sessions() as db:
        row = db.get(Caller, "wallet")
        assert row is not None and set(verify_evidence(row, row.approval, sets).approved_by) == {"alice", "bob"}
    with pytest.raises(Conflict, match="applied"):
        proposals.apply(hsm, sessions, sets, proposal.id, "bob")


def test_approvals_that_do_not_count_are_refused(unit: Trio) -> None:
    sets = _adopted(unit)
    hsm, sessions = unit.service.hsm, unit.service.sessions
    proposal = proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("w2"), "carol")
    other = proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("w3"), "carol")
    with pytest.raises(Forbidden, match="for another change"):
        proposals.add_approval(hsm, sessions, sets, proposal.id, approve(ALICE, other.digest))
    with pytest.raises(Forbidden, match="not in the operator set"):
        proposals.add_approval(hsm, sessions, sets, proposal.id, approve(OperatorIdentity.generate("mallory"),
                                                                          proposal.digest))  # fmt: skip
    with pytest.raises(Forbidden, match="not an operator"):
        proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("w4"), "mallory")
    short = proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("w5"), "carol", ttl_hours=1 / 3600)
    time.sleep(1.2)
    with pytest.raises(Conflict, match="expired"):
        _approve(unit, sets, short, ALICE)
    assert proposals.describe(sessions, short.id, sets).state == "expired"


def test_a_proposal_the_database_overtook_is_not_applied(unit: Trio) -> None:
    sets = _adopted(unit)
    hsm, sessions = unit.service.hsm, unit.service.sessions
    arguments = _caller_add("raced")
    proposal = proposals.propose(hsm, sessions, sets, "caller.add", arguments, "alice")
    for who in (ALICE, BOB):
        _approve(unit, sets, proposal, who)
    changed = dict(arguments, allowed_ops=["generate_data_key", "put_key"])
    with transaction(sessions) as db:  # the same caller, otherwise, added meanwhile by two operators at once
        db.info[AUTHORIZER] = LocalOperators([ALICE, BOB], TRIO)
        ACTIONS["caller.add"](hsm, db, changed)
    with pytest.raises(Conflict, match="already exists"):
        proposals.apply(hsm, sessions, sets, proposal.id, "alice")
    assert proposals.describe(sessions, proposal.id, sets).state == "pending"
    # Approved rows that no longer match what the proposal lists are refused too.
    disable = proposals.propose(hsm, sessions, sets, "caller.disable", {"name": "raced"}, "alice")
    for who in (ALICE, CAROL):
        _approve(unit, sets, disable, who)
    with transaction(sessions) as db:
        db.info[AUTHORIZER] = LocalOperators([BOB], TRIO)
        ACTIONS["caller.disable"](hsm, db, {"name": "raced"})  # disabled by one meanwhile
    with pytest.raises(ApprovalError, match="changed since the proposal"):
        proposals.apply(hsm, sessions, sets, disable.id, "alice")


def test_every_step_is_in_the_audit_chain(unit: Trio) -> None:
    sets = _adopted(unit)
    hsm, sessions = unit.service.hsm, unit.service.sessions
    proposal = proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("audited"), "bob")
    for who in (BOB, CAROL):
        _approve(unit, sets, proposal, who)
    proposals.apply(hsm, sessions, sets, proposal.id, "carol")
    with sessions() as db:
        records = list(db.scalars(select(AuditRecord).where(AuditRecord.pool == audit_log.GLOBAL_CHAIN)
                                  .order_by(AuditRecord.seq)))  # fmt: skip
        assert audit_log.verify(hsm, db, audit_log.GLOBAL_CHAIN).ok
        stored = db.get(Proposal, proposal.id)
        assert stored is not None and json.loads(stored.document)["rows"][0]["row"] == "caller:audited"
    mine = [r for r in records if proposal.id in r.detail]
    assert [r.action for r in mine] == ["proposal", "approval", "approval", "proposal applied"]
    assert BOB.public.key_id in mine[0].detail and CAROL.public.key_id in mine[2].detail
    assert "bob, carol" in mine[3].detail
    assert any(r.action == "caller add" and "audited" in r.detail for r in records)


DAVE, ERIN = (OperatorIdentity.generate(n) for n in ("dave", "erin"))
NEW_SET = OperatorSet((ALICE.public, DAVE.public, ERIN.public), 2)  # bob and carol leave, dave and erin join


def _with_wallet(unit: Trio, sets: OperatorSets) -> None:
    hsm, sessions = unit.service.hsm, unit.service.sessions
    proposal = proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("wallet"), "alice")
    for who in (ALICE, BOB):
        _approve(unit, sets, proposal, who)
    proposals.apply(hsm, sessions, sets, proposal.id, "bob")


def _changed(unit: Trio, sets: OperatorSets) -> OperatorSets:
    """Applies the change to NEW_SET (alice and bob of the old set, alice and dave of the new); returns the sets."""
    hsm, sessions = unit.service.hsm, unit.service.sessions
    change = proposals.propose_operator_change(hsm, sessions, sets, NEW_SET, "bob")
    for who in (ALICE, BOB):
        _approve(unit, sets, change, who)
    with pytest.raises(Forbidden, match=r"of the new set, 2 of 3 \(alice, dave, erin\)"):
        proposals.apply(hsm, sessions, sets, change.id, "alice")  # two of the old set, but one of the new
    assert not proposals.describe(sessions, change.id, sets).met
    _approve(unit, sets, change, DAVE)
    assert proposals.describe(sessions, change.id, sets).met
    proposals.apply(hsm, sessions, sets, change.id, "dave")
    with sessions() as db:
        return load_operator_sets(db, TRIO.digest)


def test_an_operator_set_changes_by_a_quorum_of_the_old_and_of_the_new(unit: Trio) -> None:
    sets = _adopted(unit)
    _with_wallet(unit, sets)
    hsm, sessions = unit.service.hsm, unit.service.sessions
    with pytest.raises(Forbidden, match="the approval does not count: not in the operator set"):
        change = proposals.propose_operator_change(hsm, sessions, sets, NEW_SET, "alice")
        _approve(unit, sets, change, OperatorIdentity.generate("mallory"))
    pending = proposals.propose(hsm, sessions, sets, "caller.add", _caller_add("late"), "carol")
    _approve(unit, sets, pending, BOB)  # a quorum of the old set, not applied before the change
    from worker.policy import TrustedRows

    reader = TrustedRows(hsm, cache_seconds=600, operators=TRIO.digest)  # as a worker reads: the chain cached
    with sessions() as db:
        assert reader.caller(db, "wallet") is not None
    after = _changed(unit, sets)
    assert after.current == NEW_SET and after.length == 2 and set(after.made_by_operators) == {"alice", "bob", "dave"}
    with sessions() as db:
        for name in ("wallet", "admin"):  # every row, the adopted ones too, is approved under the new set
            row = db.get(Caller, name)
            if row is not None:
                assert verify_evidence(row, row.approval, after).approved_by == after.made_by_operators
    with pytest.raises(Forbidden, match="operator set changed"):
        proposals.apply(hsm, sessions, after, pending.id, "alice")
    with pytest.raises(Forbidden, match="not an operator"):
        proposals.propose(hsm, sessions, after, "caller.add", _caller_add("x"), "carol")
    # The new set governs: alice and erin add a caller; bob and carol together no longer can.
    proposal = proposals.propose(hsm, sessions, after, "caller.add", _caller_add("next"), "erin")
    with pytest.raises(Forbidden, match="not in the operator set"):
        _approve(unit, after, proposal, BOB)
    for who in (ERIN, ALICE):
        _approve(unit, after, proposal, who)
    proposals.apply(hsm, sessions, after, proposal.id, "alice")
    with sessions() as db:
        assert reader.caller(db, "next") is not None  # the worker read the chain again: the new set approved it
        row = db.get(Caller, "next")
        assert row is not None and set(verify_evidence(row, row.approval, after).approved_by) == {"erin", "alice"}


def test_what_the_old_set_signs_after_a_change_counts_for_nothing(unit: Trio) -> None:
    sets = _adopted(unit)
    _with_wallet(unit, sets)
    with unit.service.sessions() as db:
        row = db.get(Caller, "wallet")
        assert row is not None
        old_evidence = row.approval
    after = _changed(unit, sets)
    with transaction(unit.service.sessions) as db:
        row = db.get(Caller, "wallet")
        assert row is not None
        with pytest.raises(ApprovalError, match="earlier operator set"):
            verify_evidence(row, old_evidence, after)  # put back: approved by bob and alice under the old set
        # Bob and carol (a quorum of the old set) approve a widening under the old set's digest.
        row.allowed_ops = "generate_data_key,put_key"
        forged = LocalOperators([BOB, CAROL], TRIO)
        forged._sets[str(db.get_bind().engine.url)] = sets  # they sign as if the change had not happened
        from worker.policy_anchor import deployment_id

        forged._sets[deployment_id(db) or ""] = sets
        evidence = forged.evidence_for(db, row, None)
        with pytest.raises(ApprovalError, match="earlier operator set"):
            verify_evidence(row, evidence, after)
        # On the evidence the change gave the row, carol (of the old set only) signs a step disabling it.
        row.allowed_ops, row.state = "generate_data_key", "disabled"
        from worker.approvals import content_digest, row_content, sign_step, verify_chain

        current = json.loads(db.get(Caller, "wallet").approval or "null")  # type: ignore[union-attr]
        before = verify_chain("caller", "caller:wallet", json.dumps(current), after)
        kind, fields, _ = row_content(row)
        step = sign_step(CAROL, "restrict", "caller:wallet", before.seq + 1, content_digest(kind, before.fields),
                         fields, TRIO.digest)  # fmt: skip
        with pytest.raises(ApprovalError, match="a step signed under an earlier operator set"):
            verify_evidence(row, json.dumps(dict(current, steps=[step])), after)
        alice = sign_step(ALICE, "restrict", "caller:wallet", before.seq + 1, content_digest(kind, before.fields),
                          fields, NEW_SET.digest)  # fmt: skip
        assert verify_evidence(row, json.dumps(dict(current, steps=[alice])), after).approved_by[-1] == "alice"
        db.rollback()


def test_an_operator_set_without_the_new_quorum_breaks_the_chain(unit: Trio) -> None:
    sets = _adopted(unit)
    _with_wallet(unit, sets)
    _changed(unit, sets)
    with transaction(unit.service.sessions) as db:
        from worker.storage.models import OperatorSetRecord

        record = db.get(OperatorSetRecord, 1)
        assert record is not None
        record.approvals = json.dumps([a for a in json.loads(record.approvals) if a["operator"] != "dave"])
    with unit.service.sessions() as db, pytest.raises(ApprovalError, match="1 of the 2 operators of the new set"):
        load_operator_sets(db, TRIO.digest)


def test_an_operation_needs_a_quorum_and_is_carried_out_once(unit: Trio) -> None:
    sets = _adopted(unit)
    _with_wallet(unit, sets)  # (the token's policy key is made with the first row)
    hsm, sessions = unit.service.hsm, unit.service.sessions
    trust = {"token": "hsm-b", "fingerprint": "ab" * 32}
    alone = LocalOperators([ALICE], TRIO)
    with pytest.raises(QuorumRequired, match=r"hsm.trust needs 2 of 3 .*: propose it \(kmsq propose hsm trust"):
        proposals.approved_operation(sets, sessions, "hsm.trust", trust, None, alone)
    proposal = proposals.propose_operation(hsm, sessions, sets, "hsm.trust", trust, "alice")
    assert proposal.rows == () and proposal.arguments == trust
    _approve(unit, sets, proposal, ALICE)
    with pytest.raises(Forbidden, match="has the approvals of alice; it needs 2 of 3"):
        proposals.approved_operation(sets, sessions, "hsm.trust", trust, proposal.id, alone)
    _approve(unit, sets, proposal, CAROL)
    with pytest.raises(InvalidRequest, match="carry it out with kmsq hsm trust"):
        proposals.apply(hsm, sessions, sets, proposal.id, "carol")
    other = dict(trust, fingerprint="cd" * 32)
    with pytest.raises(Forbidden, match="approved another operation"):
        proposals.approved_operation(sets, sessions, "hsm.trust", other, proposal.id, None)
    with pytest.raises(Forbidden, match="approved another operation"):
        proposals.approved_operation(sets, sessions, "backup.restore", trust, proposal.id, None)
    grant = proposals.approved_operation(sets, sessions, "hsm.trust", trust, proposal.id, None)
    assert grant == proposals.Grant(proposal.id)
    proposals.close_operation(hsm, sessions, grant, "carol", "token hsm-b trusted")
    with pytest.raises(Conflict, match="is applied"):  # carried out once
        proposals.approved_operation(sets, sessions, "hsm.trust", trust, proposal.id, None)
    # A command holding a quorum's keys approves its own operation at once, recorded once it is done.
    pair = LocalOperators([BOB, CAROL], TRIO)
    held = proposals.approved_operation(sets, sessions, "hsm.trust", other, None, pair)
    with sessions() as db:
        assert db.get(Proposal, held.proposal_id) is None  # nothing written before the operation is done
    proposals.close_operation(hsm, sessions, held, "bob", "token hsm-b trusted")
    recorded = proposals.describe(sessions, held.proposal_id, sets)
    assert set(recorded.approved_by) == {"bob", "carol"} and recorded.state == "applied"
    with sessions() as db:
        details = [r.detail for r in db.scalars(select(AuditRecord).where(AuditRecord.action == "proposal applied"))]
        assert audit_log.verify(hsm, db, audit_log.GLOBAL_CHAIN).ok
    assert sum(proposal.id in d or held.proposal_id in d for d in details) == 2


def test_a_quorum_reapproves_the_rows_of_a_restored_database(unit: Trio) -> None:
    """A database put back to an older state holds rows older than what a worker honoured (worker.high_water):
    refused, until a quorum approves every row as it is; then served, with a newer approval time."""
    from worker.high_water import HighWater
    from worker.policy_anchor import deployment_id

    sets = _adopted(unit)
    _with_wallet(unit, sets)
    hsm, sessions = unit.service.hsm, unit.service.sessions
    marks = HighWater()
    with sessions() as db:
        row = db.get(Caller, "wallet")
        assert row is not None
        older = verify_evidence(row, row.approval, sets)
        scope, kept = deployment_id(db), row.approval
    with transaction(sessions) as db:
        db.info[AUTHORIZER] = LocalOperators([CAROL], TRIO)
        ACTIONS["caller.disable"](hsm, db, {"name": "wallet"})
    with sessions() as db:
        row = db.get(Caller, "wallet")
        assert row is not None
        newer = verify_evidence(row, row.approval, sets)
    assert marks.admits(scope, "caller:wallet", newer.seq, newer.approved_at)  # a worker honoured the disabled row
    with transaction(sessions) as db:  # the restore: the enabled row, with its evidence of then
        row = db.get(Caller, "wallet")
        assert row is not None
        row.state, row.approval = "enabled", kept
    assert not marks.admits(scope, "caller:wallet", older.seq, older.approved_at)
    with pytest.raises(Forbidden, match="not an operator"):
        proposals.propose_reapproval(hsm, sessions, sets, "mallory")
    proposal = proposals.propose_reapproval(hsm, sessions, sets, "alice")
    assert "caller:wallet" in [r["row"] for r in proposal.rows]
    for who in (ALICE, BOB):
        _approve(unit, sets, proposal, who)
    assert proposals.apply(hsm, sessions, sets, proposal.id, "bob").state == "applied"
    with sessions() as db:
        row = db.get(Caller, "wallet")
        assert row is not None and row.state == "enabled"
        again = verify_evidence(row, row.approval, sets)
    assert set(again.approved_by) == {"alice", "bob"} and again.seq == older.seq + 1
    assert marks.admits(scope, "caller:wallet", again.seq, again.approved_at)  # newer in time: served again
