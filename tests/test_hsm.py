"""The PKCS#11 adapter on a real SoftHSM2 token: root key attributes, session recovery, fork safety."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from tests.conftest import raw_session
from worker.config import Settings
from worker.errors import ConfigError, IntegrityError, NotFound
from worker.hsm import Hsm
from worker.keystore import RootKeyHandle


@pytest.fixture(scope="module")
def aes_root(hsm: Hsm) -> RootKeyHandle:
    return hsm.create_aes_root_key("rk-hsmtest-aes", 1)


@pytest.fixture(scope="module")
def rsa_root(hsm: Hsm) -> RootKeyHandle:
    return hsm.create_rsa_root_key("rk-hsmtest-rsa", 1, 2048)


def test_aes_root_key_attributes(hsm: Hsm, aes_root: RootKeyHandle) -> None:
    attrs = hsm.root_key_attributes(aes_root)
    assert attrs["TOKEN"] and attrs["PRIVATE"] and attrs["SENSITIVE"] and attrs["ALWAYS_SENSITIVE"]
    assert attrs["WRAP_WITH_TRUSTED"] and attrs["EXTRACTABLE"]  # leaves only wrapped for an SO-trusted key
    assert attrs["WRAP"] and attrs["UNWRAP"]
    assert not (attrs["ENCRYPT"] or attrs["DECRYPT"] or attrs["SIGN"] or attrs["DERIVE"])
    assert attrs["ID"] == b"kmsq:rk-hsmtest-aes:v1" and attrs["LABEL"] == "kmsq:rk-hsmtest-aes:v1"


def test_rsa_root_key_attributes(hsm: Hsm, rsa_root: RootKeyHandle) -> None:
    attrs = hsm.root_key_attributes(rsa_root)
    assert attrs["SENSITIVE"] and attrs["ALWAYS_SENSITIVE"] and attrs["WRAP_WITH_TRUSTED"]
    assert attrs["UNWRAP"] and not (attrs["DECRYPT"] or attrs["SIGN"] or attrs["DERIVE"])
    assert attrs["ID"] == b"kmsq:rk-hsmtest-rsa:v1"


def test_root_key_value_cannot_be_read(
    hsm_settings: Settings, aes_root: RootKeyHandle, rsa_root: RootKeyHandle
) -> None:
    session = raw_session(hsm_settings)
    try:
        secret = session.get_key(ObjectClass.SECRET_KEY, KeyType.AES, id=aes_root.hsm_id)
        private = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, id=rsa_root.hsm_id)
        for key, attribute in (
            (secret, Attribute.VALUE),
            (private, Attribute.PRIVATE_EXPONENT),
            (private, Attribute.PRIME_1),
        ):
            with pytest.raises(p11.AttributeSensitive):
                key[attribute]
        # Nor can it be wrapped out under a key the security officer did not mark trusted (CKA_WRAP_WITH_TRUSTED):
        # the token refuses, for an AES key and for an RSA public key (the mechanism another HSM's transport key
        # uses, worker.replication), and for the RSA root's private half under AES.
        other = session.generate_key(
            KeyType.AES, 256, mechanism=Mechanism.AES_KEY_GEN, template={Attribute.WRAP: True, Attribute.TOKEN: False}
        )
        public, _ = session.generate_keypair(KeyType.RSA, 2048, store=False, public_template={Attribute.WRAP: True})
        with pytest.raises(p11.KeyNotWrappable):
            other.wrap_key(secret, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        with pytest.raises(p11.KeyNotWrappable):
            other.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        with pytest.raises(p11.KeyNotWrappable):
            public.wrap_key(secret, mechanism=Mechanism.RSA_PKCS_OAEP,
                            mechanism_param=(Mechanism.SHA_1, pkcs11.MGF.SHA1, None))  # fmt: skip
        assert not hasattr(secret, "encrypt")  # python-pkcs11 offers only what CKA_ENCRYPT etc. allow
        other.destroy()
    finally:
        session.close()


@pytest.mark.parametrize("root", ["aes_root", "rsa_root"])
def test_data_key_wrap_round_trip(hsm: Hsm, root: str, request: pytest.FixtureRequest) -> None:
    handle: RootKeyHandle = request.getfixturevalue(root)
    wrapped, plain = hsm.generate_data_key(handle, readable=True)
    assert plain is not None and len(plain) == 32
    with plain, hsm.unwrap_data_key(handle, wrapped) as again:
        assert bytes(again.view()) == bytes(plain.view())
    assert len(plain) == 0  # wiped on exit


def test_session_objects_are_destroyed(hsm: Hsm, hsm_settings: Settings, aes_root: RootKeyHandle) -> None:
    session = raw_session(hsm_settings)
    try:
        before = len(list(session.get_objects({Attribute.TOKEN: False})))
        for _ in range(5):
            wrapped, _ = hsm.generate_data_key(aes_root, readable=True)
            hsm.unwrap_data_key(aes_root, wrapped).wipe()
        # Session objects of another session are invisible here; count via the adapter's own session.
        own = hsm._run(lambda s: len(list(s.get_objects({Attribute.TOKEN: False}))))
        assert own == 0
        assert len(list(session.get_objects({Attribute.TOKEN: False}))) == before
    finally:
        session.close()


def test_tampered_wrapped_key_is_an_integrity_error(hsm: Hsm, aes_root: RootKeyHandle, rsa_root: RootKeyHandle) -> None:
    for handle in (aes_root, rsa_root):
        wrapped, _ = hsm.generate_data_key(handle, readable=False)
        bad = bytes([wrapped[0] ^ 1]) + wrapped[1:]
        with pytest.raises(IntegrityError) as info:
            hsm.unwrap_data_key(handle, bad)
        assert str(info.value) == "ciphertext failed integrity check"


def test_reopens_after_session_loss(hsm: Hsm, aes_root: RootKeyHandle) -> None:
    hsm.check()
    hsm._session.close()  # the token drops our session (HSM restart, timeout)
    wrapped, _ = hsm.generate_data_key(aes_root, readable=False)  # reopened transparently
    assert wrapped
    hsm.reset()
    assert hsm._session is None
    hsm.unwrap_data_key(aes_root, wrapped).wipe()
    assert hsm._session is not None


def _child(hsm: Hsm, handle: RootKeyHandle, queue: Any) -> None:
    try:
        wrapped, plain = hsm.generate_data_key(handle, readable=True)
        assert plain is not None
        with hsm.unwrap_data_key(handle, wrapped) as again:
            queue.put(("ok", os.getpid(), bytes(again.view()) == bytes(plain.view())))
    except Exception as e:  # report, not hang
        queue.put(("error", repr(e), False))


def test_forked_child_opens_its_own_session(hsm: Hsm, aes_root: RootKeyHandle) -> None:
    hsm.check()  # the parent has a live session before forking, as a careless host would
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(hsm, aes_root, queue))
    proc.start()
    status, pid, matched = queue.get(timeout=60)
    proc.join(timeout=60)
    assert (status, matched) == ("ok", True), pid
    assert pid != os.getpid() and proc.exitcode == 0
    hsm.generate_data_key(aes_root, readable=False)  # the parent's session still works


def _create_in_child(hsm: Hsm, key_id: str, queue: Any) -> None:
    try:
        hsm.create_aes_root_key(key_id, 1)
        queue.put("ok")
    except Exception as e:  # report, not hang
        queue.put(repr(e))


def test_a_key_another_process_created_is_found_after_this_process_created_one(hsm: Hsm) -> None:
    """SoftHSM2's file store misses another process's new token objects once this process has created one
    after them (``kmsq root-key rotate`` run while a long-lived process creates a root key): the adapter
    re-reads the token when a key is not found, and finds it."""
    mine = hsm.create_aes_root_key("rk-hsmtest-mine-1", 1)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_create_in_child, args=(hsm, "rk-hsmtest-theirs", queue))
    proc.start()
    assert queue.get(timeout=60) == "ok"
    proc.join(timeout=60)
    hsm.create_aes_root_key("rk-hsmtest-mine-2", 1)
    theirs = RootKeyHandle(b"kmsq:rk-hsmtest-theirs:v1", "kmsq:rk-hsmtest-theirs:v1", mine.wrap_algorithm)
    refreshed = hsm.refreshed
    wrapped, _ = hsm.generate_data_key(theirs, readable=False)
    assert hsm.refreshed == refreshed + 1
    hsm.unwrap_data_key(theirs, wrapped).wipe()
    assert hsm.refreshed == refreshed + 1  # found at once from then on
    hsm.unwrap_data_key(mine, hsm.generate_data_key(mine, readable=False)[0]).wipe()


def test_a_key_that_is_nowhere_is_not_found_after_one_re_read(hsm: Hsm, aes_root: RootKeyHandle) -> None:
    missing = RootKeyHandle(b"kmsq:rk-nowhere:v1", "kmsq:rk-nowhere:v1", aes_root.wrap_algorithm)
    refreshed = hsm.refreshed
    with pytest.raises(NotFound, match="root key not present in the HSM"):
        hsm.generate_data_key(missing, readable=False)
    assert hsm.refreshed == refreshed + 1
    hsm.generate_data_key(aes_root, readable=False)  # the adapter works on


def test_unknown_token_is_a_config_error(hsm_settings: Settings) -> None:
    bad = Hsm(hsm_settings.module_path(), "no-such-token", hsm_settings.read_pin, hsm_settings.softhsm2_conf)
    with pytest.raises(ConfigError, match="not found"):
        bad.check()


def test_missing_library_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="library not found"):
        Hsm("/nonexistent/libpkcs11.so", "kmsq", lambda: "1234").check()


def test_pkcs11_is_imported_only_by_the_adapter() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    importers = [
        str(path.relative_to(root))
        for package in ("schemas", "worker", "tasks", "kmsq")
        for path in (root / package).rglob("*.py")
        if "import pkcs11" in path.read_text() or "from pkcs11" in path.read_text()
    ]
    assert sorted(importers) == ["worker/hsm.py", "worker/hsm_custody.py"]  # the adapter and its key-custody half
    assert pkcs11  # tests may use it to check the token independently


def test_the_library_is_recycled_after_many_session_objects(
    hsm_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SoftHSM2 keeps memory for every session object until C_Finalize: the adapter re-initializes the
    library every RECYCLE_AFTER_OBJECTS objects, between operations, and keeps working."""
    import worker.hsm as hsm_module

    monkeypatch.setattr(hsm_module, "RECYCLE_AFTER_OBJECTS", 500)
    adapter = Hsm(hsm_settings.module_path(), hsm_settings.pkcs11_token_label, hsm_settings.read_pin,
                  hsm_settings.softhsm2_conf)  # fmt: skip
    handle = adapter.create_aes_root_key("rk-recycle", 1)
    try:
        pairs = adapter.generate_data_keys(handle, 400, readable=True)
        pairs += adapter.generate_data_keys(handle, 400, readable=True)
        assert adapter.recycled >= 1
        for wrapped, plaintext in pairs[::50]:
            assert plaintext is not None
            with adapter.unwrap_data_key(handle, wrapped) as again:
                assert bytes(again.view()) == bytes(plaintext.view())
        for _ in range(600):
            adapter.generate_data_key(handle, readable=False)
        assert adapter.recycled >= 2
    finally:
        adapter.destroy_root_key(handle)
