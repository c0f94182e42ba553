"""`kmsq hsm replicate` while the token's worker replicates too: the two insert the same copy rows at the same moment
and one transaction fails with a unique-key violation (a fresh-clone CI run of tests/test_custody_pool.py: "internal
error (IntegrityError)"). The command runs again, seeing the other's rows, instead of failing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.exc import IntegrityError

from kmsq.commands import hsm as hsm_command
from worker import policy_anchor, replication
from worker.replication import Replication
from worker.storage import db as storage_db


@contextmanager
def _no_database(_: object) -> Iterator[object]:
    yield object()


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(hsm_command, "service", lambda: type("Svc", (), {"sessions": None})())
    monkeypatch.setattr(hsm_command, "token_of", lambda svc: object())
    monkeypatch.setattr(storage_db, "transaction", _no_database)
    monkeypatch.setattr(policy_anchor, "deployment_id", lambda db: "d")
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # (the command waits between attempts)
    return calls


def _replicate_failing(times: int, calls: list[int]) -> Any:
    def run(hsm: object, db: object, scope: object) -> Replication:
        calls.append(1)
        if len(calls) <= times:
            raise IntegrityError("INSERT INTO key_copies", {}, Exception("duplicate key value"))
        return Replication("tok", exported={"other": 3})

    return run


def test_a_race_with_the_workers_replication_is_run_again(patched: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "replicate", _replicate_failing(2, patched))
    result = CliRunner().invoke(hsm_command.hsm_group, ["replicate", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["exported"] == {"other": 3} and len(patched) == 3


def test_a_violation_that_stays_is_still_an_error(patched: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "replicate", _replicate_failing(99, patched))
    result = CliRunner().invoke(hsm_command.hsm_group, ["replicate"])
    assert result.exit_code != 0 and len(patched) == hsm_command.REPLICATE_ATTEMPTS
