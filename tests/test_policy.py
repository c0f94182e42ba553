"""Policy rows under an HSM-held MAC, against the real workers: what a database writer changes in the callers
table or in a root key's security columns is refused as if absent (and counted or logged), instead of taking
effect within the cache's seconds as it used to. Operator commands still work, and approve nothing blindly."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from tasks.client import KmsClient, KmsError, KmsTimeout
from tasks.identity import CallerIdentity
from tests.conftest import run_kmsq
from tests.queue_fixtures import Deployment, kmsq_command
from worker import policy, policy_anchor
from worker.policy import set_process_authorizer
from worker.storage.db import transaction
from worker.storage.models import Caller, RejectionCount, RootKey

CACHE = 1.2  # the workers' KMSQ_CACHE_SECONDS (1) and a margin


# Its own row fails its MAC, or (a MAC removed, a row inserted) the rows no longer hash to the token's anchor.
POLICY_REASONS = ("caller failed its policy check", "policy rows not anchored")


NO_REPLY_SECONDS = 1.5  # a refused request gets no reply; a served one answers in milliseconds


@contextmanager
def expecting_no_reply(kms: KmsClient) -> Iterator[None]:
    """Waits :data:`NO_REPLY_SECONDS` for replies inside (the client's own timeout outside), and expects
    KmsTimeout."""
    kept, kms.timeout = kms.timeout, NO_REPLY_SECONDS
    try:
        with pytest.raises(KmsTimeout):
            yield
    finally:
        kms.timeout = kept


def counted_above(deployment: Deployment, caller: str, count: int, within: float = 15) -> bool:
    """Waits until the workers counted more than ``count`` policy refusals of ``caller`` (a refusal is counted
    after the client stopped waiting for a reply when the machine is busy)."""
    deadline = time.monotonic() + within
    while refusal_counted(deployment, caller) <= count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _reasons(deployment: Deployment, caller: str) -> set[str]:
    with deployment.sessions() as db:
        return set(db.scalars(select(RejectionCount.reason).where(RejectionCount.caller == caller)))


def refusal_counted(deployment: Deployment, caller: str) -> int:
    with deployment.sessions() as db:
        rows = db.scalars(
            select(RejectionCount).where(RejectionCount.caller == caller, RejectionCount.reason.in_(POLICY_REASONS))
        ).all()
    return sum(r.count for r in rows)


@pytest.fixture
def tampered_caller(deployment: Deployment) -> Iterator[tuple[CallerIdentity, dict[str, Any]]]:
    """A caller registered without plaintext, whose row the test changes and the fixture restores."""
    name = "pol-" + uuid.uuid4().hex[:8]
    identity = deployment.register(name, ("generate_data_key", "generate_data_key_without_plaintext"), plaintext=False)
    with deployment.sessions() as db:
        row = db.get(Caller, name)
        assert row is not None
        original = {c: getattr(row, c) for c in ("plaintext", "allowed_ops", "signing_key", "policy_mac")}
    yield identity, original
    with transaction(deployment.sessions) as db:
        db.execute(update(Caller).where(Caller.name == name).values(**original))


@pytest.mark.parametrize(
    "change",
    [{"plaintext": True}, {"allowed_ops": "decrypt_data_key,generate_data_key,get_key,put_key"}, {"policy_mac": None}],
    ids=["plaintext", "operations", "mac-removed"],
)
def test_a_caller_widened_in_the_database_is_refused(
    deployment: Deployment, tampered_caller: tuple[CallerIdentity, dict[str, Any]], change: dict[str, Any]
) -> None:
    identity, _ = tampered_caller
    with deployment.client(identity, timeout=10) as kms:
        assert kms.generate_data_key(with_plaintext=False)["encryptedKey"]  # sealed by `caller add`: served
        with transaction(deployment.sessions) as db:
            db.execute(update(Caller).where(Caller.name == identity.caller).values(**change))
        time.sleep(CACHE)
        before = refusal_counted(deployment, identity.caller)
        with expecting_no_reply(kms):  # refused as if the caller did not exist: no reply
            kms.generate_data_key()
        assert counted_above(deployment, identity.caller, before)
        assert refusal_counted(deployment, identity.caller) == before + 1


def test_a_caller_whose_keys_were_swapped_or_that_was_inserted_is_refused(deployment: Deployment) -> None:
    """The attacker's own keys in a registered caller's row, and a row inserted for a new caller."""
    victim = deployment.register("pol-victim-" + uuid.uuid4().hex[:6], ("generate_data_key",))
    attacker = CallerIdentity.generate(victim.caller)
    with deployment.sessions() as db:
        row = db.get(Caller, victim.caller)
        assert row is not None
        genuine = {c: getattr(row, c) for c in ("signing_key", "signing_key_id", "reply_key")}
    public = attacker.public_document()
    swapped = {"signing_key": public["signing_key"], "signing_key_id": attacker.key_id,
               "reply_key": public["reply_key"]}  # fmt: skip
    inserted = CallerIdentity.generate("pol-new-" + uuid.uuid4().hex[:6])
    try:
        with transaction(deployment.sessions) as db:
            db.execute(update(Caller).where(Caller.name == victim.caller).values(**swapped))
            new = inserted.public_document()
            db.add(Caller(name=inserted.caller, signing_key=new["signing_key"], signing_key_id=inserted.key_id,
                          reply_key=new["reply_key"], allowed_ops="generate_data_key", root_keys="*",
                          plaintext=True, state="enabled"))  # fmt: skip
        time.sleep(CACHE)
        for identity in (attacker, inserted):
            with deployment.client(identity, timeout=10) as kms, expecting_no_reply(kms):
                kms.generate_data_key()
            assert counted_above(deployment, identity.caller, 0)
    finally:
        with transaction(deployment.sessions) as db:
            db.execute(update(Caller).where(Caller.name == victim.caller).values(**genuine))
            db.execute(delete(Caller).where(Caller.name == inserted.caller))
    time.sleep(CACHE)
    with deployment.client(victim) as kms:
        assert kms.generate_data_key()["plaintextKey"]


def test_a_root_key_moved_to_another_pool_is_refused(deployment: Deployment, client: KmsClient) -> None:
    """beta's root key relabelled as alpha's: alpha's workers treat it as absent instead of using it."""
    beta = deployment.roots[("beta", "aes-256")]
    params = {"op": "generate_data_key_without_plaintext", "root_key_id": beta}

    def ask_alpha() -> KmsError:
        with pytest.raises(KmsError) as refused:
            client.wait(client.submit(params, "alpha"))
        return refused.value

    assert ask_alpha().message == f"root key {beta} is in pool beta, not alpha"
    try:
        with transaction(deployment.sessions) as db:
            db.execute(update(RootKey).where(RootKey.id == beta).values(pool="alpha"))
        time.sleep(CACHE)
        assert (ask_alpha().code, ask_alpha().message) == ("not_found", "no such root key")
    finally:
        with transaction(deployment.sessions) as db:
            db.execute(update(RootKey).where(RootKey.id == beta).values(pool="beta"))
    time.sleep(CACHE)
    assert client.generate_data_key(beta, with_plaintext=False)["encryptedKey"]


def test_operator_commands_refuse_to_approve_a_changed_row(
    deployment: Deployment, tampered_caller: tuple[CallerIdentity, dict[str, Any]]
) -> None:
    identity, _ = tampered_caller
    with transaction(deployment.sessions) as db:
        db.execute(update(Caller).where(Caller.name == identity.caller).values(plaintext=True))
    run = lambda *args: subprocess.run([*kmsq_command(), *args], env=deployment.env(),  # noqa: E731
                                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    disabled = run("caller", "disable", identity.caller)
    assert disabled.returncode == 7 and "failed its policy check" in disabled.stderr
    checked = run("policy", "check", "--json")
    assert checked.returncode == 7 and f"caller {identity.caller}" in checked.stdout
    with deployment.sessions() as db:
        row = db.get(Caller, identity.caller)
        assert row is not None and not policy.verifies(deployment.service.hsm, row)


@pytest.mark.hsm
def test_rows_from_before_policy_macs_are_listed_then_sealed_by_the_operator(tmp_path: Path) -> None:
    """An upgraded deployment: rows without a MAC are listed by `kmsq init` and `kmsq policy check`, and
    trusted only once the operator runs `kmsq policy seal`."""
    home = tmp_path / "home"
    assert run_kmsq(home, "init").returncode == 0
    assert run_kmsq(home, "caller", "keygen", "old", "--dir", str(tmp_path)).returncode == 0
    added = run_kmsq(home, "caller", "add", "old", "--public-key", str(tmp_path / "old.pub.json"),
                     "--allow", "generate_data_key", "--all-root-keys")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert run_kmsq(home, "policy", "check").returncode == 0
    with sqlite3.connect(home / "kmsq.db") as db:  # as the migration leaves rows from before
        db.execute("UPDATE callers SET policy_mac = NULL")
        db.execute("UPDATE root_keys SET policy_mac = NULL")
    checked = run_kmsq(home, "policy", "check", "--json")
    assert checked.returncode == 7
    report = json.loads(checked.stdout)
    assert {"caller old"} <= set(report["failing"]) and any(r.startswith("root key rk-") for r in report["failing"])
    again = run_kmsq(home, "init", "--json")
    assert again.returncode == 0 and set(json.loads(again.stdout)["policy_rows_failing"]) == set(report["failing"])
    sealed = run_kmsq(home, "policy", "seal", "--json")
    assert sealed.returncode == 0 and json.loads(sealed.stdout)["sealed"] == report["failing"]
    assert run_kmsq(home, "policy", "check").returncode == 0


def test_a_caller_row_put_back_after_disable_is_refused_by_the_workers(deployment: Deployment) -> None:
    """Issue 22.1 against real workers: `kmsq caller disable`, then the row from before put back with its MAC.
    The MAC verifies, but the rows no longer hash to the token's anchor: no request of anyone is served (no
    reply, counted as `policy rows not anchored`) until the anchored rows are back."""
    identity = deployment.register("pol-rb-" + uuid.uuid4().hex[:6], ("generate_data_key",))
    other = deployment.register("pol-other-" + uuid.uuid4().hex[:6], ("generate_data_key",))

    def copy_row() -> dict[str, Any]:
        with deployment.sessions() as db:
            row = db.get(Caller, identity.caller)
            assert row is not None
            return {c.key: getattr(row, c.key) for c in Caller.__table__.columns}

    def put(values: dict[str, Any]) -> None:
        with transaction(deployment.sessions) as db:
            db.execute(update(Caller).where(Caller.name == identity.caller).values(**values))

    enabled = copy_row()
    with deployment.client(identity, timeout=10) as kms, deployment.client(other, timeout=10) as bystander:
        assert kms.generate_data_key()["plaintextKey"]
        disabled = subprocess.run([*kmsq_command(), "caller", "disable", identity.caller], env=deployment.env(),
                                  capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert disabled.returncode == 0, disabled.stderr
        anchored_row = copy_row()
        time.sleep(CACHE)
        with pytest.raises(KmsError) as refused:
            kms.generate_data_key()
        assert refused.value.code == "unauthenticated"  # disabled: told so on its own queue
        try:
            put(enabled)  # the rollback: the row of before `caller disable`, MAC and all
            time.sleep(CACHE)
            with expecting_no_reply(kms):  # not served again: no reply at all
                kms.generate_data_key()
            with expecting_no_reply(bystander):  # and nobody else is served on rows that do not hash to the anchor
                bystander.generate_data_key()
            deadline = time.monotonic() + 15
            while "policy rows not anchored" not in _reasons(deployment, identity.caller):
                assert time.monotonic() < deadline, _reasons(deployment, identity.caller)
                time.sleep(0.1)
        finally:
            put(anchored_row)
        time.sleep(CACHE)
        assert bystander.generate_data_key()["plaintextKey"]  # the anchored rows are back: served again


def test_a_caller_row_with_a_valid_mac_and_anchor_but_no_approval_is_refused(
    deployment: Deployment, test_operator: object
) -> None:
    """Issue 25: whoever holds the token's PIN and the database can MAC a row and anchor it, as the operator
    commands do, but not approve it: without the operators' approval of exactly its content workers refuse it."""
    identity = CallerIdentity.generate("pol-pin-" + uuid.uuid4().hex[:6])
    public = identity.public_document()
    set_process_authorizer(None)  # this test process holds the PIN, and no operator key
    try:
        with transaction(deployment.sessions) as db:
            row = Caller(name=identity.caller, signing_key=public["signing_key"], signing_key_id=identity.key_id,
                         reply_key=public["reply_key"], allowed_ops="generate_data_key", root_keys="*",
                         plaintext=True, state="enabled")  # fmt: skip
            policy.seal(deployment.service.hsm, db, row)  # a valid MAC, and the anchor moves at the commit
            db.add(row)
    finally:
        set_process_authorizer(test_operator)
    with deployment.sessions() as db:
        sealed = db.get(Caller, identity.caller)
        assert sealed is not None and policy.verifies(deployment.service.hsm, sealed) and sealed.approval is None
    time.sleep(CACHE)
    with deployment.client(identity, timeout=10) as kms, expecting_no_reply(kms):
        kms.generate_data_key()
    assert counted_above(deployment, identity.caller, 0)
    approved = deployment.register("pol-ok-" + uuid.uuid4().hex[:6], ("generate_data_key",))
    with deployment.client(approved, timeout=30) as kms:  # the same row, approved by the operator: served
        assert kms.generate_data_key()["plaintextKey"]


def test_an_approved_row_put_back_and_re_anchored_with_the_pin_is_refused(
    deployment: Deployment, test_operator: object
) -> None:
    """Issue 25's rollback: whoever holds the token's PIN and the database puts back the caller row from before
    `kmsq caller disable` (approved by the operators then: its evidence verifies) and moves the policy anchor to
    it, as the operator commands do. The workers that honoured the disabled row refuse the older copy
    (worker.high_water); everyone else is still served."""
    identity = deployment.register("pol-hw-" + uuid.uuid4().hex[:6], ("generate_data_key",))
    other = deployment.register("pol-hw-other-" + uuid.uuid4().hex[:6], ("generate_data_key",))
    with deployment.sessions() as db:
        row = db.get(Caller, identity.caller)
        assert row is not None
        enabled = {c.key: getattr(row, c.key) for c in Caller.__table__.columns}
    with deployment.client(identity, timeout=10) as kms, deployment.client(other, timeout=10) as bystander:
        assert kms.generate_data_key()["plaintextKey"]
        disabled = subprocess.run([*kmsq_command(), "caller", "disable", identity.caller], env=deployment.env(),
                                  capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert disabled.returncode == 0, disabled.stderr
        time.sleep(CACHE)
        with pytest.raises(KmsError) as refused:  # every worker of the pool honours the disabled row
            for _ in range(4):
                kms.generate_data_key()
        assert refused.value.code == "unauthenticated"
        before = refusal_counted(deployment, identity.caller)
        set_process_authorizer(None)  # this test process holds the PIN, and no operator key
        try:
            with transaction(deployment.sessions) as db:
                db.execute(update(Caller).where(Caller.name == identity.caller).values(**enabled))
                policy.review(deployment.service.hsm, db, seal_failing=True)  # `kmsq policy seal`: the anchor moves
        finally:
            set_process_authorizer(test_operator)
        with deployment.sessions() as db:
            row = db.get(Caller, identity.caller)
            assert row is not None and row.state == "enabled" and row.approval == enabled["approval"]
            assert policy_anchor.status(deployment.service.hsm, db).matches  # the anchor vouches for it
        time.sleep(CACHE)
        with expecting_no_reply(kms):
            kms.generate_data_key()
        assert counted_above(deployment, identity.caller, before)
        assert bystander.generate_data_key()["plaintextKey"]  # the anchor holds: nobody else is refused
