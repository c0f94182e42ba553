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
from worker.approvals import ApprovalError, LocalOperators, OperatorSets, load_operator_sets, verify_evidence
from worker.errors import Conflict, Forbidden
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
    with pytest.raises(Forbidden, match="2 approvals it needs"):
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
