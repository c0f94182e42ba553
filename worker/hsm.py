"""The PKCS#11 adapter: the only module that imports ``pkcs11``.

One logged-in read/write session per process, opened lazily on first use (so never in a parent that forks)
and reopened when the process id changes or the token reports a session or device failure. Every call names
its mechanism and parameters; python-pkcs11's defaults are never relied on. PKCS#11 exceptions are translated
into kmsq's error tree here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from schemas.envelope import GCM_TAG_LEN, WrapAlgorithm
from worker.errors import ConfigError, HsmError, HsmUnavailable, IntegrityError, NotFound, ServiceError
from worker.keystore import RootKeyHandle, root_key_label
from worker.secret import SecretBytes

T = TypeVar("T")

_NO_CAPABILITIES = MechanismFlag(0)  # every usage flag is set explicitly in the templates below
_OAEP_PARAMS = {
    WrapAlgorithm.RSA_OAEP_SHA256: (Mechanism.SHA256, MGF.SHA256, None),
    WrapAlgorithm.RSA_OAEP_SHA1: (Mechanism.SHA_1, MGF.SHA1, None),
}
# Errors after which the session (or the whole token connection) is no longer usable.
_SESSION_ERRORS: tuple[type[Exception], ...] = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.DeviceError,
    p11.DeviceRemoved,
    p11.DeviceMemory,
    p11.TokenNotPresent,
    p11.UserNotLoggedIn,
    p11.SessionCount,
    p11.HostMemory,
)
_PIN_ERRORS: tuple[type[Exception], ...] = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinLocked,
    p11.PinExpired,
)
# Unwrap or decrypt of bad ciphertext. SoftHSM2 reports a failed RFC 5649 integrity check as
# CKR_GENERAL_ERROR, so within an unwrap/decrypt that code means "bad ciphertext", not "bad device".
_INTEGRITY_ERRORS: tuple[type[Exception], ...] = (
    p11.WrappedKeyInvalid,
    p11.WrappedKeyLenRange,
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
    p11.GeneralError,
    p11.FunctionFailed,
)

# The keys kmsq keeps in a token (root keys, the policy key, signing keys) can leave it only wrapped under a key
# the token's security officer marked CKA_TRUSTED, i.e. for another enrolled HSM (worker.replication): the token
# refuses any other wrap (CKR_KEY_NOT_WRAPPABLE), CKA_WRAP_WITH_TRUSTED cannot be cleared, and CKA_SENSITIVE keeps
# their value unreadable. (CKA_EXTRACTABLE false would make them unable to leave at all: lost with their token.)
_LEAVES_ONLY_WRAPPED_FOR_TRUSTED: dict[Attribute, Any] = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
    Attribute.WRAP_WITH_TRUSTED: True,
}
_ROOT_AES_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    **_LEAVES_ONLY_WRAPPED_FOR_TRUSTED,
    Attribute.MODIFIABLE: False,
    Attribute.WRAP: True,
    Attribute.UNWRAP: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
# The policy key: HMAC-SHA256 over the rows that say who may do what (worker.policy) and the audit chain; it
# leaves the token only wrapped for another enrolled HSM.
POLICY_KEY_ID = b"kmsq-policy-v1"
_POLICY_KEY_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    **_LEAVES_ONLY_WRAPPED_FOR_TRUSTED,
    Attribute.MODIFIABLE: False,
    Attribute.SIGN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
# The policy anchor (worker.policy): data objects, written only by the operator commands, holding the digest the
# policy rows must hash to. A data object's value cannot be changed in place (SoftHSM2: CKR_ATTRIBUTE_READ_ONLY):
# a new one is created, then the ones it supersedes are destroyed.
POLICY_ANCHOR_LABEL = "kmsq-policy-anchor-v1"
_POLICY_ANCHOR_TEMPLATE: dict[Attribute, Any] = {
    Attribute.CLASS: ObjectClass.DATA,
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.MODIFIABLE: False,
    Attribute.APPLICATION: "kmsq",
}
_ROOT_RSA_PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.MODIFIABLE: False,
    Attribute.WRAP: True,
    Attribute.ENCRYPT: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
_ROOT_RSA_PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    **_LEAVES_ONLY_WRAPPED_FOR_TRUSTED,
    Attribute.MODIFIABLE: False,
    Attribute.UNWRAP: True,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.DERIVE: False,
}
# A secp256k1 key kept in the token to sign (generate_signing_key with in_hsm): CKM_ECDSA only.
_EC_PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.MODIFIABLE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
}
_EC_PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    **_LEAVES_ONLY_WRAPPED_FOR_TRUSTED,
    Attribute.MODIFIABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
# The security attributes reported for a key, by name; WRAP and ENCRYPT are not attributes of a private key.
_REPORTED_ATTRIBUTES = (
    "TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "WRAP_WITH_TRUSTED", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE",
    "MODIFIABLE",
    "WRAP", "UNWRAP", "ENCRYPT", "DECRYPT", "SIGN", "DERIVE", "ID", "LABEL",
)  # fmt: skip
_PUBLIC_KEY_ONLY = ("WRAP", "ENCRYPT")
# A data key whose value is read out (generate_data_key with plaintext, decrypt_data_key).
_READABLE_DATA_KEY: dict[Attribute, Any] = {
    Attribute.TOKEN: False,
    Attribute.SENSITIVE: False,
    Attribute.EXTRACTABLE: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
# A data key that never leaves the HSM in plaintext: only wrappable, usable for the GCM seal.
_SEALED_DATA_KEY: dict[Attribute, Any] = {**_READABLE_DATA_KEY, Attribute.SENSITIVE: True}
_SEALING_KEY = {**_SEALED_DATA_KEY, Attribute.ENCRYPT: True}
_OPENING_KEY = {**_SEALED_DATA_KEY, Attribute.EXTRACTABLE: False, Attribute.DECRYPT: True}


_libraries: dict[str, tuple[Any, int]] = {}
_libraries_lock = threading.Lock()
# SoftHSM2 2.6 keeps about 250 bytes per session object it ever created until C_Finalize, even after
# C_DestroyObject and C_CloseSession (measured: +5 MB per 20,000 generate/destroy pairs, also through
# PyKCS11; flat with a C_Finalize/C_Initialize every 5,000). So after this many session objects the
# adapter re-initializes the library between two operations.
RECYCLE_AFTER_OBJECTS = 50_000


def _ec_point(encoded: bytes) -> bytes:
    """Returns the uncompressed point of a CKA_EC_POINT (a DER OCTET STRING around 04 || X || Y, as PKCS#11 v2.40
    asks; some tokens give the bare point). Raises HsmError for anything else."""
    if len(encoded) == 67 and encoded[:2] == b"\x04\x41":
        encoded = encoded[2:]
    if len(encoded) != 65 or encoded[0] != 0x04:
        raise HsmError("the token returned an EC point kmsq does not read")
    return encoded


def _text(value: bytes | str) -> str:
    return (value.decode("ascii", "replace") if isinstance(value, bytes) else value).strip()


# Bumped at every C_Finalize/C_Initialize of a library in this process. A session opened before it is gone, and
# its handle may by then name a session another adapter opened on another token (SoftHSM2 hands out handles
# again from 1): an adapter whose session is older than the current generation opens a new one.
_generation = [0]


def _reinitialize_library(lib: Any) -> None:
    with _libraries_lock:
        _generation[0] += 1
        lib.reinitialize()


def _load_library(path: str) -> Any:
    """Returns the process's ``pkcs11.lib`` for ``path``, re-initialized in a forked child."""
    with _libraries_lock:
        cached = _libraries.get(path)
        if cached is not None:
            lib, pid = cached
            if pid != os.getpid():
                _generation[0] += 1
                lib.reinitialize()
                _libraries[path] = (lib, os.getpid())
            return lib
        if not Path(path).exists():
            raise ConfigError(f"PKCS#11 library not found: {path}")
        try:
            lib = pkcs11.lib(path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"cannot load PKCS#11 library {path}: {e}") from None
        _libraries[path] = (lib, os.getpid())
        return lib


