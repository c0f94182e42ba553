"""Token signing keys no row names (issue 22, item 5) on the test run's SoftHSM2 token: one signed ``in_hsm``
generation pushed again leaves one key pair (it left one per delivery: 20 redeliveries, 21 key pairs), two
deliveries racing on Postgres leave one, a generation that rolls back after making its key destroys it, and
``kmsq signing-key orphans`` lists a key no row names and removes it, keeping the named ones."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select

from tests.conftest import run_kmsq, softhsm_library
from tests.unit_fixtures import Unit, UnitTemplate, answer, units
from worker import signing, token_keys
from worker.errors import Conflict, HsmUnavailable, TransientError
from worker.hsm import Hsm
from worker.storage.models import AuditRecord, PrivateKey

ROOT = Path(__file__).resolve().parent.parent
GENERATE = {"op": "generate_signing_key", "coin": "hteth", "source": "user", "type": "independent", "in_hsm": True}


@pytest.fixture
def token_unit(tmp_path: Path, hsm: Hsm, unit_template: UnitTemplate) -> Iterator[Unit]:
    yield from units(tmp_path, hsm, unit_template.schema)


def labels(hsm: Hsm) -> set[str]:
    """The token's kmsq signing keys (read again: another process may have made or removed some)."""
    return {label for label in hsm.ec_signing_keys() if label.startswith(token_keys.LABEL_PREFIX)}


def test_a_generation_pushed_again_twenty_times_leaves_one_key_pair(token_unit: Unit, hsm: Hsm) -> None:
    codec = token_unit.register("full")
    request, args = codec.build_request(GENERATE, "alpha")
    before = labels(hsm)
    first = answer(codec, token_unit.handle_args(request, args))
    for _ in range(20):
        assert answer(codec, token_unit.handle_args(request, args)) == first
    assert len(labels(hsm) - before) == 1  # was 21
    assert token_unit.count(PrivateKey) == 1


