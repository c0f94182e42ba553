"""Signing rules through the commands under dual control (issue 26), on the embedded default (SoftHSM2, SQLite): a
deployment of 2 of 3 operators starts with no default rules (said by kmsq init); a first default, and any change
that allows more, needs the quorum (a proposal and a second operator); tightening is one operator's; a malformed
document is refused with the field at fault; every change is in the audit chain, which verifies."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import kmsq_ok as _ok
from tests.conftest import kmsq_refused as _refused
from tests.conftest import run_kmsq, softhsm_library

pytestmark = [pytest.mark.hsm, pytest.mark.process]


def test_rules_change_by_quorum_and_tighten_by_one_operator(tmp_path: Path) -> None:
    softhsm_library()
    home, keys = tmp_path / "home", tmp_path / "operators"
    for name in ("alice", "bob", "carol"):
        _ok(run_kmsq(home, "operator", "keygen", name, "--dir", str(keys), "--no-passphrase"))
    key = {name: str(keys / f"{name}.operator.json") for name in ("alice", "bob", "carol")}
    public = ",".join(str(keys / f"{n}.operator.pub.json") for n in ("alice", "bob", "carol"))
    report = _ok(run_kmsq(home, "init", "--operators", public, "--quorum", "2", "--json"))
    assert report["signing_rules_default"].startswith("not set: no key signs")
    for name in ("alice", "bob", "carol"):
        _ok(run_kmsq(home, "approve", str(report["operators"]["adoption_proposal"]), "--operator-key", key[name]))

    def as_(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_kmsq(home, *args, env={"KMSQ_OPERATOR_KEY": key[name]})

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"max_payment": 100_000_000, "window": {"seconds": 86400, "max_payment": 10**9}}))
    tighter = tmp_path / "tighter.json"
    tighter.write_text(json.dumps({"max_payment": 50_000_000, "window": {"seconds": 86400, "max_payment": 10**9}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"max_payment": -5}))

    _refused(as_("alice", "signing-rules", "set", "--default", "--rules", str(bad)), 7, "max_payment")
    _refused(as_("alice", "signing-rules", "set", "--default", "--rules", str(rules)), 9, "needs 2 of the 3 operators")
    proposal = _ok(run_kmsq(home, "propose", "signing-rules", "set", "--default", "--rules", str(rules),
                            "--operator-key", key["alice"], "--json"))  # fmt: skip
    assert proposal["state"] == "pending"
    assert _ok(run_kmsq(home, "signing-rules", "list", "--json")) == []
    done = _ok(run_kmsq(home, "approve", str(proposal["id"]), "--operator-key", key["bob"], "--json"))
    assert done["state"] == "applied"
    listed = _ok(run_kmsq(home, "signing-rules", "list", "--json"))
    assert listed == [{"scope": "default", "rules": json.loads(rules.read_text()), "members": []}]

    # Tightening is one operator's; loosening back is refused to one operator.
    _ok(as_("carol", "signing-rules", "set", "--default", "--rules", str(tighter)))
    _refused(as_("carol", "signing-rules", "set", "--default", "--rules", str(rules)), 9, "needs 2 of the 3 operators")
    _refused(as_("carol", "signing-rules", "set", "--default", "--none"), 9, "needs 2 of the 3 operators")
    # A coin's rules bind on top of the key's: one operator adds them.
    _ok(as_("carol", "signing-rules", "set", "--coin", "btc", "--rules", str(tighter)))
    assert {r["scope"] for r in _ok(run_kmsq(home, "signing-rules", "list", "--json"))} == {"default", "coin:btc"}

    # kmsq signing-key adopt: keys named or --all, a registered owner; with no ownerless key it changes nothing.
    _refused(run_kmsq(home, "signing-key", "adopt", "--owner", "nobody", "--all"), 5, "no caller 'nobody'")
    _ok(run_kmsq(home, "caller", "keygen", "wm", "--dir", str(tmp_path)))
    added = _ok(run_kmsq(home, "propose", "caller", "add", "wm", "--public-key", str(tmp_path / "wm.pub.json"),
                         "--allow", "sign", "--all-root-keys", "--operator-key", key["alice"], "--json"))  # fmt: skip
    approved = _ok(run_kmsq(home, "approve", str(added["id"]), "--operator-key", key["bob"], "--json"))
    assert approved["state"] == "applied"
    adopted = _ok(run_kmsq(home, "signing-key", "adopt", "--owner", "wm", "--all", "--json"))
    assert (adopted["owner"], adopted["adopted"], adopted["left"]) == ("wm", [], [])

    records = _ok(run_kmsq(home, "audit", "tail", "-n", "500", "--json"))
    assert [r["action"] for r in records].count("signing rules set") == 3
    verified = run_kmsq(home, "audit", "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout
