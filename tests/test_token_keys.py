"""Token signing keys (``generate_signing_key`` with ``in_hsm``) that no row names (issue 22, item 5), on the
in-memory token: a redelivery finds its record before the token is touched, a generation whose transaction rolls
back destroys its key, one whose commit failed keeps it, and ``worker.token_keys`` finds and removes the keys no
row names, looking at the rows twice."""

from __future__ import annotations

import logging
import secrets
import sqlite3
from typing import Any

import pytest
from sqlalchemy import select, update

from tasks.codec import KmsCodec
from tests.fake_hsm import FakeHsm
from tests.unit_fixtures import Unit, answer, refusal
from worker import audit_log, service, signing, token_keys
from worker.errors import Conflict, DatabaseUnavailable, HsmUnavailable
from worker.handlers import signing as signing_handlers
from worker.keystore import KeyStore
from worker.storage.db import create_db_engine, session_factory, transaction
from worker.storage.models import AuditRecord, PrivateKey

GENERATE = {"op": "generate_signing_key", "coin": "hteth", "source": "user", "type": "independent", "in_hsm": True}


def token_keys_of(hsm: KeyStore) -> list[str]:
    """The token's kmsq signing keys."""
    return [label for label in hsm.ec_signing_keys() if label.startswith(token_keys.LABEL_PREFIX)]


def redeliver(unit: Unit, codec: KmsCodec, times: int) -> tuple[dict[str, Any], list[str]]:
    """One signed in_hsm generation delivered ``times`` times; returns its answer and the token keys it added."""
    before = set(token_keys_of(unit.ctx.hsm))
    request, args = codec.build_request(GENERATE, "alpha")
    first = answer(codec, unit.handle_args(request, args))
    for _ in range(times - 1):
        assert answer(codec, unit.handle_args(request, args)) == first  # the stored reply
    return first, sorted(set(token_keys_of(unit.ctx.hsm)) - before)


def orphan(hsm: KeyStore) -> str:
    """A token key made directly, as a worker that stopped before committing its row leaves one."""
    key_id = signing.token_key_id(bytearray(secrets.token_bytes(16)))
    hsm.create_ec_signing_key(key_id)
    return key_id.decode("ascii")


def name_in_a_row(unit: Unit, label: str, coin: str = "hteth") -> str:
    """Commits a row naming the token key ``label`` (as the worker making it would); returns its pub."""
    hsm = unit.ctx.hsm
    assert isinstance(hsm, FakeHsm)
    point = hsm._ec[label.encode()].public_key.format(compressed=False)
    pub = signing.token_xpub(point, bytearray(secrets.token_bytes(32)))
    with transaction(unit.service.sessions) as db:
        version = service.wrapping_version(db, None, "alpha")
        db.add(service.sealed_private_key_row(
            hsm, version, pub=pub, prv=signing.token_key_reference(label.encode()), coin=coin, source="user",
            type="independent", exportable=False,
        ))  # fmt: skip
    return pub


# -- redelivery and rollback ------------------------------------------------------------------------


