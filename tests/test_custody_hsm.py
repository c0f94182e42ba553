"""Key custody on real SoftHSM2 tokens (worker.hsm_custody): token B's keys come from token A only wrapped for a
transport key A's security officer trusts, and work in B exactly as in A. Two tokens of the test run's token
directory stand for two HSMs here (the processes and directories of a real pool are tested with the workers)."""

from __future__ import annotations

import dataclasses
import gc
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, ObjectClass
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from schemas.wire import b64u, from_b64u
from tasks.identity import CallerIdentity
from tests.conftest import TEST_OPERATORS, approved_at
from tests.unit_fixtures import UnitTemplate, copy_of_schema
from worker import callers, policy_anchor, replication, schedule
from worker import hsm_custody as custody
from worker.config import Settings
from worker.errors import ConfigError, HsmError, IntegrityError
from worker.hsm import Hsm
from worker.keystore import RootKeyHandle
from worker.policy import PolicyNotAnchored, TrustedRows
from worker.runtime import KeyService
from worker.storage.db import session_factory, transaction
from worker.storage.models import KeyCopy, RootKeyVersion

PIN, SO_PIN = "1234-user", "5678-officer"


@dataclass
class Pair:
    a: Hsm
    b: Hsm
    b_name: str
    aes: RootKeyHandle
    rsa: RootKeyHandle
    ec_id: bytes
    ec_point: bytes


def _new_token(settings: Settings, label: str) -> Hsm:
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
        env={"SOFTHSM2_CONF": str(settings.softhsm2_conf), "PATH": "/usr/bin:/bin"}, check=True, capture_output=True,
    )  # fmt: skip
    return Hsm(settings.module_path(), label, lambda: PIN, settings.softhsm2_conf)


@pytest.fixture(scope="module")
def pair(hsm_settings: Settings, hsm: Hsm) -> Iterator[Pair]:
    """Tokens A (with an AES and an RSA root key, the policy key and a signing key) and B (enrolled: its
    transport key made), in the run's token directory."""
    suffix = secrets.token_hex(4)
    a, b = _new_token(hsm_settings, f"custody-a-{suffix}"), _new_token(hsm_settings, f"custody-b-{suffix}")
    gc.collect()  # python-pkcs11's unfinished object searches end now, while their sessions are still open
    hsm.reread()  # the library re-reads the directory (the run's own adapter logs in again on next use)
    aes, rsa = a.create_aes_root_key("rk-custody-aes", 1), a.create_rsa_root_key("rk-custody-rsa", 1, 2048)
    a.ensure_policy_key()
    ec_id = f"kmsq-ec-{suffix}".encode()
    point = a.create_ec_signing_key(ec_id)
    yield Pair(a, b, b.token_serial(), aes, rsa, ec_id, point)
    for token in (a, b):
        token.reset()


def _trusted(pair: Pair) -> list[custody.WrappedKey]:
    der, _ = custody.ensure_transport_key(pair.b)
    custody.trust_transport_key(pair.a, pair.b_name, der, SO_PIN)
    return custody.export_keys(pair.a, pair.b_name)


def test_a_transport_key_is_made_once_and_its_fingerprint_is_stable(pair: Pair) -> None:
    der, made = custody.ensure_transport_key(pair.b)
    again, made_again = custody.ensure_transport_key(pair.b)
    assert der == again and not made_again
    shown = custody.fingerprint(der)
    assert len(shown) == 79 and shown.count(":") == 15
    attributes = pair.b.run(lambda s: dict(
        (name, s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=custody.TRANSPORT_LABEL)[getattr(Attribute, name)])
        for name in ("SENSITIVE", "EXTRACTABLE", "UNWRAP", "DECRYPT", "SIGN")
    ))  # fmt: skip
    assert attributes == {"SENSITIVE": True, "EXTRACTABLE": False, "UNWRAP": True, "DECRYPT": False, "SIGN": False}
    assert made or not made_again


def test_only_the_security_officer_can_trust_a_transport_key(pair: Pair) -> None:
    der, _ = custody.ensure_transport_key(pair.b)
    with pytest.raises(ConfigError, match="not trusted by this token"):
        custody.export_keys(pair.a, "nobody-trusted-this")
    with pytest.raises(ConfigError, match="wrong security officer PIN"):
        custody.trust_transport_key(pair.a, pair.b_name, der, "not-the-so-pin")
    modulus, exponent = custody._rsa_numbers(der)
    with pytest.raises(HsmError, match="AttributeReadOnly"):  # a user session cannot mark a key trusted
        pair.a.run(lambda s: s.create_object({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: modulus,
            Attribute.PUBLIC_EXPONENT: exponent, Attribute.TOKEN: False, Attribute.WRAP: True, Attribute.TRUSTED: True,
        }))  # fmt: skip
    assert custody.trust_transport_key(pair.a, pair.b_name, der, SO_PIN) in (True, False)
    assert not custody.trust_transport_key(pair.a, pair.b_name, der, SO_PIN)  # idempotent
    assert pair.b_name in custody.trusted_targets(pair.a)
    other = custody.ensure_transport_key(pair.a)[0]  # a different key under B's name is refused
    with pytest.raises(ConfigError, match="another transport key is already trusted"):
        custody.trust_transport_key(pair.a, pair.b_name, other, SO_PIN)


