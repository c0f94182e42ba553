"""Rewrapping under a root key's current version: the stored rows (``kmsq root-key rewrap``) in process on
SQLite and the in-memory KeyStore, and the HSM's rewrap itself on SoftHSM2. The job against Postgres, real
workers serving ``get_key`` throughout, and a kill in the middle are in tests/test_queue_rewrap.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from schemas.envelope import EncryptedDataKey
from tests.fake_hsm import FakeHsm
from tests.unit_fixtures import UnitTemplate, copy_of_schema
from worker.errors import IntegrityError, InvalidRequest
from worker.fleet import load_fleet_key
from worker.hsm import Hsm
from worker.legacy.root_key_names import add_legacy_root_key, list_legacy_root_keys
from worker.rewrap import pending_rows, rewrap_data_keys, rewrap_stored_batch
from worker.runtime import KeyService
from worker.service import hsm_handle, wrapping_version
from worker.storage.db import session_factory, transaction
from worker.storage.models import FleetKey, Job, LegacyRootKey, PrivateKey


@pytest.fixture
def keys(tmp_path: Path, unit_template: UnitTemplate) -> Iterator[KeyService]:
    engine = copy_of_schema(unit_template, tmp_path / "rewrap.db")
    service = KeyService(FakeHsm(), session_factory(engine), default_pool="alpha")
    yield service
    engine.dispose()


def _store(keys: KeyService, root: str, count: int) -> dict[str, str]:
    stored = {}
    for i in range(count):
        pub, prv = f"xpub-{i}", f"xprv-secret-{i}"
        keys.store_private_key(pub=pub, prv=prv, coin="btc", source="user", type="tss", root_key_id=root)
        stored[pub] = prv
    return stored


def _rows(keys: KeyService) -> dict[str, tuple[int, int | None, str, str]]:
    with keys.sessions() as db:
        return {r.pub: (r.root_key_version, r.sealed_version, r.encrypted_prv, r.encrypted_data_key)
                for r in db.scalars(select(PrivateKey))}  # fmt: skip


def test_a_rewrap_moves_every_row_to_the_current_version_and_keeps_the_ciphertext(keys: KeyService) -> None:
    root = keys.create_root_key("aes-256", "alpha").id
    stored = _store(keys, root, 7)
    before = _rows(keys)
    keys.rotate_root_key(root)
    seen: list[tuple[int, int]] = []
    summary = keys.rewrap_stored(root, job="first", batch=3, progress=lambda total, n: seen.append((total, n)))
    assert (summary.rewrapped, summary.total, summary.remaining, summary.failures) == (7, 7, 0, [])
    assert seen[0] == (7, 3) and seen[-1] == (7, 7)  # batches of 3
    after = _rows(keys)
    for pub, (version, sealed, prv_ct, data_key) in after.items():
        assert (version, sealed) == (2, 1)
        assert prv_ct == before[pub][2]  # the ciphertext is untouched: only its data key is wrapped again
        assert data_key != before[pub][3] and EncryptedDataKey.from_text(data_key).root_key_version == 2
        assert keys.get_private_key(pub, "user").prv == stored[pub]
    keys.rotate_root_key(root)
    assert keys.rewrap_stored(root, job="second").rewrapped == 7
    assert {v[:2] for v in _rows(keys).values()} == {(3, 1)}  # still names the version it was sealed under
    assert all(keys.get_private_key(pub, "user").prv == prv for pub, prv in stored.items())
    with keys.sessions() as db:
        job = db.get(Job, "first")
        assert job is not None and (job.kind, job.subject, job.state, job.done, job.failed) == (
            "rewrap", root, "finished", 7, 0)  # fmt: skip


def test_an_interrupted_batch_changes_nothing_and_a_rerun_finishes_with_exact_counts(keys: KeyService) -> None:
    root = keys.create_root_key("aes-256", "alpha").id
    stored = _store(keys, root, 5)
    keys.rotate_root_key(root)
    with pytest.raises(RuntimeError), transaction(keys.sessions) as db:  # killed after the HSM work
        assert rewrap_stored_batch(keys.hsm, db, root, 3, set())[0] == 3
        raise RuntimeError("killed")
    assert {v[0] for v in _rows(keys).values()} == {1}
    first = keys.rewrap_stored(root, job="resumed", batch=2)
    assert first.rewrapped == 5
    again = keys.rewrap_stored(root, job="resumed", batch=2)
    assert (again.rewrapped, again.done_before, again.total, again.remaining) == (0, 5, 0, 0)
    with keys.sessions() as db:
        job = db.get(Job, "resumed")
        assert job is not None and job.done == 5
        assert pending_rows(db, root, 2) == 0
    assert all(keys.get_private_key(pub, "user").prv == prv for pub, prv in stored.items())


def test_a_row_that_does_not_unwrap_is_reported_and_the_others_are_rewrapped(keys: KeyService) -> None:
    root = keys.create_root_key("aes-256", "alpha").id
    _store(keys, root, 4)
    with transaction(keys.sessions) as db:  # xpub-1's data key from another row of the same version
        other = db.scalars(select(PrivateKey.encrypted_data_key).where(PrivateKey.pub == "xpub-2")).one()
        bad = EncryptedDataKey.from_text(other)
        flipped = bytes([bad.wrapped[0] ^ 1]) + bad.wrapped[1:]
        forged = EncryptedDataKey(bad.key_spec, bad.wrap_algorithm, bad.root_key_id, 1, flipped).to_text()
        db.execute(update(PrivateKey).where(PrivateKey.pub == "xpub-1").values(encrypted_data_key=forged))
    keys.rotate_root_key(root)
    summary = keys.rewrap_stored(root, job="with-a-bad-row", batch=2)
    assert summary.rewrapped == 3 and summary.remaining == 1
    (failure,) = summary.failures
    assert (failure.table, failure.reason) == ("private_keys", "its data key does not unwrap (tampered?)")
    with keys.sessions() as db:
        job = db.get(Job, "with-a-bad-row")
        assert job is not None and (job.state, job.done, job.failed) == ("running", 3, 1)
    assert keys.get_private_key("xpub-3", "user").prv == "xprv-secret-3"


def test_fleet_keys_and_kept_legacy_names_are_rewrapped_too(keys: KeyService) -> None:
    root = keys.create_root_key("aes-256", "alpha").id
    keys.ensure_fleet_key("alpha")
    with transaction(keys.sessions) as db:
        add_legacy_root_key(keys.hsm, db, "old-root-name", root, "alpha")
        before = load_fleet_key(keys.hsm, db, "alpha")
    keys.rotate_root_key(root)
    assert keys.rewrap_stored(root).rewrapped == 2
    with transaction(keys.sessions) as db:
        fleet_row, legacy_row = db.get(FleetKey, "alpha"), db.scalars(select(LegacyRootKey)).one()
        assert fleet_row is not None and (fleet_row.root_key_version, fleet_row.sealed_version) == (2, 1)
        assert (legacy_row.root_key_version, legacy_row.sealed_version) == (2, 1)
        assert load_fleet_key(keys.hsm, db, "alpha").signing_key_id == before.signing_key_id
        assert [i.root_key_version for i in list_legacy_root_keys(db)] == [2]
        _, created = add_legacy_root_key(keys.hsm, db, "old-root-name", root, "alpha")  # opens the kept name
        assert created is False


def test_a_job_name_belongs_to_one_root_key(keys: KeyService) -> None:
    a, b = keys.create_root_key("aes-256", "alpha").id, keys.create_root_key("aes-256", "alpha").id
    keys.rewrap_stored(a, job="mine")
    with pytest.raises(InvalidRequest, match="is a rewrap of"):
        keys.rewrap_stored(b, job="mine")
    with pytest.raises(InvalidRequest, match="job names"):
        keys.rewrap_stored(a, job="Bad Name")


def test_caller_data_keys_are_rewrapped_per_item(keys: KeyService) -> None:
    aes, rsa = keys.create_root_key("aes-256", "alpha").id, keys.create_root_key("rsa-2048", "alpha").id
    old = [keys.generate_data_key(root) for root in (aes, rsa, aes)]
    keys.rotate_root_key(aes)
    current = keys.generate_data_key(aes).encrypted_key
    tampered = current[:-2] + ("AA" if not current.endswith("AA") else "BA")  # under the current version
    texts = [k.encrypted_key for k in old] + ["kmsq:v1:AAAA", current, tampered]
    with transaction(keys.sessions) as db:
        out = rewrap_data_keys(keys.hsm, db, texts, "alpha")
    assert isinstance(out[3], IntegrityError)
    assert out[1] == texts[1] and out[4] == current  # current already: the same string back
    assert isinstance(out[5], IntegrityError)  # checked all the same
    for i in (0, 2):
        assert isinstance(out[i], str) and EncryptedDataKey.from_text(out[i]).root_key_version == 2  # type: ignore[arg-type]
        assert keys.decrypt_data_key(out[i]) == old[i].plaintext_key  # type: ignore[arg-type]


@pytest.mark.parametrize("root_type", ["aes-256", "rsa-2048"])
def test_the_hsm_rewraps_inside_the_token(service: KeyService, hsm: Hsm, root_type: str) -> None:
    """SoftHSM2: a data key unwrapped under v1 and wrapped under v2 opens under v2 to the same value; a
    tampered one is None, and the others of the call are unaffected."""
    root = service.create_root_key(root_type, "default").id
    with transaction(service.sessions) as db:
        v1 = wrapping_version(db, root, "default")
    data_keys = [hsm.generate_data_key(hsm_handle(v1), readable=True) for _ in range(3)]
    service.rotate_root_key(root)
    with transaction(service.sessions) as db:
        v2 = wrapping_version(db, root, "default")
    tampered = bytes([data_keys[1][0][0] ^ 1]) + data_keys[1][0][1:]
    out = hsm.rewrap([(hsm_handle(v1), data_keys[0][0]), (hsm_handle(v1), tampered),
                      (hsm_handle(v1), data_keys[2][0])], hsm_handle(v2))  # fmt: skip
    assert out[1] is None
    fresh, _ = hsm.generate_data_key(hsm_handle(v2), readable=False)
    assert hsm.rewrap(
        [(hsm_handle(v2), fresh), (hsm_handle(v2), fresh[:-1] + bytes([fresh[-1] ^ 1]))], hsm_handle(v2)
    ) == [fresh, None]  # fmt: skip  (under the target already: only checked)
    for (wrapped, plaintext), new in ((data_keys[0], out[0]), (data_keys[2], out[2])):
        assert new is not None and new != wrapped and plaintext is not None
        with hsm.unwrap_data_key(hsm_handle(v2), new) as value:
            assert bytes(value.view()) == bytes(plaintext.view())
        with pytest.raises(IntegrityError):
            hsm.unwrap_data_key(hsm_handle(v2), wrapped)  # the old wrapping is v1's alone