def test_a_generation_that_rolls_back_after_making_its_key_destroys_it(
    token_unit: Unit, hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = token_unit.register("full")
    request, args = codec.build_request(GENERATE, "alpha")
    before = labels(hsm)

    def seal_fails(*args: Any) -> Any:  # the row's seal, after the key is made
        raise HsmUnavailable()

    monkeypatch.setattr(hsm, "seal", seal_fails)
    with pytest.raises(HsmUnavailable):
        token_unit.handle_args(request, args)
    monkeypatch.undo()
    assert labels(hsm) == before and token_unit.count(PrivateKey) == 0
    answer(codec, token_unit.handle_args(request, args))  # the task's retry
    assert len(labels(hsm) - before) == 1


@pytest.fixture
def pg_unit(tmp_path: Path, hsm: Hsm, pg_engine: Engine) -> Iterator[Unit]:
    yield from units(tmp_path, hsm, url=pg_engine.url.render_as_string(hide_password=False))


def test_two_deliveries_racing_on_postgres_leave_one_key_pair(
    pg_unit: Unit, hsm: Hsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both look for the record before either has one, both make a key; the loser waits on the record's insert,
    finds it, rolls back and destroys its key. (On SQLite a transaction begins IMMEDIATE: a duplicate waits for the
    first to commit and then finds the record before it touches the token.)"""
    unit = pg_unit
    codec = unit.register("full")
    request, args = codec.build_request(GENERATE, "alpha")
    both_made = threading.Barrier(2, timeout=30)
    create = hsm.create_ec_signing_key

    def create_then_wait(key_id: bytes) -> bytes:
        point = create(key_id)
        both_made.wait()
        return point

    def deliver(_: int) -> Any:
        for _attempt in range(5):  # as the task retries a transient failure
            try:
                return unit.handle_args(request, args)
            except TransientError:
                continue
        raise AssertionError("no delivery succeeded")

    before = labels(hsm)
    monkeypatch.setattr(hsm, "create_ec_signing_key", create_then_wait)
    with ThreadPoolExecutor(2) as pool:
        deliveries = list(pool.map(deliver, range(2)))
    monkeypatch.undo()
    first, second = (answer(codec, delivery) for delivery in deliveries)
    assert first == second
    assert len(labels(hsm) - before) == 1 and unit.count(PrivateKey) == 1


def test_removal_is_refused_on_a_token_that_serves_another_database(token_unit: Unit, hsm: Hsm) -> None:
    """Another database's rows name keys this one cannot see: the test run's token is such a token."""
    hsm.write_policy_anchor("kmsq-test-other-" + secrets.token_hex(8), b"another database's anchor", [])
    lost = signing.token_key_id(bytearray(secrets.token_bytes(16)))
    hsm.create_ec_signing_key(lost)
    listed = token_keys.find_orphans(hsm, token_unit.service.sessions)
    assert listed.other_databases >= 1 and lost.decode() in listed.orphans
    with pytest.raises(Conflict, match=r"the token serves \d+ other kmsq database"):
        token_keys.remove_orphans(hsm, token_unit.service.sessions, "alpha", grace=0)
    assert lost.decode() in labels(hsm)
    hsm.destroy_ec_signing_key(lost)


# A step on the private deployment of the command test, in a process of its own (this process's SoftHSM2 library is
# the test run's token's).
_IN_HOME = """
import json, secrets, sys
from worker import service, signing
from worker.config import load_settings
from worker.runtime import KeyService
from worker.storage.db import transaction

keys = KeyService.from_settings(load_settings())
out = {}
if sys.argv[1] == "make":
    with transaction(keys.sessions) as db:  # a named key, as a worker commits it
        made = service.generate_signing_key(keys.hsm, db, coin="hteth", source="user", type="independent",
                                            in_hsm=True, pool=keys.default_pool)
    lost = signing.token_key_id(bytearray(secrets.token_bytes(16)))
    keys.hsm.create_ec_signing_key(lost)  # as a worker that stopped before committing its row leaves one
    out = {"pub": made.pub, "lost": lost.decode()}
else:
    with transaction(keys.sessions) as db:
        signed = service.sign_payload(keys.hsm, db, pub=sys.argv[2], source="user", payload="0x" + "22" * 32,
                                      algorithm="ecdsa", caller="operator")
    out = {"signature": signed.signature}
out["labels"] = keys.hsm.ec_signing_keys()
print(json.dumps(out))
"""


def _in_home(home: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KMSQ_", "SOFTHSM2_"))} | {"KMSQ_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", _IN_HOME, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.process
def test_the_orphans_command_lists_and_removes_a_key_no_row_names(tmp_path: Path) -> None:
    softhsm_library()
    home = tmp_path / "home"
    assert run_kmsq(home, "init", "--json").returncode == 0
    made = _in_home(home, "make")
    lost, [kept] = made["lost"], [label for label in made["labels"] if label != made["lost"]]

    listed = run_kmsq(home, "signing-key", "orphans", "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert (report["orphans"], report["token_keys"], report["named"]) == ([lost], 2, 1)
    assert report["removed"] == report["unreadable"] == report["missing"] == [] and report["other_databases"] == 0

    human = run_kmsq(home, "signing-key", "orphans")
    assert (
        human.returncode == 0
        and lost in human.stdout
        and "2 signing keys in the token, 1 named by a row, 1 named by none" in human.stdout
    )

    removed = run_kmsq(home, "signing-key", "orphans", "--remove", "--grace", "0", "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] == [lost]
    after = _in_home(home, "sign", made["pub"])
    assert after["labels"] == [kept] and after["signature"].startswith("0x")  # the named key is there, and signs
    engine = create_engine(f"sqlite:///{home / 'kmsq.db'}")
    with engine.connect() as db:
        records = db.execute(select(AuditRecord.detail, AuditRecord.pool).where(
            AuditRecord.action == token_keys.REMOVE_ACTION)).all()  # fmt: skip
    engine.dispose()
    assert [tuple(r) for r in records] == [(lost, "default")]
    again = run_kmsq(home, "signing-key", "orphans", "--remove", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["orphans"] == []  # nothing left, no wait