def test_every_key_arrives_in_b_and_works_there_as_in_a(pair: Pair) -> None:
    wrapped_aes, plain_aes = pair.a.generate_data_key(pair.aes, readable=True)
    wrapped_rsa, plain_rsa = pair.a.generate_data_key(pair.rsa, readable=True)
    mac = pair.a.policy_mac(b"a policy row")
    copies = _trusted(pair)
    kinds = {copy.kind for copy in copies}
    assert {custody.AES_ROOT, custody.RSA_ROOT, custody.POLICY_KEY, custody.EC_SIGNING, custody.REPLICATION} <= kinds
    assert custody.import_keys(pair.b, copies)
    in_a = {key.label: key.kcv for key in custody.inventory(pair.a)}
    in_b = {key.label: key.kcv for key in custody.inventory(pair.b)}
    assert in_b == in_a  # every key, each with the same check value, computed in each token
    assert all(key.replicable for key in custody.inventory(pair.b))  # B can pass them on once its SO trusts C
    assert plain_aes is not None and plain_rsa is not None
    with pair.b.unwrap_data_key(pair.aes, wrapped_aes) as again:
        assert bytes(again.view()) == bytes(plain_aes.view())
    with pair.b.unwrap_data_key(pair.rsa, wrapped_rsa) as again:
        assert bytes(again.view()) == bytes(plain_rsa.view())
    assert pair.b.policy_mac(b"a policy row") == mac
    digest = secrets.token_bytes(32)
    raw = pair.b.sign_ecdsa(pair.ec_id, digest)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), pair.ec_point)
    public.verify(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")), digest,
                  ec.ECDSA(Prehashed(hashes.SHA256())))  # fmt: skip
    attributes = pair.b.root_key_attributes(pair.aes)
    assert attributes["SENSITIVE"] and attributes["WRAP_WITH_TRUSTED"] and attributes["EXTRACTABLE"]
    assert pair.b.ec_signing_key_attributes(pair.ec_id)["SENSITIVE"]
    assert custody.import_keys(pair.b, copies) == []  # already there, same check values: nothing to do


def test_a_tampered_or_misaddressed_copy_leaves_nothing(pair: Pair, hsm_settings: Settings) -> None:
    copies = _trusted(pair)
    c = _new_token(hsm_settings, f"custody-c-{secrets.token_hex(4)}")
    gc.collect()  # python-pkcs11's unfinished object searches end now, while their sessions are still open
    c.reread()
    for token in (pair.a, pair.b):  # their sessions ended with the re-read: they log in again
        token.reset()
    custody.ensure_transport_key(c)
    before = {key.label for key in custody.inventory(c)}
    aes = next(copy for copy in copies if copy.kind == custody.AES_ROOT)
    flipped = dataclasses.replace(aes, wrapped=aes.wrapped[:-1] + bytes([aes.wrapped[-1] ^ 1]))
    with pytest.raises(IntegrityError):  # wrapped for B's transport key, not C's
        custody.import_keys(c, [aes])
    with pytest.raises(IntegrityError):
        custody.import_keys(c, [flipped])
    wrong_check = dataclasses.replace(aes, kcv="0" * 16)
    with pytest.raises(IntegrityError):
        custody.import_keys(pair.b, [dataclasses.replace(wrong_check, label="kmsq:rk-custody-other:v1")])
    assert {key.label for key in custody.inventory(c)} == before
    assert "kmsq:rk-custody-other:v1" not in {key.label for key in custody.inventory(pair.b)}
    c.reset()


def _third_token(
    pair: Pair, hsm_settings: Settings, unit_template: UnitTemplate, tmp_path: Path
) -> tuple[Hsm, sessionmaker[Session]]:
    """A new token C in the run's token directory (A and B log in again on next use), and a database of its own."""
    c = _new_token(hsm_settings, f"custody-c-{secrets.token_hex(4)}")
    gc.collect()
    c.reread()
    for token in (pair.a, pair.b):
        token.reset()
    return c, session_factory(copy_of_schema(unit_template, tmp_path / "custody.db"))


