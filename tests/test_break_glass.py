"""Break glass on the embedded default (SoftHSM2, SQLite): two of a 2-of-3 set's operators are lost, so no quorum
remains; the token's security officer replaces the operator sets with a new genesis (a wrong SO PIN changes
nothing), which the new operator adopts; a worker host still pinning the old set refuses to start, and every
step is in the audit chain."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import kmsq_ok as _ok
from tests.conftest import kmsq_refused as _refused
from tests.conftest import run_kmsq, softhsm_library

pytestmark = [pytest.mark.hsm, pytest.mark.process]


def _operator_sets(home: Path) -> list[str]:
    with sqlite3.connect(home / "kmsq.db") as db:
        return [row[0] for row in db.execute("SELECT digest FROM operator_sets ORDER BY seq")]


def test_the_security_officer_replaces_a_lost_quorum(tmp_path: Path) -> None:
    softhsm_library()
    home, keys = tmp_path / "home", tmp_path / "operators"
    names = ("alice", "bob", "carol", "dave")
    for name in names:
        _ok(run_kmsq(home, "operator", "keygen", name, "--dir", str(keys), "--no-passphrase"))
    key = {n: str(keys / f"{n}.operator.json") for n in names}
    trio = ",".join(str(keys / f"{n}.operator.pub.json") for n in ("alice", "bob", "carol"))
    adoption = _ok(run_kmsq(home, "init", "--operators", trio, "--quorum", "2", "--json"))["operators"]
    for name in ("alice", "bob", "carol"):
        _ok(run_kmsq(home, "approve", str(adoption["adoption_proposal"]), "--operator-key", key[name]))
    old_pin = tmp_path / "old-operator-set.json"
    old_pin.write_text((home / "operator-set.json").read_text())
    before = _operator_sets(home)

    # Alice and bob are gone: carol alone cannot enable what she disables.
    carol = {"KMSQ_OPERATOR_KEY": key["carol"]}
    _ok(run_kmsq(home, "pool", "disable", "default", env=carol))
    _refused(run_kmsq(home, "pool", "enable", "default", env=carol), 9, "needs 2 of the 3 operators")
    waiting = _ok(run_kmsq(home, "propose", "pool", "enable", "default", "--operator-key", key["carol"], "--json"))

    new = str(keys / "dave.operator.pub.json")
    (tmp_path / "wrong.pin").write_text("not-the-so-pin")
    _refused(run_kmsq(home, "break-glass", "--operators", new, "--quorum", "1", "--so-pin-file",
                      str(tmp_path / "wrong.pin"), "--yes"), 3, "wrong security officer PIN")  # fmt: skip
    assert _operator_sets(home) == before  # nothing changed
    _refused(run_kmsq(home, "break-glass", "--operators", new, "--quorum", "1"), 7, "--yes")
    broken = _ok(run_kmsq(home, "break-glass", "--operators", new, "--quorum", "1", "--yes", "--json"))
    assert broken["replaced_sets"] == 1 and broken["replaced_current"] == before[-1]
    assert waiting["id"] in broken["cancelled_proposals"]
    assert _operator_sets(home) == []
    assert "dave" in (home / "operator-set.json").read_text()

    # Dave adopts the deployment; then he alone (1 of 1) enables the pool; carol is no operator any more.
    _ok(run_kmsq(home, "approve", str(broken["adoption_proposal"]), "--operator-key", key["dave"]))
    assert len(_operator_sets(home)) == 1
    _refused(run_kmsq(home, "pool", "enable", "default", env=carol), 9, "no operator key of the current operator set")
    _ok(run_kmsq(home, "pool", "enable", "default", env={"KMSQ_OPERATOR_KEY": key["dave"]}))

    # A worker host that still pins the old set does not start: its administrators must replace the file.
    _refused(run_kmsq(home, "worker", "--concurrency", "1", env={"KMSQ_OPERATOR_SET": str(old_pin)}), 3,
             "not the one this host pins")  # fmt: skip
    tail = _ok(run_kmsq(home, "audit", "tail", "-n", "200", "--json"))
    glass = [r for r in tail if r["action"] == "break glass"]
    assert len(glass) == 1 and "authorized by the token's security officer" in glass[0]["detail"]
    verified = run_kmsq(home, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
