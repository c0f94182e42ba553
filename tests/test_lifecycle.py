"""A root key's lifecycle and a pool's state, in process (SQLite and the in-memory KeyStore) through the real
pipeline: minimum decryption version, destroying a version, disabling root keys and pools, and what a
database writer cannot undo behind the operator. The same against real workers is in
tests/test_queue_lifecycle.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from tasks.codec import KmsCodec
from tests.conftest import TEST_OPERATORS, approved_at
from tests.fake_hsm import FakeHsm
from tests.unit_fixtures import Unit, answer, refusal
from worker import schedule
from worker.approvals import ApprovalError, TimeMade, load_operator_sets, verify_evidence
from worker.errors import Conflict, InvalidRequest
from worker.storage.db import transaction
from worker.storage.models import AuditRecord, Pool, RootKey, RootKeyVersion


def _below(root: str, version: int, minimum: int) -> tuple[str, str]:
    return (
        "invalid",
        f"ciphertext is under version {version} of root key {root}, below its minimum decryption version {minimum}",
    )


def test_a_minimum_decryption_version_refuses_older_ciphertexts(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    old = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root}))
    unit.service.rotate_root_key(root)
    new = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root}))
    assert unit.service.set_min_decryption_version(root, 2).min_decryption_version == 2
    decrypt = {"op": "decrypt_data_key", "encrypted_key": old["encryptedKey"]}
    assert refusal(full, unit.deliver(full, decrypt)) == _below(root, 1, 2)
    rewrap = {"op": "rewrap_data_key", "encrypted_key": old["encryptedKey"]}
    assert refusal(full, unit.deliver(full, rewrap)) == _below(root, 1, 2)
    again = answer(full, unit.deliver(full, {"op": "decrypt_data_key", "encrypted_key": new["encryptedKey"]}))
    assert again == {"plaintextKey": new["plaintextKey"]}
    stranger = unit.register("rsaonly", roots=[unit.roots["rsa"]])  # may not use the root key: learns nothing
    assert refusal(stranger, unit.deliver(stranger, decrypt))[0] == "forbidden"
    with pytest.raises(InvalidRequest, match="1-2"):
        unit.service.set_min_decryption_version(root, 3)
    unit.service.set_min_decryption_version(root, 1)  # lowered again: the old key decrypts
    assert answer(full, unit.deliver(full, decrypt)) == {"plaintextKey": old["plaintextKey"]}


def test_stored_keys_below_the_minimum_are_refused_until_rewrapped(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    unit.service.store_private_key(pub="xpub-old", prv="xprv-old", coin="btc", source="user", type="tss",
                                   root_key_id=root)  # fmt: skip
    unit.service.rotate_root_key(root)
    unit.service.set_min_decryption_version(root, 2)
    get = {"op": "get_key", "pub": "xpub-old", "source": "user"}
    assert refusal(full, unit.deliver(full, get)) == _below(root, 1, 2)
    assert unit.service.rewrap_stored(root).rewrapped >= 1  # the job rewraps rows below the minimum too
    assert answer(full, unit.deliver(full, get))["prv"] == "xprv-old"


def test_a_version_is_destroyed_only_below_the_minimum_and_unused(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    old = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root}))
    unit.service.store_private_key(pub="xpub-d", prv="xprv-d", coin="btc", source="user", type="tss",
                                   root_key_id=root)  # fmt: skip
    unit.service.rotate_root_key(root)
    with pytest.raises(InvalidRequest, match="not below the minimum decryption version 1: run `kmsq root-key set"):
        unit.service.destroy_root_key_version(root, 1)
    unit.service.set_min_decryption_version(root, 2)
    with pytest.raises(Conflict, match=r"stored row\(s\) still use version 1: run `kmsq root-key rewrap"):
        unit.service.destroy_root_key_version(root, 1)
    unit.service.rewrap_stored(root)
    with pytest.raises(InvalidRequest, match="1 to 90 days"):
        unit.service.destroy_root_key_version(root, 1, 0)
    hsm = unit.service.hsm
    assert isinstance(hsm, FakeHsm)
    before = len(hsm._aes)
    # Approved 8 days ago with a wait of 7: due now; the workers' run destroys it.
    with approved_at(datetime.now(UTC) - timedelta(days=8)):
        info = unit.service.destroy_root_key_version(root, 1, 7)
    [(version, due)] = info.pending_destruction
    assert version == 1 and due is not None and due < datetime.now(UTC)
    done = schedule.run(hsm, unit.service.sessions, TEST_OPERATORS.digest)
    assert done.destroyed == [f"{root}:1"] and not done.kept
    info = next(k for k in unit.service.list_root_keys() if k.id == root)
    assert (info.versions, info.destroyed_versions, info.min_decryption_version) == ((2,), (1,), 2)
    assert len(hsm._aes) == before - 1  # the HSM object is gone
    with pytest.raises(InvalidRequest, match="destroyed already"):
        unit.service.destroy_root_key_version(root, 1)
    with pytest.raises(InvalidRequest, match="version 1 is destroyed"):
        unit.service.set_min_decryption_version(root, 1)
    decrypt = {"op": "decrypt_data_key", "encrypted_key": old["encryptedKey"]}
    assert refusal(full, unit.deliver(full, decrypt)) == _below(root, 1, 2)
    assert answer(full, unit.deliver(full, {"op": "get_key", "pub": "xpub-d", "source": "user"}))["prv"] == "xprv-d"
    with unit.service.sessions() as db:
        row = db.get(RootKeyVersion, (root, 1))
        assert row is not None and unit.ctx.rows.root_key_version(db, root, 1) is not None  # a worker trusts it
        steps = json.loads(row.approval or "{}")["steps"]
        assert steps[-1]["kind"] == "due" and "signature" not in steps[-1]
        records = list(db.scalars(select(AuditRecord).where(AuditRecord.action == "root-key version destroyed")))
        assert [(r.actor, r.root_key_version) for r in records] == [("kmsq:schedule", 1)]


def test_a_destruction_waits_and_one_operator_cancels_it(unit: Unit) -> None:
    root = unit.roots["aes"]
    unit.service.rotate_root_key(root)
    unit.service.set_min_decryption_version(root, 2)
    unit.service.rewrap_stored(root)
    hsm = unit.service.hsm
    assert isinstance(hsm, FakeHsm)
    before = len(hsm._aes)
    info = unit.service.destroy_root_key_version(root, 1)
    [(version, due)] = info.pending_destruction
    assert version == 1 and due is not None
    assert timedelta(days=6, hours=23) < due - datetime.now(UTC) <= timedelta(days=7)
    assert info.versions == (1, 2)  # still there, for the wait
    done = schedule.run(hsm, unit.service.sessions, TEST_OPERATORS.digest)
    assert done.destroyed == [] and len(hsm._aes) == before  # not due: nothing happens
    with pytest.raises(InvalidRequest, match=r"waits for destruction \(cancel it first"):
        unit.service.set_min_decryption_version(root, 1)
    with pytest.raises(InvalidRequest, match="pending destroy already"):
        unit.service.destroy_root_key_version(root, 1)
    # A due step written before its time (with the PIN, say) is refused by every reader.
    with transaction(unit.service.sessions) as db:
        row = db.get(RootKeyVersion, (root, 1))
        assert row is not None
        sets = load_operator_sets(db, TEST_OPERATORS.digest)
        row.state = "destroyed"
        with pytest.raises(ApprovalError, match="not a change that has fallen due"):
            TimeMade(sets, datetime.now(UTC)).evidence_for(db, row, row.approval)
        forged = TimeMade(sets, datetime.now(UTC) + timedelta(days=8)).evidence_for(db, row, row.approval)
        with pytest.raises(ApprovalError, match="before the change fell due"):
            verify_evidence(row, forged, sets)  # its claimed time is in this reader's future
        db.rollback()
    # Cancelled by one operator (a restriction of nothing: the version back as it was), then lowered again.
    kept = unit.service.cancel_destroy(root, 1)
    assert kept.pending_destruction == () and kept.versions == (1, 2)
    with pytest.raises(InvalidRequest, match="not waiting for destruction"):
        unit.service.cancel_destroy(root, 1)
    assert unit.service.set_min_decryption_version(root, 1).min_decryption_version == 1
    with unit.service.sessions() as db:
        assert unit.ctx.rows.root_key_version(db, root, 1) is not None


def test_a_disabled_root_key_wraps_and_unwraps_nothing(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    key = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root}))
    assert unit.service.set_root_key_state(root, "disabled").state == "disabled"
    disabled = ("invalid", f"root key {root} is disabled")
    assert refusal(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root})) == disabled
    decrypt = {"op": "decrypt_data_key", "encrypted_key": key["encryptedKey"]}
    assert refusal(full, unit.deliver(full, decrypt)) == disabled
    unit.service.set_root_key_state(root, "enabled")
    assert answer(full, unit.deliver(full, decrypt)) == {"plaintextKey": key["plaintextKey"]}


def test_a_disabled_pool_refuses_its_requests(unit: Unit, full: KmsCodec) -> None:
    assert unit.service.set_pool_state("alpha", "disabled").state == "disabled"
    request, args = full.build_request({"op": "generate_data_key"}, "alpha")
    assert refusal(full, unit.handle_args(request, args)) == ("invalid", "pool alpha is disabled")
    unit.service.set_pool_state("alpha", "enabled")
    assert refusal(full, unit.handle_args(request, args)) == ("invalid", "pool alpha is disabled")  # stored
    assert "encryptedKey" in answer(full, unit.deliver(full, {"op": "generate_data_key"}))
    assert {(p.name, p.state) for p in unit.service.list_pools()} == {("alpha", "enabled"), ("beta", "enabled")}


def test_a_database_writer_cannot_undo_the_operator(unit: Unit, full: KmsCodec) -> None:
    """Changing a value in the database alone fails the row's policy MAC: the root key is as absent, the pool as
    disabled. (Putting back a whole earlier row, MAC and all, is tests/test_policy_rollback.py.)"""
    root = unit.roots["aes"]
    old = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root}))
    unit.service.rotate_root_key(root)
    unit.service.set_min_decryption_version(root, 2)
    unit.service.set_pool_state("beta", "disabled")
    with transaction(unit.service.sessions) as db:
        db.execute(update(RootKey).where(RootKey.id == root).values(min_decryption_version=1))
        db.execute(update(Pool).where(Pool.name == "beta").values(state="enabled"))
    decrypt = {"op": "decrypt_data_key", "encrypted_key": old["encryptedKey"]}
    assert refusal(full, unit.deliver(full, decrypt)) == ("invalid", "ciphertext failed integrity check")
    with transaction(unit.service.sessions) as db:
        db.execute(update(Pool).where(Pool.name == "alpha").values(state="disabled"))  # its MAC now fails
    assert refusal(full, unit.deliver(full, {"op": "generate_data_key"})) == (
        "invalid", "pool alpha failed its policy check")  # fmt: skip


def test_a_root_key_with_a_rotation_period_is_rotated_when_it_falls_due(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    hsm, sessions = unit.service.hsm, unit.service.sessions
    with pytest.raises(InvalidRequest, match="1 to 3650 days"):
        unit.service.set_rotation_period(root, 0)
    info = unit.service.set_rotation_period(root, 30)  # set now: due in 30 days
    assert info.rotation_period_days == 30 and info.next_rotation is not None
    assert timedelta(days=29, hours=23) < info.next_rotation - datetime.now(UTC) <= timedelta(days=30)
    assert schedule.run(hsm, sessions, TEST_OPERATORS.digest).rotated == []
    assert unit.service.set_rotation_period(root, None).next_rotation is None
    with approved_at(datetime.now(UTC) - timedelta(days=31)):  # set 31 days ago: due
        unit.service.set_rotation_period(root, 30)
    done = schedule.run(hsm, sessions, TEST_OPERATORS.digest)
    assert done.rotated == [f"{root}:2"] and not done.kept
    assert schedule.run(hsm, sessions, TEST_OPERATORS.digest).rotated == []  # the next one is 30 days away
    key = next(k for k in unit.service.list_root_keys() if k.id == root)
    assert key.version == 2 and key.next_rotation is not None and key.next_rotation > datetime.now(UTC)
    with sessions() as db:  # a worker trusts both rows the rotation made, and wraps under the new version
        assert unit.ctx.rows.root_key(db, root) is not None
        assert unit.ctx.rows.root_key_version(db, root, 2) is not None
        records = list(db.scalars(select(AuditRecord).where(AuditRecord.action == "root-key rotate")))
        assert [(r.actor, r.root_key_version) for r in records][-1] == ("kmsq:schedule", 2)
    made = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root}))
    assert made["encryptedKey"]
    # A rotation written before it fell due (with the PIN, say) is refused by every reader.
    with transaction(sessions) as db:
        row = db.get(RootKey, root)
        assert row is not None
        sets = load_operator_sets(db, TEST_OPERATORS.digest)
        row.current_version = 3
        with pytest.raises(ApprovalError, match="not a change that has fallen due"):
            TimeMade(sets, datetime.now(UTC)).evidence_for(db, row, row.approval)
        db.rollback()
    assert unit.service.set_rotation_period(root, None).next_rotation is None