def test_replication_through_the_database_refuses_a_changed_copy_and_makes_it_again(
    pair: Pair, hsm_settings: Settings, unit_template: UnitTemplate, tmp_path: Path
) -> None:
    """worker.replication on a database of its own (SQLite): enroll C, trust it (wrong fingerprint first),
    replicate from A; a database writer flips a byte of a copy: C refuses it and drops every copy, A makes them
    again, and then C takes them all with A's check values."""
    c, sessions = _third_token(pair, hsm_settings, unit_template, tmp_path)
    with transaction(sessions) as db:
        enrolled = replication.enroll(c, db)
    with transaction(sessions) as db, pytest.raises(ConfigError, match="nothing was trusted"):
        replication.trust(pair.a, db, enrolled.name, "ab" * 32, SO_PIN)
    with transaction(sessions) as db:
        assert replication.trust(pair.a, db, enrolled.name, enrolled.fingerprint.upper(), SO_PIN)
        first = replication.replicate(pair.a, db, None)
    assert first.exported[enrolled.name] == len(custody.inventory(pair.a))  # (A made copies for B too: it trusts B)
    with transaction(sessions) as db:
        row = db.scalars(
            select(KeyCopy).where(KeyCopy.kind == custody.AES_ROOT, KeyCopy.target == enrolled.name)
        ).first()
        assert row is not None
        raw = bytearray(from_b64u(row.wrapped, max_len=4096))
        raw[-1] ^= 1
        row.wrapped = b64u(bytes(raw))
    with transaction(sessions) as db:
        refused = replication.replicate(c, db, None)
    assert refused.refused and copies_for(sessions, enrolled.name) == 0
    with transaction(sessions) as db:
        again = replication.replicate(pair.a, db, None)
    assert again.exported[enrolled.name] >= 1
    with transaction(sessions) as db:
        taken = replication.replicate(c, db, None)
    assert not taken.refused
    assert {k.label: k.kcv for k in custody.inventory(c)} == {k.label: k.kcv for k in custody.inventory(pair.a)}
    with transaction(sessions) as db:
        assert enrolled.name not in replication.replicate(pair.a, db, None).exported  # C reported holding them all
    c.reset()


def copies_for(sessions: sessionmaker[Session], target: str) -> int:
    with sessions() as db:
        return int(db.scalar(select(func.count()).select_from(KeyCopy).where(KeyCopy.target == target)) or 0)


def test_the_probe_finds_everything_kmsq_needs_on_softhsm2(pair: Pair) -> None:
    found = custody.probe(pair.a)
    assert {c.name for c in found} >= {"CKM_AES_KEY_WRAP_PAD (RFC 5649)", "CKA_WRAP_WITH_TRUSTED enforced",
                                        "secp256k1 key pairs", "C_GenerateRandom"}  # fmt: skip
    assert all(c.ok for c in found), [c for c in found if not c.ok]
    assert custody.missing(found, {"aes-256", "rsa-2048"}, custody=True) == []
    before = pair.a.run(lambda s: len(list(s.get_objects({Attribute.TOKEN: False}))))
    assert before == 0  # it left no session object behind


