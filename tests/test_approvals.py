"""worker.approvals: the evidence that operators approved a policy row's exact content, on a real (SQLite)
database: what one operator may do alone, what needs the quorum, and what does not verify."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from schemas.quorum import OperatorIdentity, OperatorSet, approve, change_digest
from worker.approvals import (
    ApprovalError,
    LocalOperators,
    QuorumRequired,
    load_operator_sets,
    row_name,
    sign_step,
    verify_evidence,
)
from worker.policy_rows import policy_fields
from worker.storage.db import migrate
from worker.storage.models import Caller, OperatorSetRecord, Pool, RootKey, RootKeyVersion

ALICE, BOB, CAROL = (OperatorIdentity.generate(n) for n in ("alice", "bob", "carol"))
TRIO = OperatorSet((ALICE.public, BOB.public, CAROL.public), 2)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'kmsq.db'}")
    migrate(engine)
    with Session(engine) as session:
        yield session
    engine.dispose()


def _caller(name: str = "wallet", ops: str = "generate_data_key,put_key", plaintext: bool = False) -> Caller:
    return Caller(name=name, signing_key="sk-" + name, signing_key_id="ed25519:0000", reply_key="rk-" + name,
                  allowed_ops=ops, root_keys="*", plaintext=plaintext, state="enabled")  # fmt: skip


def _adopted(db: Session) -> None:
    """The three operators adopt the deployment (2 of 3)."""
    LocalOperators([ALICE, BOB, CAROL], TRIO).sets(db)


def _seal(db: Session, row: Caller | RootKey | RootKeyVersion | Pool, *holders: OperatorIdentity) -> None:
    row.approval = LocalOperators(list(holders), TRIO).evidence_for(db, row, row.approval)
    db.add(row)
    db.flush()


def _verifies(db: Session, row: Caller | RootKey | RootKeyVersion | Pool) -> bool:
    try:
        verify_evidence(row, row.approval, load_operator_sets(db, TRIO.digest))
    except ApprovalError:
        return False
    return True


def test_the_genesis_adopts_the_rows_that_exist_and_needs_every_operator(db: Session) -> None:
    existing = _caller("legacy")
    db.add(existing)
    db.flush()
    with pytest.raises(ApprovalError, match="no operator set"):
        load_operator_sets(db, TRIO.digest)
    assert not LocalOperators([ALICE, BOB], TRIO).holds_genesis()  # a quorum, not everyone: no adoption
    with pytest.raises(ApprovalError, match="no operator set"):
        LocalOperators([ALICE, BOB], TRIO).sets(db)
    _adopted(db)
    sets = load_operator_sets(db, TRIO.digest)
    assert sets.current == TRIO and _verifies(db, existing)
    with pytest.raises(ApprovalError, match="not the one this host pins"):
        load_operator_sets(db, OperatorSet((ALICE.public,), 1).digest)


def test_one_operator_cannot_add_a_caller_two_can(db: Session) -> None:
    _adopted(db)
    with pytest.raises(QuorumRequired, match="needs 2 of the 3 operators"):
        _seal(db, _caller(), ALICE)
    row = _caller()
    _seal(db, row, ALICE, BOB)
    assert _verifies(db, row)
    row.plaintext = True  # widened in the database, evidence kept
    assert not _verifies(db, row)


def test_one_operator_takes_away_at_once_but_cannot_give_back(db: Session) -> None:
    _adopted(db)
    row = _caller(ops="generate_data_key,put_key,get_key", plaintext=True)
    _seal(db, row, ALICE, BOB)
    row.allowed_ops, row.plaintext = "generate_data_key,put_key", False
    _seal(db, row, CAROL)  # narrowed by one
    row.state = "disabled"
    _seal(db, row, ALICE)  # and disabled by one
    assert _verifies(db, row)
    assert [s["kind"] for s in json.loads(row.approval or "")["steps"]] == ["restrict", "restrict"]
    for widen in ({"state": "enabled"}, {"allowed_ops": "generate_data_key,put_key,get_key"}, {"root_keys": "rk-9"}):
        again = db.get(Caller, "wallet")
        assert again is not None
        saved = {k: getattr(again, k) for k in widen}
        for k, v in widen.items():
            setattr(again, k, v)
        if "root_keys" not in widen:  # ("*" to one root key is narrower: one operator may)
            with pytest.raises(QuorumRequired):
                _seal(db, again, BOB)
        for k, v in saved.items():
            setattr(again, k, v)
    row.state = "enabled"
    _seal(db, row, BOB, CAROL)  # enabling is the quorum's
    assert _verifies(db, row)


def test_one_operator_creates_and_rotates_a_root_key_but_lowering_its_minimum_needs_the_quorum(db: Session) -> None:
    _adopted(db)
    key = RootKey(id="rk-1", type="aes-256", pool="alpha", state="enabled", current_version=1)
    version = RootKeyVersion(root_key_id="rk-1", version=1, hsm_id="01", hsm_label="kmsq-rk-1-v1", wrap_algorithm=1,
                             state="enabled")  # fmt: skip
    pool = Pool(name="alpha", state="enabled")
    for row in (key, version, pool):
        _seal(db, row, ALICE)
    key.current_version = 2
    _seal(db, key, ALICE)  # rotation
    key.min_decryption_version = 2
    _seal(db, key, BOB)  # raising the minimum takes away
    assert all(_verifies(db, row) for row in (key, version, pool))
    key.min_decryption_version = 1
    with pytest.raises(QuorumRequired):
        _seal(db, key, ALICE)
    key.min_decryption_version = 2
    version.state = "destroyed"
    with pytest.raises(QuorumRequired):
        _seal(db, version, ALICE)
    _seal(db, version, ALICE, CAROL)
    key.current_version = 5  # a jump is not a rotation
    with pytest.raises(QuorumRequired):
        _seal(db, key, ALICE)


def test_evidence_that_does_not_verify(db: Session) -> None:
    _adopted(db)
    row, other = _caller("one"), _caller("two")
    _seal(db, row, ALICE, BOB)
    other.approval = row.approval  # another row's evidence
    assert not _verifies(db, other)
    evidence = json.loads(row.approval or "")
    evidence["base"]["approvals"] = evidence["base"]["approvals"][:1]  # one approval left
    row.approval = json.dumps(evidence)
    assert not _verifies(db, row)
    # A step that widens, properly signed by one operator, does not count: the rules are the worker's.
    _seal(db, third := _caller("three"), ALICE, BOB)
    before = json.loads(third.approval or "")
    kind, fields = policy_fields(third)
    third.plaintext = True
    widened = sign_step(ALICE, "restrict", row_name(third), 2, _digest(kind, fields), policy_fields(third)[1],
                        TRIO.digest)  # fmt: skip
    third.approval = json.dumps(before | {"steps": [widened]})
    assert not _verifies(db, third)
    # A step signed by someone outside the set, and one whose signature was altered.
    third.plaintext = False
    third.state = "disabled"
    mallory = OperatorIdentity.generate("mallory")
    outside = sign_step(mallory, "restrict", row_name(third), 2, _digest(kind, fields), policy_fields(third)[1],
                        TRIO.digest)  # fmt: skip
    third.approval = json.dumps(before | {"steps": [outside]})
    assert not _verifies(db, third)
    forged = dict(outside, operator="alice")
    third.approval = json.dumps(before | {"steps": [forged]})
    assert not _verifies(db, third)
    for bad in ("", "{", "[]", '{"v": 2, "steps": []}', '{"v": 1, "base": null, "steps": []}'):
        third.approval = bad
        assert not _verifies(db, third)


def test_the_operator_set_chain_does_not_verify_once_tampered(db: Session) -> None:
    _adopted(db)
    record = db.scalar(select(OperatorSetRecord))
    assert record is not None
    approvals = json.loads(record.approvals)
    record.approvals = json.dumps(approvals[:2])  # a quorum, but the genesis needs everyone
    db.flush()
    with pytest.raises(ApprovalError, match="every operator"):
        load_operator_sets(db, TRIO.digest)
    record.approvals = json.dumps(approvals)
    change = json.loads(record.change)
    record.change = json.dumps(change | {"proposed_by": "mallory"})  # approvals over another document
    db.flush()
    with pytest.raises(ApprovalError, match="every operator"):
        load_operator_sets(db, TRIO.digest)
    record.change = json.dumps(change)
    db.add(OperatorSetRecord(seq=1, digest=OperatorSet((ALICE.public,), 1).digest,
                             document=json.dumps(OperatorSet((ALICE.public,), 1).document()),
                             change=json.dumps({"action": "operators.change"}), approvals="[]"))  # fmt: skip
    db.flush()
    with pytest.raises(ApprovalError, match="not made by a change"):
        load_operator_sets(db, TRIO.digest)
    assert change_digest(change) != change_digest(change | {"proposed_by": "mallory"})
    assert approve(ALICE, change_digest(change)).digest == change_digest(change)


def _digest(kind: str, fields: tuple[tuple[str, str], ...]) -> str:
    from worker.approvals import content_digest

    return content_digest(kind, fields)
