"""schemas.quorum: operator identities, operator sets, and which approvals of a change count."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.quorum import (
    Approval,
    OperatorIdentity,
    OperatorSet,
    QuorumError,
    approve,
    change_digest,
    expiry_of,
    read_operator,
    tally,
)
from tests.conftest import run_kmsq

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def three() -> tuple[list[OperatorIdentity], OperatorSet]:
    identities = [OperatorIdentity.generate(name) for name in ("alice", "bob", "carol")]
    return identities, OperatorSet(tuple(i.public for i in identities), 2)


def _change(**extra: object) -> dict[str, object]:
    return {"kind": "kmsq-change", "v": 1, "action": "caller.add", "target": "caller:w",
            "expires_at": (NOW + timedelta(hours=24)).isoformat()} | extra  # fmt: skip


def test_identity_files_round_trip_and_the_private_one_is_private(tmp_path: Path) -> None:
    identity = OperatorIdentity.generate("alice")
    private, public = identity.write(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert OperatorIdentity.load(private).public == identity.public == read_operator(public)
    assert "signing" not in repr(identity) and json.loads(public.read_text())["key_id"] == identity.public.key_id
    with pytest.raises(QuorumError, match="already exists"):
        identity.write(tmp_path)
    with pytest.raises(QuorumError, match="not a kmsq-operator-public"):
        read_operator(private)


@pytest.mark.parametrize("name", ["", "Alice", "a b", "x" * 65])
def test_bad_operator_names_are_refused(name: str) -> None:
    with pytest.raises(QuorumError, match="operator names"):
        OperatorIdentity.generate(name)


def test_an_operator_set_needs_distinct_operators_and_a_quorum_it_can_reach(
    three: tuple[list[OperatorIdentity], OperatorSet],
) -> None:
    identities, operators = three
    publics = tuple(i.public for i in identities)
    assert operators.describe() == "2 of 3 (alice, bob, carol)"
    assert OperatorSet.from_document(operators.document()) == operators
    assert OperatorSet(publics[::-1], 2).digest == operators.digest  # the order does not matter
    assert OperatorSet(publics, 3).digest != operators.digest
    for quorum in (0, 4, True, "2"):
        with pytest.raises(QuorumError, match="quorum"):
            OperatorSet(publics, quorum)  # type: ignore[arg-type]
    with pytest.raises(QuorumError, match="repeat"):
        OperatorSet((publics[0], publics[0]), 1)
    with pytest.raises(QuorumError, match="share a key"):
        OperatorSet((publics[0], type(publics[0])("dave", publics[0].signing_key)), 1)
    with pytest.raises(QuorumError, match="1 to 32"):
        OperatorSet((), 1)


def test_two_of_three_count_and_one_does_not(three: tuple[list[OperatorIdentity], OperatorSet]) -> None:
    (alice, bob, _), operators = three
    document = _change()
    digest = change_digest(document)
    one = tally(digest, expiry_of(document), [approve(alice, digest, NOW)], operators)
    assert not one.met and one.counted == ("alice",)
    two = tally(digest, expiry_of(document), [approve(alice, digest, NOW), approve(bob, digest, NOW)], operators)
    assert two.met and set(two.counted) == {"alice", "bob"} and not two.refused


def test_what_does_not_count(three: tuple[list[OperatorIdentity], OperatorSet]) -> None:
    (alice, bob, carol), operators = three
    document = _change()
    digest, expires = change_digest(document), expiry_of(document)
    other = change_digest(_change(target="caller:x"))
    mallory = OperatorIdentity.generate("mallory")
    forged = approve(mallory, digest, NOW)
    impostor = Approval("carol", carol.public.key_id, digest, forged.approved_at, forged.signature)
    backdated = approve(bob, digest, expires + timedelta(seconds=1))
    tampered = Approval("bob", bob.public.key_id, digest, NOW.isoformat(), approve(bob, other, NOW).signature)
    result = tally(digest, expires, [
        approve(alice, digest, NOW), approve(alice, digest, NOW + timedelta(minutes=1)),  # the same operator twice
        approve(bob, other, NOW),  # over another digest
        backdated,  # after the expiry
        forged,  # not in the set
        impostor,  # in carol's name, mallory's signature
        Approval("bob", carol.public.key_id, digest, NOW.isoformat(), "x"),  # another operator's key id
        tampered,  # bob's signature over another digest, presented for this one
    ], operators)  # fmt: skip
    assert result.counted == ("alice",) and not result.met
    assert [reason for _, reason in result.refused] == [
        "a second approval by the same operator",
        "for another change",
        "made after the change expired",
        "not in the operator set",
        "a signature that does not verify",
        "not the operator's key",
        "a signature that does not verify",
    ]


def test_an_approval_survives_its_json_form(three: tuple[list[OperatorIdentity], OperatorSet]) -> None:
    (alice, bob, _), operators = three
    document = _change()
    digest = change_digest(document)
    approvals = [
        Approval.from_document(json.loads(json.dumps(approve(i, digest, NOW).document()))) for i in (alice, bob)
    ]
    assert tally(digest, expiry_of(document), approvals, operators).met
    with pytest.raises(QuorumError, match="malformed approval"):
        Approval.from_document({"operator": "alice"})
    with pytest.raises(QuorumError, match="time zone"):
        expiry_of(_change(expires_at="2026-12-04T00:00:00"))


@pytest.mark.process
def test_kmsq_operator_keygen_writes_the_pair_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = run_kmsq(tmp_path, "operator", "keygen", "alice", "--dir", str(tmp_path / "ops"), "--no-passphrase",
                      "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    identity = OperatorIdentity.load(Path(written["identity"]))
    assert written["key_id"] == identity.public.key_id == read_operator(Path(written["public"])).key_id
    again = run_kmsq(tmp_path, "operator", "keygen", "alice", "--dir", str(tmp_path / "ops"), "--no-passphrase")
    assert again.returncode == 3 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    bad = run_kmsq(tmp_path, "operator", "keygen", "Alice", "--no-passphrase")
    assert bad.returncode == 3 and "operator names" in bad.stderr


@pytest.mark.process
def test_an_operator_key_encrypted_under_a_passphrase(tmp_path: Path) -> None:
    """keygen encrypts the key unless told not to; the file holds no key in the clear; signing needs the
    passphrase (KMSQ_OPERATOR_PASSPHRASE_FILE here; a terminal asks), and a wrong one opens nothing."""
    (tmp_path / "pass").write_text("correct horse battery staple\n")
    (tmp_path / "wrong").write_text("tr0ub4dor&3\n")
    made = run_kmsq(tmp_path, "operator", "keygen", "bob", "--dir", str(tmp_path / "ops"), "--passphrase-file",
                    str(tmp_path / "pass"), "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    written = json.loads(made.stdout)
    private = Path(written["identity"])
    document = json.loads(private.read_text())
    assert written["encrypted"] and document["encrypted"] and "signing_key" not in document
    assert "ENCRYPTED PRIVATE KEY" in document["private_key"] and private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(QuorumError, match="is encrypted: give its passphrase"):
        OperatorIdentity.load(private)
    with pytest.raises(QuorumError, match="wrong passphrase"):
        OperatorIdentity.load(private, lambda _: b"tr0ub4dor&3")
    identity = OperatorIdentity.load(private, lambda _: b"correct horse battery staple")
    assert identity.public.key_id == written["key_id"]
    change = tmp_path / "change.json"
    change.write_text(json.dumps(_change()))
    sign = ("operator", "sign", str(change), "--operator-key", str(private))
    refused = run_kmsq(tmp_path, *sign)  # no terminal, no passphrase file
    assert refused.returncode == 3 and "is encrypted: give its passphrase" in refused.stderr, refused.stderr
    wrong = run_kmsq(tmp_path, *sign, env={"KMSQ_OPERATOR_PASSPHRASE_FILE": str(tmp_path / "wrong")})
    assert wrong.returncode == 3 and "wrong passphrase" in wrong.stderr, wrong.stderr
    signed = run_kmsq(tmp_path, *sign, env={"KMSQ_OPERATOR_PASSPHRASE_FILE": str(tmp_path / "pass")})
    assert signed.returncode == 0, signed.stderr
    approval = Approval.from_document(json.loads(signed.stdout))
    assert approval.operator == "bob" and approval.key_id == written["key_id"]