def test_an_operator_change_on_a_reaches_the_workers_of_b_at_once(
    pair: Pair, hsm_settings: Settings, unit_template: UnitTemplate, tmp_path: Path
) -> None:
    """Seen in `kmsq chaos`: after `kmsq caller add` on A's host, the workers on token B refused every request
    (`policy rows not anchored`) until replication carried A's anchor over, up to two replication intervals.
    Now the command leaves the anchor for B as it commits, and B's workers take it before refusing; a copy a
    database writer altered is not taken."""
    c, sessions = _third_token(pair, hsm_settings, unit_template, tmp_path)
    with transaction(sessions) as db:
        enrolled = replication.enroll(c, db)
        assert replication.trust(pair.a, db, enrolled.name, enrolled.fingerprint, SO_PIN)
        replication.replicate(pair.a, db, policy_anchor.deployment_id(db))
    with transaction(sessions) as db:
        replication.replicate(c, db, policy_anchor.deployment_id(db))  # C holds the policy key now
    identity = CallerIdentity.generate("alice")
    identity.write(tmp_path)
    with transaction(sessions) as db:  # the operator command, on A's host
        callers.add_caller(pair.a, db, "alice", callers.read_public_identity(tmp_path / "alice.pub.json"),
                           ["generate_data_key"], None, False)  # fmt: skip
    with sessions() as db:
        scope = policy_anchor.deployment_id(db)
        left = db.get(KeyCopy, (enrolled.name, f"{replication.ANCHOR}:{scope}"))
        assert left is not None  # left for C when the command committed, no replication run since
        genuine = left.wrapped
    with sessions() as db, pytest.raises(PolicyNotAnchored):
        # C's own anchor is behind: without catching up, refused
        TrustedRows(c, operators=TEST_OPERATORS.digest).caller(db, "alice")

    def catch_up(db: Session) -> bool:
        return replication.take_anchor(c, db, policy_anchor.deployment_id(db))

    anchor = policy_anchor.Anchor.decode(from_b64u(genuine, max_len=4096))
    assert anchor is not None
    forged = policy_anchor.Anchor(anchor.epoch + 5, "00" * 32).encode()  # a database writer's own anchor
    with transaction(sessions) as db:
        row = db.get(KeyCopy, (enrolled.name, f"{replication.ANCHOR}:{scope}"))
        assert row is not None
        row.wrapped = b64u(forged)
    with sessions() as db, pytest.raises(PolicyNotAnchored):
        TrustedRows(c, catch_up=catch_up, operators=TEST_OPERATORS.digest).caller(db, "alice")
    with transaction(sessions) as db:
        row = db.get(KeyCopy, (enrolled.name, f"{replication.ANCHOR}:{scope}"))
        assert row is not None
        row.wrapped = genuine
    with sessions() as db:
        found = TrustedRows(c, catch_up=catch_up, operators=TEST_OPERATORS.digest).caller(db, "alice")
        assert found is not None and found.state == "enabled"
        assert policy_anchor.status(c, db).matches
    c.reset()


def test_a_destroyed_version_leaves_every_token_and_is_passed_on_to_none(
    pair: Pair, hsm_settings: Settings, unit_template: UnitTemplate, tmp_path: Path
) -> None:
    """A version's destruction (worker.schedule) on a deployment of tokens A, C and D: while it waits no token
    passes it on (D, enrolled late, gets the current version only); once due, A's run destroys it and C's run
    removes C's copy."""
    c, sessions = _third_token(pair, hsm_settings, unit_template, tmp_path)
    d = _new_token(hsm_settings, f"custody-d-{secrets.token_hex(4)}")
    gc.collect()
    d.reread()
    for token in (pair.a, c):
        token.reset()
    with transaction(sessions) as db:
        for token in (c, d):
            enrolled = replication.enroll(token, db)
            assert replication.trust(pair.a, db, enrolled.name, enrolled.fingerprint, SO_PIN)
    service = KeyService(pair.a, sessions, default_pool="alpha")
    root = service.create_root_key("aes-256", "alpha").id
    service.rotate_root_key(root)
    service.set_min_decryption_version(root, 2)
    with sessions() as db:
        old, new = (db.get(RootKeyVersion, (root, v)) for v in (1, 2))
        assert old is not None and new is not None
        labels = (old.hsm_label, new.hsm_label)
    with transaction(sessions) as db:
        replication.replicate(pair.a, db, policy_anchor.deployment_id(db))
    with transaction(sessions) as db:
        replication.replicate(c, db, policy_anchor.deployment_id(db))
        db.execute(delete(KeyCopy).where(KeyCopy.target == d.token_serial()))  # D as if enrolled later
    assert {k.label for k in custody.inventory(c)} >= set(labels)
    with approved_at(datetime.now(UTC) - timedelta(days=8)):  # approved with a wait of 7, 8 days ago: due
        service.destroy_root_key_version(root, 1, 7)
    with transaction(sessions) as db:
        replication.replicate(pair.a, db, policy_anchor.deployment_id(db))
        waiting = set(db.scalars(select(KeyCopy.label).where(KeyCopy.target == d.token_serial())))
    assert labels[1] in waiting and labels[0] not in waiting  # the version waiting for destruction is not passed on
    done = schedule.run(pair.a, sessions, TEST_OPERATORS.digest)
    assert done.destroyed == [f"{root}:1"] and labels[0] not in {k.label for k in custody.inventory(pair.a)}
    on_c = schedule.run(c, sessions, TEST_OPERATORS.digest)
    assert on_c.destroyed == [] and on_c.removed_from_token == [f"{root}:1"]
    assert labels[0] not in {k.label for k in custody.inventory(c)} and labels[1] in {
        k.label for k in custody.inventory(c)
    }
    with transaction(sessions) as db:
        replication.replicate(d, db, policy_anchor.deployment_id(db))
    held = {k.label for k in custody.inventory(d)}
    assert labels[1] in held and labels[0] not in held
    for token in (c, d):
        token.reset()