def test_a_redelivered_generation_makes_no_second_token_key(
    unit: Unit, full: KmsCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[bytes] = []
    create = unit.ctx.hsm.create_ec_signing_key

    def counted(key_id: bytes) -> bytes:
        made.append(key_id)
        return create(key_id)

    monkeypatch.setattr(unit.ctx.hsm, "create_ec_signing_key", counted)
    key, added = redeliver(unit, full, 6)
    assert len(added) == 1  # was 6: one per delivery, five of them named by no row
    assert len(made) == 1  # a redelivery finds its record before it touches the token
    assert unit.count(PrivateKey) == 1 and key["pub"].startswith("xpub")


def test_a_duplicate_that_loses_the_race_on_its_record_destroys_its_token_key(
    unit: Unit, full: KmsCodec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a concurrent duplicate: the other delivery's record was not committed when this one looked, so it makes a
    key, then finds the record at its insert and rolls back."""
    monkeypatch.setattr(signing_handlers, "refuse_if_recorded", lambda call: None)
    _, added = redeliver(unit, full, 3)
    assert len(added) == 1


@pytest.mark.parametrize("failure", ["hsm", "internal"])
def test_a_generation_that_fails_after_making_its_key_destroys_it(
    unit: Unit, full: KmsCodec, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    hsm = unit.ctx.hsm
    assert isinstance(hsm, FakeHsm)
    request, args = full.build_request(GENERATE, "alpha")
    if failure == "hsm":  # the row's seal, after the key: a transient failure the task retries
        monkeypatch.setattr(hsm, "seal", _raise(HsmUnavailable()))
        with pytest.raises(HsmUnavailable):
            unit.handle_args(request, args)
    else:  # the audit record, the transaction's last step: an internal error
        append = audit_log.append
        monkeypatch.setattr(audit_log, "append", lambda *a, **k: _raise(RuntimeError())() if k["outcome"] == "ok"
                            else append(*a, **k))  # fmt: skip
        assert refusal(full, unit.handle_args(request, args))[0] == "internal"
    assert token_keys_of(hsm) == [] and unit.count(PrivateKey) == 0
    monkeypatch.undo()
    answer(full, unit.handle_args(request, args))  # the retry makes the one key
    assert len(token_keys_of(hsm)) == 1


def test_a_key_whose_commit_failed_is_kept(
    unit: Unit, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the database's commit began, whether the row is there is not known: the key stays (logged)."""
    hsm = unit.ctx.hsm
    engine = create_db_engine(unit.service.engine.url.render_as_string(hide_password=False))
    monkeypatch.setattr(engine.dialect, "do_commit", _raise(sqlite3.OperationalError("disk I/O error")))
    try:
        with (
            caplog.at_level(logging.WARNING, "kmsq.worker"),
            pytest.raises(DatabaseUnavailable),
            transaction(session_factory(engine)) as db,
        ):
            service.generate_signing_key(hsm, db, coin="hteth", source="user", type="independent", in_hsm=True,
                                         pool="alpha")  # fmt: skip
    finally:
        engine.dispose()
    [label] = token_keys_of(hsm)
    assert unit.count(PrivateKey) == 0  # the commit did fail: the key is an orphan, for the operator command
    assert f"token key {label} kept" in caplog.text
    assert token_keys.find_orphans(hsm, unit.service.sessions).orphans == [label]


def _raise(error: Exception) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    return fail


def test_a_savepoint_released_is_not_the_commit(unit: Unit) -> None:
    """The row's insert is a savepoint: its release must not count as the commit (the key would be kept)."""
    hsm = unit.ctx.hsm
    with pytest.raises(RuntimeError), transaction(unit.service.sessions) as db:
        service.generate_signing_key(hsm, db, coin="hteth", source="user", type="independent", in_hsm=True,
                                     pool="alpha")  # fmt: skip
        with db.begin_nested():
            pass
        raise RuntimeError("after the row")
    assert token_keys_of(hsm) == []


# -- kmsq signing-key orphans -----------------------------------------------------------------------


def test_orphans_are_listed_and_removed_and_named_keys_kept(unit: Unit, full: KmsCodec) -> None:
    hsm = unit.ctx.hsm
    named = answer(full, unit.deliver(full, GENERATE))
    answer(full, unit.deliver(full, {**GENERATE, "in_hsm": False}))  # an xprv: opened, names nothing
    answer(full, unit.deliver(full, {**GENERATE, "coin": "tbtc", "in_hsm": False}))  # a UTXO key: not opened
    [kept] = token_keys_of(hsm)
    lost = orphan(hsm)
    found = token_keys.find_orphans(hsm, unit.service.sessions, batch=2)  # two batches
    assert (found.orphans, found.token_keys, found.named, found.missing) == ([lost], 2, 1, [])
    waits: list[float] = []
    removed = token_keys.remove_orphans(hsm, unit.service.sessions, "alpha", grace=7, batch=2, sleep=waits.append)
    assert removed.removed == [lost] and waits == [7]
    assert token_keys_of(hsm) == [kept]
    with transaction(unit.service.sessions) as db:
        record = db.scalars(select(AuditRecord).where(AuditRecord.action == token_keys.REMOVE_ACTION)).one()
    assert record.detail == lost and record.actor.startswith("operator:") and record.pool == "alpha"
    assert unit.ctx.hsm.sign_ecdsa(kept.encode(), bytes(32))  # the named key still signs
    assert answer(full, unit.deliver(full, {"op": "sign", "pub": named["pub"], "source": "user",
                                            "payload": "0x" + "11" * 32, "algorithm": "ecdsa"}))  # fmt: skip
    again = token_keys.remove_orphans(hsm, unit.service.sessions, "alpha", sleep=waits.append)
    assert again.orphans == [] and again.removed == [] and waits == [7]  # nothing to wait for


def test_a_key_whose_row_commits_during_the_grace_is_kept(unit: Unit) -> None:
    hsm = unit.ctx.hsm
    making = orphan(hsm)  # a worker made it and has not committed its row yet
    lost = orphan(hsm)

    def worker_commits(seconds: float) -> None:
        name_in_a_row(unit, making)

    report = token_keys.remove_orphans(hsm, unit.service.sessions, "alpha", grace=30, sleep=worker_commits)
    assert report.removed == [lost] and report.orphans == [lost]
    assert token_keys_of(hsm) == [making]


def test_nothing_is_removed_while_a_row_cannot_be_opened(unit: Unit, full: KmsCodec) -> None:
    hsm = unit.ctx.hsm
    named = answer(full, unit.deliver(full, GENERATE))
    lost = orphan(hsm)
    with transaction(unit.service.sessions) as db:
        db.execute(update(PrivateKey).where(PrivateKey.pub == named["pub"]).values(encrypted_prv="kmsq:v1:AAAA"))
    listed = token_keys.find_orphans(hsm, unit.service.sessions)
    assert [r.reason for r in listed.unreadable] == ["ciphertext failed integrity check"]
    with pytest.raises(Conflict, match="nothing removed: 1 generated key rows could not be opened"):
        token_keys.remove_orphans(hsm, unit.service.sessions, "alpha", grace=0)
    assert lost in token_keys_of(hsm) and len(token_keys_of(hsm)) == 2


def test_a_row_naming_a_key_the_token_lacks_is_reported(unit: Unit, full: KmsCodec) -> None:
    hsm = unit.ctx.hsm
    answer(full, unit.deliver(full, GENERATE))
    [label] = token_keys_of(hsm)
    hsm.destroy_ec_signing_key(label.encode())
    with pytest.raises(Exception, match="signing key not present"):
        hsm.destroy_ec_signing_key(label.encode())
    report = token_keys.find_orphans(hsm, unit.service.sessions)
    assert (report.missing, report.orphans, report.token_keys) == ([label], [], 0)


def test_removal_is_refused_when_the_token_serves_another_database(unit: Unit) -> None:
    """Another database's rows name keys this one cannot see: the token holding its policy anchor tells."""
    hsm = unit.ctx.hsm
    hsm.write_policy_anchor("another-database", b"its anchor", [])
    lost = orphan(hsm)
    assert token_keys.find_orphans(hsm, unit.service.sessions).other_databases == 1
    with pytest.raises(Conflict, match="the token serves 1 other kmsq database"):
        token_keys.remove_orphans(hsm, unit.service.sessions, "alpha", grace=0)
    assert token_keys_of(hsm) == [lost]