class Hsm:  # implements worker.keystore.KeyStore
    """A PKCS#11 token used by kmsq. Thread-safe; one session per process."""

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin: Callable[[], str],
        softhsm2_conf: Path | None = None,
    ) -> None:
        self._module_path = module_path
        self._token_label = token_label
        self._pin = pin
        self._softhsm2_conf = softhsm2_conf
        self._lock = threading.RLock()
        self._session: Any = None
        self._session_pid = 0
        self._session_generation = 0
        self._keys: dict[tuple[bytes, ObjectClass], Any] = {}
        self._objects_created = 0
        self.recycled = 0  # how many times the library was re-initialized (for tests and metrics)
        self.sessions_opened = 0  # logins: the first, and every reopen after a failure or recycle (metrics)
        self.unavailable = 0  # calls that failed as HsmUnavailable, retried or not (metrics)
        self.refreshed = 0  # re-reads of the token after a key was not found
        self._reread_at = 0.0  # when policy_anchors last read the token again

    # -- session lifecycle -------------------------------------------------------------------------

    def _library(self) -> Any:
        if self._softhsm2_conf is not None:
            # SoftHSM2 reads its configuration when the library initializes.
            os.environ["SOFTHSM2_CONF"] = str(self._softhsm2_conf)
        return _load_library(self._module_path)

    def _open(self) -> Any:
        lib = self._library()
        try:
            token = lib.get_token(token_label=self._token_label)
        except p11.NoSuchToken:
            raise ConfigError(f"PKCS#11 token {self._token_label!r} not found") from None
        except p11.MultipleTokensReturned:
            raise ConfigError(f"more than one PKCS#11 token labelled {self._token_label!r}") from None
        try:
            return token.open(rw=True, user_pin=self._pin())
        except _PIN_ERRORS:
            raise ConfigError(f"wrong PIN for PKCS#11 token {self._token_label!r}") from None
        except p11.UserAlreadyLoggedIn:
            return token.open(rw=True)

    def _current(self) -> Any:
        if self._session is None or self._session_pid != os.getpid() or self._session_generation != _generation[0]:
            self._keys.clear()
            self._session = self._open()
            self._session_pid = os.getpid()
            self._session_generation = _generation[0]
            self.sessions_opened += 1
        return self._session

    def reset(self) -> None:
        """Drops the session so that the next call opens a new one. Never raises."""
        with self._lock:
            session, self._session = self._session, None
            self._keys.clear()
            current = self._session_pid == os.getpid() and self._session_generation == _generation[0]
            if session is not None and current:  # a stale handle may be another adapter's session now
                with contextlib.suppress(p11.PKCS11Error):
                    session.close()

    def check(self) -> None:
        """Opens the session, or re-checks it with a call the token must answer (8 random bytes: a token that
        stopped answering fails it, where a cached attribute would not). Raises ConfigError or HsmUnavailable."""
        self._run(lambda s: s.generate_random(64))

    def run(self, op: Callable[[Any], T], *, integrity: bool = False) -> T:
        """Runs ``op`` with the logged-in user session (for worker.hsm_custody), as every method here does: errors
        translated, a failed session reopened once. Raises what :meth:`_run` raises."""
        return self._run(op, integrity=integrity)

    @contextmanager
    def so_session(self, so_pin: str) -> Iterator[Any]:
        """Yields a read/write session logged in as the token's security officer (for worker.hsm_custody: only
        the SO may mark a key CKA_TRUSTED). The user session is closed first (a token has one login state per
        application) and logs in again on the next call. Raises ConfigError for a wrong SO PIN."""
        with self._lock:
            self.reset()
            lib = self._library()
            try:
                token = lib.get_token(token_label=self._token_label)
            except p11.NoSuchToken:
                raise ConfigError(f"PKCS#11 token {self._token_label!r} not found") from None
            try:
                session = token.open(rw=True, so_pin=so_pin)
            except _PIN_ERRORS:
                raise ConfigError(f"wrong security officer PIN for PKCS#11 token {self._token_label!r}") from None
            try:
                with self._translate(integrity=False):
                    yield session
            finally:
                with contextlib.suppress(p11.PKCS11Error):
                    session.close()

    def reread(self) -> None:
        """Re-initializes the library (C_Finalize, C_Initialize): tokens and objects another process made since
        become visible; every session of the process, this adapter's included, logs in again on next use."""
        with self._lock:
            self._reinitialize()

    def token_serial(self) -> str:
        """Returns the token's serial number (CK_TOKEN_INFO.serialNumber, trimmed): its name among enrolled HSMs."""
        return self._run(lambda session: _text(session.token.serial))

    def _run(self, op: Callable[[Any], T], *, integrity: bool = False) -> T:
        """Runs ``op(session)``; after a session failure reopens once and retries, then gives up.

        Raises HsmUnavailable (transient), IntegrityError (``integrity=True`` and bad ciphertext),
        ConfigError, NotFound or HsmError.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    with self._translate(integrity=integrity):
                        return op(self._current())
                except HsmUnavailable:
                    self.unavailable += 1
                    self.reset()
                    if attempt == 2:
                        raise
                except NotFound:
                    # SoftHSM2's file store stops seeing token objects another process created once this
                    # process has created one itself (its generation counter then looks current), until
                    # the library re-reads the token: so a key not found is looked up once more after that.
                    if attempt == 2:
                        raise
                    self.refreshed += 1
                    self._reinitialize()
                finally:
                    if self._objects_created >= RECYCLE_AFTER_OBJECTS:
                        self._recycle()
            raise AssertionError("unreachable")

    def _recycle(self) -> None:
        """Closes the session and re-initializes the library (C_Finalize, C_Initialize) to release what
        the token keeps of destroyed session objects; the next call logs in again."""
        self._reinitialize()
        self._objects_created = 0
        self.recycled += 1

    def _reinitialize(self) -> None:
        """Closes the session and re-initializes the library (C_Finalize, C_Initialize): the token is read
        again and what it kept for this process is released; the next call logs in again."""
        self.reset()
        with contextlib.suppress(p11.PKCS11Error):
            _reinitialize_library(self._library())  # the embedded configuration set first: it may be the first call

    @staticmethod
    @contextmanager
    def _translate(*, integrity: bool) -> Iterator[None]:
        try:
            yield
        except ServiceError:
            raise
        except _SESSION_ERRORS as e:
            raise HsmUnavailable() from e
        except _PIN_ERRORS:
            raise ConfigError("PKCS#11 login failed (wrong or locked PIN)") from None
        except _INTEGRITY_ERRORS as e:
            if integrity:
                raise IntegrityError() from None
            raise HsmError(f"HSM operation failed ({type(e).__name__})") from e
        except p11.NoSuchKey:
            raise NotFound("root key not present in the HSM") from None
        except p11.PKCS11Error as e:
            raise HsmError(f"HSM operation failed ({type(e).__name__})") from e

    def _key(self, session: Any, handle: RootKeyHandle, object_class: ObjectClass) -> Any:
        cache_key = (handle.hsm_id, object_class)
        key = self._keys.get(cache_key)
        if key is None:
            key_type = KeyType.RSA if handle.is_rsa else KeyType.AES
            key = session.get_key(object_class=object_class, key_type=key_type, id=handle.hsm_id)
            self._keys[cache_key] = key
        return key

    def _wrapping_key(self, session: Any, handle: RootKeyHandle) -> Any:
        return self._key(session, handle, ObjectClass.PUBLIC_KEY if handle.is_rsa else ObjectClass.SECRET_KEY)

    def _unwrapping_key(self, session: Any, handle: RootKeyHandle) -> Any:
        return self._key(session, handle, ObjectClass.PRIVATE_KEY if handle.is_rsa else ObjectClass.SECRET_KEY)

    # -- root keys ---------------------------------------------------------------------------------

    def create_aes_root_key(self, key_id: str, version: int) -> RootKeyHandle:
        """Creates a non-extractable, sensitive AES-256 token key that can only wrap and unwrap.

        Returns its handle (wrap algorithm RFC 5649 KWP).
        """
        label = root_key_label(key_id, version)
        hsm_id = label.encode("ascii")

        def op(session: Any) -> None:
            session.generate_key(
                KeyType.AES,
                256,
                id=hsm_id,
                label=label,
                store=True,
                capabilities=_NO_CAPABILITIES,
                mechanism=Mechanism.AES_KEY_GEN,
                template=_ROOT_AES_TEMPLATE,
            )

        self._run(op)
        return RootKeyHandle(hsm_id, label, WrapAlgorithm.AES_KWP)

    def create_rsa_root_key(self, key_id: str, version: int, bits: int) -> RootKeyHandle:
        """Creates an RSA key pair whose private half is non-extractable and sensitive and can only unwrap.

        Returns its handle. The wrap algorithm is RSA-OAEP with SHA-256 when the token supports it; SoftHSM2
        2.6 implements OAEP with SHA-1 only, and on such a token the key is recorded as RSA-OAEP-SHA1.
        """
        label = root_key_label(key_id, version)
        hsm_id = label.encode("ascii")

        def op(session: Any) -> None:
            session.generate_keypair(
                KeyType.RSA,
                bits,
                id=hsm_id,
                label=label,
                store=True,
                capabilities=_NO_CAPABILITIES,
                mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                public_template={**_ROOT_RSA_PUBLIC_TEMPLATE, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                private_template=_ROOT_RSA_PRIVATE_TEMPLATE,
            )

        self._run(op)
        for algorithm in (WrapAlgorithm.RSA_OAEP_SHA256, WrapAlgorithm.RSA_OAEP_SHA1):
            handle = RootKeyHandle(hsm_id, label, algorithm)
            if self._round_trips(handle):
                return handle
        self.destroy_root_key(handle)
        raise HsmError("the token supports no RSA-OAEP variant kmsq can use")

    def _round_trips(self, handle: RootKeyHandle) -> bool:
        try:
            wrapped, plain = self.generate_data_key(handle, readable=True)
            assert plain is not None
            with plain, self.unwrap_data_key(handle, wrapped) as again:
                return bytes(again.view()) == bytes(plain.view())
        except (HsmError, IntegrityError):
            return False

    def destroy_root_key(self, handle: RootKeyHandle) -> None:
        """Destroys every object of a root key version (used to undo a creation that failed to record)."""

        def op(session: Any) -> None:
            for obj in list(session.get_objects({Attribute.ID: handle.hsm_id})):
                obj.destroy()

        self._run(op)
        with self._lock:
            self._keys = {k: v for k, v in self._keys.items() if k[0] != handle.hsm_id}

    def root_key_attributes(self, handle: RootKeyHandle) -> dict[str, Any]:
        """Returns the security attributes of the root key's secret or private object, by name."""

        def op(session: Any) -> dict[str, Any]:
            key = self._unwrapping_key(session, handle)
            skipped = _PUBLIC_KEY_ONLY if handle.is_rsa else ()
            return {name: key[Attribute[name]] for name in _REPORTED_ATTRIBUTES if name not in skipped}

        return self._run(op)

    # -- data keys ---------------------------------------------------------------------------------

    def _wrap(self, session: Any, handle: RootKeyHandle, key: Any) -> bytes:
        wrapping = self._wrapping_key(session, handle)
        if handle.is_rsa:
            return bytes(
                wrapping.wrap_key(
                    key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_PARAMS[handle.wrap_algorithm]
                )
            )
        return bytes(wrapping.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD, mechanism_param=None))

    def _unwrap(self, session: Any, handle: RootKeyHandle, wrapped: bytes, template: dict[Attribute, Any]) -> Any:
        unwrapping = self._unwrapping_key(session, handle)
        self._objects_created += 1
        if handle.is_rsa:
            mechanism, param = Mechanism.RSA_PKCS_OAEP, _OAEP_PARAMS[handle.wrap_algorithm]
        else:
            mechanism, param = Mechanism.AES_KEY_WRAP_PAD, None
        return unwrapping.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            wrapped,
            mechanism=mechanism,
            mechanism_param=param,
            store=False,
            capabilities=_NO_CAPABILITIES,
            template=template,
        )

    def _session_aes_key(self, session: Any, template: dict[Attribute, Any]) -> Any:
        """Generates an AES-256 session object (CKM_AES_KEY_GEN) with exactly ``template``'s flags."""
        self._objects_created += 1
        return session.generate_key(
            KeyType.AES,
            256,
            store=False,
            capabilities=_NO_CAPABILITIES,
            mechanism=Mechanism.AES_KEY_GEN,
            template=template,
        )

    def generate_data_key(self, handle: RootKeyHandle, *, readable: bool) -> tuple[bytes, SecretBytes | None]:
        """Generates an AES-256 session key in the HSM and wraps it under the root key.

        Returns ``(wrapped, plaintext)``; ``plaintext`` is None unless ``readable``, in which case the key
        is created non-sensitive and its value read out. The session object is destroyed before returning.
        """

        def op(session: Any) -> tuple[bytes, SecretBytes | None]:
            key = self._session_aes_key(session, _READABLE_DATA_KEY if readable else _SEALED_DATA_KEY)
            try:
                wrapped = self._wrap(session, handle, key)
                return wrapped, SecretBytes(key[Attribute.VALUE]) if readable else None
            finally:
                key.destroy()

        return self._run(op)

    def generate_data_keys(
        self, handle: RootKeyHandle, count: int, *, readable: bool
    ) -> list[tuple[bytes, SecretBytes | None]]:
        """:meth:`generate_data_key` ``count`` times under one lock and session (a batch).

        Returns the ``(wrapped, plaintext)`` pairs. On a session failure the whole batch is redone once.
        """

        def op(session: Any) -> list[tuple[bytes, SecretBytes | None]]:
            template = _READABLE_DATA_KEY if readable else _SEALED_DATA_KEY
            out: list[tuple[bytes, SecretBytes | None]] = []
            try:
                for _ in range(count):
                    key = self._session_aes_key(session, template)
                    try:
                        out.append(
                            (self._wrap(session, handle, key), SecretBytes(key[Attribute.VALUE]) if readable else None)
                        )
                    finally:
                        key.destroy()
            except BaseException:
                for _, plaintext in out:
                    if plaintext is not None:
                        plaintext.wipe()
                raise
            return out

        return self._run(op)

    def unwrap_data_key(self, handle: RootKeyHandle, wrapped: bytes) -> SecretBytes:
        """Unwraps ``wrapped`` under the root key and returns the key's value. Raises IntegrityError."""

        def op(session: Any) -> SecretBytes:
            key = self._unwrap(session, handle, wrapped, _READABLE_DATA_KEY)
            try:
                return SecretBytes(key[Attribute.VALUE])
            finally:
                key.destroy()

        return self._run(op, integrity=True)

    def rewrap(self, wrapped: Sequence[tuple[RootKeyHandle, bytes]], target: RootKeyHandle) -> list[bytes | None]:
        """Unwraps each data key under its root key version into a sensitive session object (its value cannot
        be read), wraps it under ``target`` and destroys it: the key never leaves the HSM. One lock and
        session for the whole list.

        Returns the new wrapped keys in order, None for one that does not unwrap (tampered, or not wrapped by
        that version); a key under ``target`` already is only checked, and comes back as it was (RSA-OAEP
        would wrap it differently). A session failure redoes the whole list once.
        """

        def op(session: Any) -> list[bytes | None]:
            out: list[bytes | None] = []
            for handle, key in wrapped:
                try:
                    with self._translate(integrity=True):
                        data_key = self._unwrap(session, handle, key, _SEALED_DATA_KEY)
                except IntegrityError:
                    out.append(None)
                    continue
                try:
                    out.append(key if handle == target else self._wrap(session, target, data_key))
                finally:
                    data_key.destroy()
            return out

        return self._run(op)

    def seal(self, handle: RootKeyHandle, plaintext: SecretBytes, nonce: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Encrypts ``plaintext`` with AES-256-GCM (96-bit nonce, 128-bit tag) under a fresh data key that
        never leaves the HSM unwrapped. Returns ``(wrapped data key, ciphertext with tag)``."""

        def op(session: Any) -> tuple[bytes, bytes]:
            key = self._session_aes_key(session, _SEALING_KEY)
            try:
                params = GCMParams(nonce, aad, GCM_TAG_LEN * 8)
                # python-pkcs11 takes immutable bytes: this one transient copy cannot be wiped.
                ciphertext = key.encrypt(bytes(plaintext.view()), mechanism=Mechanism.AES_GCM, mechanism_param=params)
                return self._wrap(session, handle, key), bytes(ciphertext)
            finally:
                key.destroy()

        return self._run(op)

    def open(self, handle: RootKeyHandle, wrapped: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> SecretBytes:
        """Unwraps the data key inside the HSM and decrypts an AES-256-GCM ``ciphertext``.

        Returns the plaintext. Raises IntegrityError for a bad wrapped key, tag or associated data.
        """

        def op(session: Any) -> SecretBytes:
            key = self._unwrap(session, handle, wrapped, _OPENING_KEY)
            try:
                params = GCMParams(nonce, aad, GCM_TAG_LEN * 8)
                return SecretBytes(key.decrypt(ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params))
            finally:
                key.destroy()

        return self._run(op, integrity=True)

    # -- the policy key --------------------------------------------------------------------------------

    def _policy_key(self, session: Any) -> Any:
        cache_key = (POLICY_KEY_ID, ObjectClass.SECRET_KEY)
        key = self._keys.get(cache_key)
        if key is None:
            key = session.get_key(
                object_class=ObjectClass.SECRET_KEY, key_type=KeyType.GENERIC_SECRET, id=POLICY_KEY_ID
            )
            self._keys[cache_key] = key
        return key

    def ensure_policy_key(self) -> bool:
        """Creates the token's policy key unless it exists: a non-extractable, sensitive 256-bit generic secret
        that can only sign and verify (HMAC-SHA256). Returns True when it was created."""

        try:
            self._run(self._policy_key)  # looked up twice, the token re-read in between, before creating
            return False
        except NotFound:
            pass

        def op(session: Any) -> bool:
            session.generate_key(
                KeyType.GENERIC_SECRET,
                256,
                id=POLICY_KEY_ID,
                label=POLICY_KEY_ID.decode("ascii"),
                store=True,
                capabilities=_NO_CAPABILITIES,
                mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
                template=_POLICY_KEY_TEMPLATE,
            )
            return True

        return self._run(op)

    # -- the policy anchor ------------------------------------------------------------------------------

    def _anchor_objects(self, session: Any, scope: str) -> list[Any]:
        query = {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: f"{POLICY_ANCHOR_LABEL}:{scope}"}
        return list(session.get_objects(query))

    def policy_anchors(self, scope: str, *, reread: bool = False) -> list[bytes]:
        """Returns the values of the token's policy anchor objects of database ``scope`` (data objects labelled
        ``kmsq-policy-anchor-v1:<scope>``: no mechanism is involved). With ``reread`` the token is read again first
        (at most once a second): SoftHSM2 may not show a session objects another process made after it opened
        (seen with the anchors an operator command wrote while a worker ran)."""
        if reread and time.monotonic() - self._reread_at >= 1.0:
            with self._lock:
                self._reinitialize()
            self._reread_at = time.monotonic()
        return self._run(lambda session: [bytes(o[Attribute.VALUE]) for o in self._anchor_objects(session, scope)])

    def policy_anchor_scopes(self) -> list[str]:
        """Returns the database scopes the token holds policy anchor objects of, sorted (more than one: the token
        serves more than one kmsq database). The token is read again first."""
        with self._lock:
            self._reinitialize()
        prefix = f"{POLICY_ANCHOR_LABEL}:"

        def op(session: Any) -> list[str]:
            found = session.get_objects({Attribute.CLASS: ObjectClass.DATA})
            names = (str(o[Attribute.LABEL]) for o in found)
            return sorted({name.removeprefix(prefix) for name in names if name.startswith(prefix)})

        return self._run(op)

    def write_policy_anchor(self, scope: str, value: bytes, superseded: Sequence[bytes]) -> None:
        """Creates a policy anchor object of ``scope`` holding ``value`` (token, private: only a logged-in session
        reads it), then destroys that scope's anchor objects holding a value in ``superseded``."""

        def op(session: Any) -> None:
            label = f"{POLICY_ANCHOR_LABEL}:{scope}"
            session.create_object({**_POLICY_ANCHOR_TEMPLATE, Attribute.LABEL: label, Attribute.VALUE: value})
            self._objects_created += 1
            old = set(superseded)
            for found in self._anchor_objects(session, scope):
                if bytes(found[Attribute.VALUE]) in old:
                    found.destroy()

        self._run(op)

    def random(self, count: int) -> bytearray:
        """Returns ``count`` bytes from the token's random number generator (C_GenerateRandom)."""
        return bytearray(self._run(lambda session: session.generate_random(count * 8)))

    # -- signing keys kept in the token (generate_signing_key with in_hsm) --------------------------------

    def create_ec_signing_key(self, key_id: bytes) -> bytes:
        """Creates a secp256k1 key pair in the token (CKM_EC_KEY_PAIR_GEN), with CKA_ID ``key_id``: the private
        half non-extractable and sensitive, usable only to sign. Returns the public point, uncompressed (65
        bytes). Raises HsmError when the token cannot make the curve."""
        from pkcs11.util.ec import encode_named_curve_parameters

        def op(session: Any) -> bytes:
            parameters = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256k1")}, local=True
            )
            public, _private = parameters.generate_keypair(
                mechanism=Mechanism.EC_KEY_PAIR_GEN,
                store=True,
                id=key_id,
                label=key_id.decode("ascii"),
                capabilities=_NO_CAPABILITIES,
                public_template=_EC_PUBLIC_TEMPLATE,
                private_template=_EC_PRIVATE_TEMPLATE,
            )
            self._objects_created += 2
            return _ec_point(bytes(public[Attribute.EC_POINT]))

        return self._run(op)

    def sign_ecdsa(self, key_id: bytes, digest: bytes) -> bytes:
        """Returns r || s (64 bytes) of ``digest`` by the token's EC private key ``key_id`` (CKM_ECDSA: the
        digest is signed as given; s may be high). Raises NotFound when the token has no such key."""

        def op(session: Any) -> bytes:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, id=key_id)
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

        try:
            return self._run(op)
        except NotFound:
            raise NotFound("signing key not present in the HSM") from None

    def ec_signing_keys(self) -> list[str]:
        """Returns the labels of the token's EC private keys, sorted. The token is read again first: another
        process (a worker) may have made them."""
        with self._lock:
            self._reinitialize()

        def op(session: Any) -> list[str]:
            found = session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC})
            return sorted(str(key[Attribute.LABEL]) for key in found)

        return self._run(op)

    def destroy_ec_signing_key(self, key_id: bytes) -> None:
        """Destroys both halves of the token signing key ``key_id`` (its EC private and public objects). Raises
        NotFound when the token has neither (looked up again after the token is re-read)."""

        def op(session: Any) -> None:
            found = list(session.get_objects({Attribute.ID: key_id, Attribute.KEY_TYPE: KeyType.EC}))
            if not found:
                raise NotFound("signing key not present in the HSM")
            for obj in found:
                obj.destroy()

        self._run(op)

    def ec_signing_key_attributes(self, key_id: bytes) -> dict[str, Any]:
        """The security attributes of the private half of a token signing key (for operators and tests)."""

        def op(session: Any) -> dict[str, Any]:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, id=key_id)
            return {name: key[Attribute[name]] for name in _REPORTED_ATTRIBUTES if name not in _PUBLIC_KEY_ONLY}

        return self._run(op)

    def policy_mac(self, data: bytes) -> bytes:
        """Returns HMAC-SHA256 of ``data`` under the policy key (CKM_SHA256_HMAC, inside the token).

        Raises ConfigError when the token has no policy key (``kmsq init`` creates it)."""
        try:
            return self._run(
                lambda session: bytes(self._policy_key(session).sign(data, mechanism=Mechanism.SHA256_HMAC))
            )
        except NotFound:
            raise ConfigError("the token has no policy key (run: kmsq init)") from None
