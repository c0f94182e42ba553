"""Dual control through the commands, on the embedded default (SoftHSM2, SQLite): a deployment adopted by 2 of 3
operators (every one of them approves the adoption, one from a machine of their own), where one operator alone
cannot add a caller but two can, one alone disables it, and every step verifies in the audit chain."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import kmsq_ok as _ok
from tests.conftest import kmsq_refused as _refused
from tests.conftest import run_kmsq, softhsm_library

pytestmark = [pytest.mark.hsm, pytest.mark.process]


def test_two_of_three_operators_through_the_commands(tmp_path: Path) -> None:
    softhsm_library()
    home, keys = tmp_path / "home", tmp_path / "operators"
    for name in ("alice", "bob", "carol"):
        _ok(run_kmsq(home, "operator", "keygen", name, "--dir", str(keys / name), "--no-passphrase"))
    key = {name: str(keys / name / f"{name}.operator.json") for name in ("alice", "bob", "carol")}
    public = ",".join(str(keys / n / f"{n}.operator.pub.json") for n in ("alice", "bob", "carol"))
    report = _ok(run_kmsq(home, "init", "--operators", public, "--quorum", "2", "--json"))
    operators = report["operators"]
    assert isinstance(operators, dict) and operators["set"]["quorum"] == 2
    adoption = str(operators["adoption_proposal"])
    again = _ok(run_kmsq(home, "init", "--operators", public, "--quorum", "2", "--json"))  # idempotent
    assert again["operators"]["adoption_proposal"] == adoption
    _ok(run_kmsq(home, "caller", "keygen", "wallet", "--dir", str(tmp_path / "callers")))
    identity = str(tmp_path / "callers" / "wallet.pub.json")
    add = ("caller", "add", "wallet", "--public-key", identity, "--allow", "generate_data_key", "--all-root-keys")
    _refused(run_kmsq(home, *add, env={"KMSQ_OPERATOR_KEY": key["alice"]}), 9, "no operator set")

    # No worker serves a deployment its operators have not adopted, nor on a host that pins no operator set.
    _refused(run_kmsq(home, "worker", "--concurrency", "1"), 3, "the database has no operator set")
    pinned = (home / "operator-set.json").read_text()
    (home / "operator-set.json").unlink()
    _refused(run_kmsq(home, "worker", "--concurrency", "1"), 3, "no pinned operator set at")
    (home / "operator-set.json").write_text(pinned)

    # The adoption needs every operator: two are not enough; carol signs on a machine of her own.
    for name in ("alice", "bob"):
        _ok(run_kmsq(home, "approve", adoption, "--operator-key", key[name]))
    shown = _ok(run_kmsq(home, "proposals", "show", adoption, "--document", str(tmp_path / "change.json"), "--json"))
    assert shown["state"] == "pending" and set(shown["approved_by"]) == {"alice", "bob"}
    signed = run_kmsq(tmp_path, "operator", "sign", str(tmp_path / "change.json"), "--operator-key", key["carol"])
    (tmp_path / "carol.approval.json").write_text(_ok_text(signed))
    applied = _ok(run_kmsq(home, "approve", adoption, "--approval", str(tmp_path / "carol.approval.json"), "--json"))
    assert applied["state"] == "applied"

    # One operator cannot add a caller; a proposal and a second operator can.
    _refused(run_kmsq(home, *add, env={"KMSQ_OPERATOR_KEY": key["alice"]}), 9, "needs 2 of the 3 operators")
    proposal = _ok(run_kmsq(home, "propose", *add, "--operator-key", key["alice"], "--json"))
    assert proposal["state"] == "pending" and proposal["approved_by"] == ["alice"]
    proposal_id = str(proposal["id"])
    _refused(run_kmsq(home, "approve", proposal_id, "--operator-key", key["alice"]), 6, "already")
    assert "wallet" not in run_kmsq(home, "caller", "list").stdout
    diff = run_kmsq(home, "proposals", "show", proposal_id)
    assert "caller:wallet (new)" in diff.stdout and "allowed_ops: generate_data_key" in diff.stdout
    done = _ok(run_kmsq(home, "approve", proposal_id, "--operator-key", key["bob"], "--json"))
    assert done["state"] == "applied" and set(done["approved_by"]) == {"alice", "bob"}
    listed = _ok(run_kmsq(home, "caller", "list", "--json"))
    assert [c["name"] for c in listed if c["state"] == "enabled"] == ["wallet"]

    # One operator takes away at once, and cannot give back alone.
    _ok(run_kmsq(home, "caller", "disable", "wallet", env={"KMSQ_OPERATOR_KEY": key["carol"]}))
    _refused(run_kmsq(home, "caller", "enable", "wallet", env={"KMSQ_OPERATOR_KEY": key["carol"]}), 9, "propose it")
    carol = {"KMSQ_OPERATOR_KEY": key["carol"]}
    _ok(run_kmsq(home, "pool", "disable", "default", env=carol))  # an incident stopped by one operator
    _refused(run_kmsq(home, "pool", "enable", "default", env=carol), 9, "propose it")
    enable = _ok(run_kmsq(home, "propose", "pool", "enable", "default", "--operator-key", key["carol"], "--json"))
    approved = _ok(run_kmsq(home, "approve", str(enable["id"]), "--operator-key", key["bob"], "--json"))
    assert approved["state"] == "applied"
    assert "enabled" in run_kmsq(home, "pool", "list").stdout
    table = run_kmsq(home, "proposals").stdout
    assert proposal_id in table and adoption in table

    # The set changes by quorum (carol leaves, dave joins): then carol can do nothing, dave what an operator does.
    _ok(run_kmsq(home, "operator", "keygen", "dave", "--dir", str(keys / "dave"), "--no-passphrase"))
    dave = {"KMSQ_OPERATOR_KEY": str(keys / "dave" / "dave.operator.json")}
    new_set = ",".join(str(keys / n / f"{n}.operator.pub.json") for n in ("alice", "bob", "dave"))
    change = _ok(run_kmsq(home, "propose", "operators", "--operators", new_set, "--quorum", "2",
                          "--operator-key", key["alice"], "--json"))  # fmt: skip
    shown_change = run_kmsq(home, "proposals", "show", str(change["id"]))
    assert "-> 2 of 3 (alice, bob, dave)" in shown_change.stdout, shown_change.stdout
    assert "needs 2 of 3 (alice, bob, carol) and, of the new set, 2 of 3 (alice, bob, dave)" in shown_change.stdout
    assert (
        _ok(run_kmsq(home, "approve", str(change["id"]), "--operator-key", key["bob"], "--json"))["state"] == "applied"
    )
    _refused(run_kmsq(home, "caller", "disable", "wallet", env=carol), 9, "no operator key of the current operator set")
    _ok(run_kmsq(home, "pool", "disable", "default", env=dave))
    _refused(run_kmsq(home, "pool", "enable", "default", env=dave), 9, "needs 2 of the 3 operators")

    # Destroying a version needs the quorum; it then waits, and one operator cancels it.
    root = _ok(run_kmsq(home, "root-key", "list", "--json"))[0]["id"]
    _ok(run_kmsq(home, "root-key", "rotate", root, env=dave))  # one operator rotates
    _ok(run_kmsq(home, "root-key", "set", root, "--min-decryption-version", "2", env=dave))  # and raises the minimum
    _ok(run_kmsq(home, "root-key", "rewrap", root, env=dave))
    _refused(run_kmsq(home, "root-key", "destroy-version", root, "1", env=dave), 9, "needs 2 of the 3 operators")
    destroy = _ok(run_kmsq(home, "propose", "root-key", "destroy-version", root, "1", "--wait-days", "3",
                           "--operator-key", str(keys / "dave" / "dave.operator.json"), "--json"))  # fmt: skip
    assert _ok(run_kmsq(home, "approve", str(destroy["id"]), "--operator-key", key["alice"], "--json"))["state"] == (
        "applied")  # fmt: skip
    [listed_key] = _ok(run_kmsq(home, "root-key", "list", "--json"))
    assert [v for v, _ in listed_key["pending_destruction"]] == [1] and listed_key["destroyed_versions"] == []
    _ok(run_kmsq(home, "root-key", "cancel-destroy", root, "1", env={"KMSQ_OPERATOR_KEY": key["bob"]}))

    # Trusting a token needs the quorum too, and the approval is for exactly that token and fingerprint.
    trust = ("hsm", "trust", "hsm-b", "--fingerprint", "ab" * 32)
    _refused(run_kmsq(home, *trust, env=dave), 9, "hsm.trust needs 2 of 3 (alice, bob, dave): propose it")
    proposed = _ok(run_kmsq(home, "propose", *trust, "--operator-key", key["bob"], "--json"))
    shown_trust = run_kmsq(home, "proposals", "show", str(proposed["id"])).stdout
    assert '"token": "hsm-b"' in shown_trust and "kmsq hsm trust NAME --fingerprint F --proposal" in shown_trust
    approved = run_kmsq(home, "approve", str(proposed["id"]), "--operator-key", key["alice"])
    assert approved.returncode == 0 and "approved: now kmsq hsm trust" in approved.stdout, approved.stderr
    _refused(run_kmsq(home, "hsm", "trust", "hsm-b", "--fingerprint", "cd" * 32, "--proposal", str(proposed["id"])),
             9, "approved another operation")  # fmt: skip
    # (no token hsm-b is enrolled here: the trust itself fails, and the approved proposal stays for a retry)
    _refused(run_kmsq(home, *trust, "--proposal", str(proposed["id"])), 3, "hsm-b")
    assert _ok(run_kmsq(home, "proposals", "show", str(proposed["id"]), "--json"))["state"] == "pending"
    [listed_key] = _ok(run_kmsq(home, "root-key", "list", "--json"))
    assert listed_key["pending_destruction"] == [] and listed_key["versions"] == [1, 2]
    verified = run_kmsq(home, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _ok_text(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout
