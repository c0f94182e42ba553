"""Backups held M-of-N by custodians (worker.backup) on real SoftHSM2 tokens: token A's keys, backed up for a
backup key of three custodians (two needed), come back in an empty token B and work there as in A; fewer than
two custodians, a backup altered anywhere, a share of another backup key, a wrong fingerprint and a token that
holds other keys under the backup's labels are refused, and each refusal leaves the token as it was. The drill
with workers, Postgres and Redis is tests/test_backup_drill.py."""

from __future__ import annotations

import copy
import gc
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from schemas.custodian import (
    CustodianKey,
    CustodianKeyError,
    key_is_encrypted,
    load_custodian_key,
    new_custodian_key,
)
from tests.test_custody_hsm import SO_PIN, _new_token
from worker import backup
from worker import hsm_custody as custody
from worker.config import Settings
from worker.errors import ConfigError, IntegrityError
from worker.hsm import Hsm
from worker.keystore import RootKeyHandle

pytestmark = pytest.mark.hsm


@dataclass
class Setup:
    a: Hsm
    b: Hsm  # empty: restores go here
    c: Hsm  # empty: refused restores go here (it must stay empty)
    d: Hsm  # holds a policy key of its own
    aes: RootKeyHandle
    rsa: RootKeyHandle
    ec_id: bytes
    ec_point: bytes
    custodians: list[CustodianKey]
    key: backup.BackupKey
    document: dict[str, Any]
    spare: tuple[Hsm, Hsm]  # empty, for the test of two adapters in one process


def _custodian(name: str) -> CustodianKey:
    private, _ = new_custodian_key(name, None)
    return load_custodian_key(private, None)


@pytest.fixture(scope="module")
def setup(hsm_settings: Settings, hsm: Hsm) -> Iterator[Setup]:
    suffix = secrets.token_hex(4)
    a, b, c, d, x, y = (_new_token(hsm_settings, f"backup-{name}-{suffix}") for name in "abcdxy")
    gc.collect()  # python-pkcs11's unfinished object searches end now, while their sessions are still open
    hsm.reread()
    aes, rsa = a.create_aes_root_key("rk-backup-aes", 1), a.create_rsa_root_key("rk-backup-rsa", 1, 2048)
    a.ensure_policy_key()
    d.ensure_policy_key()
    ec_id = f"kmsq-ec-backup-{suffix}".encode()
    point = a.create_ec_signing_key(ec_id)
    custodians = [_custodian(name) for name in ("alice", "bob", "carol")]
    key = backup.new_backup_key(a, [k.custodian for k in custodians], 2, "2026-12-02T00:00:00+00:00")
    custody.trust_transport_key(a, backup.target_name(key.key_id), key.public_der(), SO_PIN, backup=True)
    document, _ = backup.create(a, key, scope=None, anchor=None, created_at="2026-12-02T00:00:01+00:00")
    yield Setup(a, b, c, d, aes, rsa, ec_id, point, custodians, key, document, (x, y))
    for token in (a, b, c, d, x, y):
        token.reset()


def _raw(document: dict[str, Any]) -> bytes:
    return backup.file_text(document)


def _labels(token: Hsm) -> dict[str, str]:
    return {key.label: key.kcv for key in custody.inventory(token)}


def test_two_of_three_custodians_restore_every_key_into_an_empty_token(setup: Setup) -> None:
    wrapped_aes, plain_aes = setup.a.generate_data_key(setup.aes, readable=True)
    wrapped_rsa, plain_rsa = setup.a.generate_data_key(setup.rsa, readable=True)
    mac = setup.a.policy_mac(b"a policy row")
    assert plain_aes is not None and plain_rsa is not None
    alice, _, carol = setup.custodians
    done = backup.restore(setup.b, _raw(setup.document), setup.key.fingerprint, [alice, carol])
    assert sorted(done.restored) == sorted(_labels(setup.a)) and done.already_here == []
    assert _labels(setup.b) == _labels(setup.a)  # the same keys: check values computed in each token
    assert all(key.replicable for key in custody.inventory(setup.b))  # B can pass them on (kmsq hsm trust)
    with setup.b.unwrap_data_key(setup.aes, wrapped_aes) as again:
        assert bytes(again.view()) == bytes(plain_aes.view())
    with setup.b.unwrap_data_key(setup.rsa, wrapped_rsa) as again:
        assert bytes(again.view()) == bytes(plain_rsa.view())
    assert setup.b.policy_mac(b"a policy row") == mac
    digest = secrets.token_bytes(32)
    raw = setup.b.sign_ecdsa(setup.ec_id, digest)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), setup.ec_point)
    public.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")), digest,
                  ec.ECDSA(Prehashed(hashes.SHA256())))  # fmt: skip
    assert setup.b.root_key_attributes(setup.aes)["SENSITIVE"]
    repeated = backup.restore(setup.b, _raw(setup.document), setup.key.fingerprint, [carol, alice])
    assert repeated.restored == [] and sorted(repeated.already_here) == sorted(done.restored)  # idempotent


def _refused(setup: Setup, raw: bytes, keys: list[CustodianKey], match: str, fingerprint: str | None = None) -> None:
    before = _labels(setup.c)
    with pytest.raises((backup.BackupRefused, IntegrityError), match=match):
        backup.restore(setup.c, raw, fingerprint or setup.key.fingerprint, keys)
    assert _labels(setup.c) == before == {}  # nothing written


def test_fewer_than_the_threshold_of_custodians_cannot_restore(setup: Setup) -> None:
    alice, bob, _ = setup.custodians
    _refused(setup, _raw(setup.document), [alice], "needs 2 of its 3 custodians; 1 opened")
    _refused(setup, _raw(setup.document), [alice, alice], "needs 2 of its 3 custodians")  # one custodian, twice
    stranger = _custodian("mallory")
    _refused(setup, _raw(setup.document), [alice, stranger], "'mallory' is not a custodian")
    impostor = CustodianKey("bob", stranger.private)  # bob's name, another key
    _refused(setup, _raw(setup.document), [alice, impostor], "'bob' is not a custodian")
    _refused(setup, _raw(setup.document), [alice, bob], "fingerprint is", fingerprint="00" * 32)


def _at(document: dict[str, Any], path: tuple[Any, ...], change: Callable[[Any], Any]) -> dict[str, Any]:
    altered = copy.deepcopy(document)
    node: Any = altered
    for part in path[:-1]:  # in the copies, a kind stands for the copy of that kind
        node = node[next(i for i, c in enumerate(node) if c["kind"] == part) if part in KINDS else part]
    node[path[-1]] = change(node[path[-1]])
    return altered


def _flip(text: str) -> str:
    """One character changed, still base64url."""
    return text[:-3] + ("A" if text[-3] != "A" else "B") + text[-2:]


KINDS = (custody.AES_ROOT, custody.POLICY_KEY)
FILE, KEY = "the backup file does not verify", "the backup key does not verify"
# What is changed, and the refusal it meets (the first check that sees it).
ALTERATIONS: dict[str, tuple[tuple[Any, ...], Callable[[Any], Any], str]] = {
    "a copy's wrapped key": (("body", "copies", custody.AES_ROOT, "wrapped"), _flip, FILE),
    "the policy key's copy": (
        ("body", "copies", custody.POLICY_KEY, "wrapped"),
        _flip,
        "integrity check",
    ),  # does not unwrap
    "a copy's label": (("body", "copies", custody.AES_ROOT, "label"), lambda label: label + "x", FILE),
    "a copy's check value": (("body", "copies", custody.AES_ROOT, "kcv"), lambda kcv: "0" * len(kcv), FILE),
    "a copy dropped": (("body", "copies"), lambda copies: copies[:-1], FILE),
    "the creation time": (("body", "created_at"), lambda _: "2020-01-01T00:00:00+00:00", FILE),
    "the policy anchor": (("body", "anchor"), lambda _: "e30", FILE),
    "the file's MAC": (("mac",), lambda mac: "0" * len(mac), FILE),
    "the threshold": (("body", "backup_key", "threshold"), lambda _: 1, "shares do not combine"),
    "a custodian's share": (("body", "backup_key", "custodians", 0, "share"), _flip, "does not open"),
    "the sealed private key": (("body", "backup_key", "sealed_private"), _flip, KEY),
    "the policy check value": (("body", "backup_key", "policy_check"), lambda v: "0" * len(v), KEY),
    "the backup key's MAC": (("body", "backup_key", "mac"), lambda mac: "0" * len(mac), KEY),
    "the backup key's creation time": (("body", "backup_key", "created_at"), lambda _: "2020", KEY),
}


@pytest.mark.parametrize("alteration", sorted(ALTERATIONS))
def test_a_backup_altered_anywhere_is_refused_and_nothing_is_written(setup: Setup, alteration: str) -> None:
    path, change, refusal = ALTERATIONS[alteration]
    alice, bob, _ = setup.custodians
    _refused(setup, _raw(_at(setup.document, path, change)), [alice, bob], refusal)


def test_shares_of_another_backup_key_do_not_open_this_one(setup: Setup) -> None:
    alice, bob, carol = setup.custodians
    other = backup.new_backup_key(setup.a, [k.custodian for k in setup.custodians], 2, "2026-12-02T00:00:02+00:00")
    mixed = _at(setup.document, ("body", "backup_key", "custodians", 1, "share"),
                lambda _: other.custodians[1]["share"])  # fmt: skip
    _refused(setup, _raw(mixed), [alice, bob], "does not open")  # sealed for the other key's id
    _refused(setup, _raw(mixed), [alice, carol], "does not verify")  # bob's share unused, but under the key's MAC
    assert setup.key.key_id != other.key_id


def test_a_token_holding_other_keys_under_those_labels_is_refused_before_anything_is_written(setup: Setup) -> None:
    alice, bob, _ = setup.custodians
    before = _labels(setup.d)
    with pytest.raises(ConfigError, match="already holds another key labelled 'kmsq-policy-v1'; nothing was restored"):
        backup.restore(setup.d, _raw(setup.document), setup.key.fingerprint, [alice, bob])
    assert _labels(setup.d) == before


def test_a_backup_key_file_round_trips_and_another_deployment_is_told_apart(setup: Setup) -> None:
    parsed = backup.BackupKey.from_document(json.loads(json.dumps(setup.key.document())))
    assert parsed == setup.key
    backup.check_for_this_deployment(setup.a, parsed, setup.key.fingerprint)
    with pytest.raises(backup.BackupRefused, match="not made for this deployment"):
        backup.check_for_this_deployment(setup.d, parsed, setup.key.fingerprint)  # another policy key
    with pytest.raises(backup.BackupRefused, match="fingerprint is"):
        backup.check_for_this_deployment(setup.a, parsed, "ab" * 32)
    with pytest.raises(ConfigError, match="threshold is 1 to the number of custodians"):
        backup.new_backup_key(setup.a, [k.custodian for k in setup.custodians], 4, "now")
    with pytest.raises(ConfigError, match="each custodian appears once"):
        backup.new_backup_key(setup.a, [setup.custodians[0].custodian] * 2, 1, "now")


def test_a_custodian_key_under_a_passphrase_opens_only_with_it() -> None:
    private, public = new_custodian_key("dora", b"correct horse")
    assert key_is_encrypted(private) and "PRIVATE KEY" in private and "dora" in public
    assert load_custodian_key(private, b"correct horse").name == "dora"
    with pytest.raises(CustodianKeyError, match="wrong passphrase"):
        load_custodian_key(private, b"wrong horse")
    with pytest.raises(CustodianKeyError, match="name is 1-64 characters"):
        new_custodian_key("Dora Smith", None)


def test_an_adapter_never_runs_on_another_tokens_session_after_the_library_is_read_again(setup: Setup) -> None:
    # Found building this file: a key looked up and not found makes an adapter re-initialize the library (to see
    # objects other processes made); another adapter's session from before then had a handle that named the new
    # session, on the other token, and its keys went there. Now a session from before a re-initialization is
    # never used.
    x, y = setup.spare
    x.create_aes_root_key("rk-backup-x", 1)
    assert x.ensure_policy_key() and y.ensure_policy_key()  # each not found first: the library re-initialized
    assert {k.kind for k in custody.inventory(x)} == {custody.AES_ROOT, custody.POLICY_KEY}
    assert {k.kind for k in custody.inventory(y)} == {custody.POLICY_KEY}
    assert x.policy_mac(b"x") != y.policy_mac(b"x")
