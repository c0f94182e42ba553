"""The PKCS#11 half of key custody (with worker/hsm.py, the only modules that import ``pkcs11``): moving a token's
keys into another HSM so that losing one loses nothing, without a key byte ever outside an HSM.

Every key kmsq keeps in a token is ``CKA_SENSITIVE``, ``CKA_EXTRACTABLE`` and ``CKA_WRAP_WITH_TRUSTED``
(worker.hsm): the token wraps it only under a key its security officer marked ``CKA_TRUSTED``. Enrolling token B
into a deployment whose keys token A holds:

1. B makes a **transport key pair** (RSA-3072; the private half sensitive, non-extractable, unwrap only):
   :func:`ensure_transport_key`. Its public key goes to A through the database; the operator compares its
   fingerprint on both hosts.
2. A's security officer imports that public key as trusted, and generates a trusted **replication key** for B
   (AES-256, itself wrap-with-trusted): :func:`trust_transport_key`. Only the SO can set ``CKA_TRUSTED``; the
   objects are public ones, because an SO session sees no private object (and these hold nothing secret: the
   public key is public, and the replication key's value is sensitive).
3. A wraps the replication key under B's transport key with RSA-OAEP (SHA-256 where the token has it; SoftHSM2
   2.6 implements OAEP with SHA-1 only), and every key (AES and RSA root keys, the policy key, token signing
   keys) under the replication key with AES key wrap with padding (RFC 5649: RSA-OAEP cannot carry a private
   key, SoftHSM2 has no CKM_RSA_AES_KEY_WRAP, and one RSA operation per copy set instead of one per key took
   SoftHSM2's import of 101 keys from 52-55 to 78 keys/s, ``python -m kmsq.bench_custody``; what is left is the
   token writing each object). Copies wrapped with RSA-OAEP directly (made before) still import.
4. B unwraps them (:func:`import_keys`) into token objects with the same ids and templates (so B can pass them
   on once its own SO trusts another token), checks each one's **key check value** against A's, and destroys
   the replication key's session copy.

Key check values are computed inside the token and reveal nothing of a key: an AES key's is SHA-256 of its RFC
5649 wrap of a fixed all-zero key (the wrap is deterministic), the policy key's an HMAC of a fixed label, a key
pair's a hash of its public key. Each is the first 8 bytes, in hex.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.constants import DEFAULT

from worker.errors import ConfigError, IntegrityError
from worker.hsm import (
    _EC_PRIVATE_TEMPLATE,
    _EC_PUBLIC_TEMPLATE,
    _NO_CAPABILITIES,
    _POLICY_KEY_TEMPLATE,
    _ROOT_AES_TEMPLATE,
    _ROOT_RSA_PRIVATE_TEMPLATE,
    _ROOT_RSA_PUBLIC_TEMPLATE,
    POLICY_KEY_ID,
    Hsm,
)

TRANSPORT_LABEL = "kmsq-transport-v1"
TRANSPORT_BITS = 3072
TRUSTED_PREFIX = "kmsq-trusted-transport:"  # + the target token's name
BACKUP_PREFIX = "kmsq-trusted-backup:"  # + "backup-" and the backup key's id (worker.backup)
REPLICATION_PREFIX = "kmsq-replication:"  # + the target token's name
ROOT_PREFIX = "kmsq:"  # root key labels (worker.keystore.root_key_label)
EC_PREFIX = "kmsq-ec-"  # token signing keys (worker.token_keys)
_KCV_LABEL = b"kmsq/key-check-value/v1"

# Kinds of keys, and of wrapped copies.
AES_ROOT, RSA_ROOT, POLICY_KEY, EC_SIGNING, REPLICATION = (
    "aes-root",
    "rsa-root",
    "policy-key",
    "ec-signing",
    "replication",
)
_OAEP = {
    "rsa-oaep-sha256": (Mechanism.SHA256, MGF.SHA256, None),
    "rsa-oaep-sha1": (Mechanism.SHA_1, MGF.SHA1, None),
}
_KWP = "aes-kwp"
# A private key's template without the attributes only public and secret keys have (python-pkcs11 sets every
# capability attribute; a token refuses ones a private key cannot have: CKR_ATTRIBUTE_TYPE_INVALID).
_PRIVATE_ONLY = {Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT, Attribute.VERIFY: DEFAULT}


@dataclass(frozen=True)
class TokenKey:
    """A key kmsq keeps in a token: its label, kind, key check value, and whether it can leave the token (keys
    made before custody are non-extractable: they stay where they are)."""

    label: str
    kind: str
    kcv: str
    replicable: bool


@dataclass(frozen=True)
class WrappedKey:
    """A key wrapped for one target token: ``public`` holds a key pair's public half (hex), which the target makes
    as a public object beside the unwrapped private half."""

    label: str
    kind: str
    mechanism: str
    wrapped: bytes
    kcv: str
    public: dict[str, str] = field(default_factory=dict)


# -- transport keys and trust ------------------------------------------------------------------------------------


def ensure_transport_key(hsm: Hsm) -> tuple[bytes, bool]:
    """Makes the token's transport key pair unless it exists. Returns its public key (DER SubjectPublicKeyInfo)
    and whether it was made now."""

    def op(session: Any) -> tuple[bytes, bool]:
        found = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: TRANSPORT_LABEL}))
        made = False
        if not found:
            public, _ = session.generate_keypair(
                KeyType.RSA, TRANSPORT_BITS, id=TRANSPORT_LABEL.encode(), label=TRANSPORT_LABEL, store=True,
                capabilities=_NO_CAPABILITIES, mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                public_template={**_ROOT_RSA_PUBLIC_TEMPLATE, Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"},
                private_template={
                    **_ROOT_RSA_PRIVATE_TEMPLATE, Attribute.EXTRACTABLE: False, Attribute.WRAP_WITH_TRUSTED: False,
                },
            )  # fmt: skip
            found, made = [public], True
        return _der(found[0]), made

    return hsm.run(op)


def _der(public: Any) -> bytes:
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(bytes(public[Attribute.PUBLIC_EXPONENT]), "big"),
        int.from_bytes(bytes(public[Attribute.MODULUS]), "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(public_der: bytes) -> str:
    """Returns the fingerprint an operator compares on both hosts: SHA-256 of the DER public key, in groups of
    four hex digits."""
    digest = hashlib.sha256(public_der).hexdigest()
    return ":".join(digest[i : i + 4] for i in range(0, len(digest), 4))


def _rsa_numbers(public_der: bytes) -> tuple[bytes, bytes]:
    try:
        key = serialization.load_der_public_key(public_der)
    except ValueError:
        raise ConfigError("the transport key is not a DER public key") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < TRANSPORT_BITS:
        raise ConfigError(f"the transport key must be RSA of at least {TRANSPORT_BITS} bits")
    numbers = key.public_numbers()
    return numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"), numbers.e.to_bytes(3, "big").lstrip(b"\0")


def _trusted_label(target: str, backup: bool) -> str:
    return (BACKUP_PREFIX if backup else TRUSTED_PREFIX) + target


def trust_transport_key(hsm: Hsm, target: str, public_der: bytes, so_pin: str, *, backup: bool = False) -> bool:
    """As the token's security officer: imports ``target``'s transport public key as trusted and generates the
    trusted replication key for it. Returns False when both were already there for this same key. With
    ``backup``, ``target`` is a backup key (worker.backup): not a token that replicates takes from the database.

    Raises ConfigError for a wrong SO PIN, or when another key is already trusted under ``target``'s name."""
    modulus, exponent = _rsa_numbers(public_der)
    with hsm.so_session(so_pin) as session:
        existing = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                             Attribute.LABEL: _trusted_label(target, backup)}))  # fmt: skip
        if existing and bytes(existing[0][Attribute.MODULUS]) != modulus:
            raise ConfigError(f"another transport key is already trusted for token {target!r}")
        made = False
        if not existing:
            session.create_object({
                Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: modulus,
                Attribute.PUBLIC_EXPONENT: exponent, Attribute.TOKEN: True, Attribute.PRIVATE: False,
                Attribute.TRUSTED: True, Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False,
                Attribute.MODIFIABLE: False, Attribute.LABEL: _trusted_label(target, backup),
            })  # fmt: skip
            made = True
        replication = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                                Attribute.LABEL: REPLICATION_PREFIX + target}))  # fmt: skip
        if not replication:
            session.generate_key(
                KeyType.AES, 256, label=REPLICATION_PREFIX + target, store=True, capabilities=_NO_CAPABILITIES,
                mechanism=Mechanism.AES_KEY_GEN,
                template={
                    Attribute.PRIVATE: False, Attribute.TRUSTED: True, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True, Attribute.WRAP: True,
                    Attribute.UNWRAP: False, Attribute.ENCRYPT: False, Attribute.DECRYPT: False,
                    Attribute.MODIFIABLE: False,
                },
            )  # fmt: skip
            made = True
    return made


def takes_part(hsm: Hsm) -> bool:
    """Whether the token replicates at all: it has a transport key (it was enrolled) or trusts another token."""

    def op(session: Any) -> bool:
        # Whole lists: a search left unfinished ends later, on a session that may be closed by then.
        enrolled = list(
            session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: TRANSPORT_LABEL})
        )
        trusted = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.TRUSTED: True}))
        return bool(enrolled) or any(str(o[Attribute.LABEL]).startswith(TRUSTED_PREFIX) for o in trusted)

    return hsm.run(op)


def trusted_targets(hsm: Hsm) -> list[str]:
    """Returns the names of the tokens this token's SO trusts (sorted)."""

    def op(session: Any) -> list[str]:
        found = session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.TRUSTED: True})
        labels = (str(obj[Attribute.LABEL]) for obj in found)
        return sorted(label.removeprefix(TRUSTED_PREFIX) for label in labels if label.startswith(TRUSTED_PREFIX))

    return hsm.run(op)


# -- the keys and their check values -----------------------------------------------------------------------------


def _kmsq_keys(session: Any) -> list[tuple[str, str, Any]]:
    """(label, kind, object) of every key kmsq keeps in the token (the private half of a key pair)."""
    keys = []
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        label = str(obj[Attribute.LABEL])
        if label.startswith(ROOT_PREFIX) and obj[Attribute.KEY_TYPE] == KeyType.AES:
            keys.append((label, AES_ROOT, obj))
        elif bytes(obj[Attribute.ID]) == POLICY_KEY_ID:
            keys.append((label, POLICY_KEY, obj))
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        label = str(obj[Attribute.LABEL])
        if label.startswith(ROOT_PREFIX) and obj[Attribute.KEY_TYPE] == KeyType.RSA:
            keys.append((label, RSA_ROOT, obj))
        elif label.startswith(EC_PREFIX) and obj[Attribute.KEY_TYPE] == KeyType.EC:
            keys.append((label, EC_SIGNING, obj))
    return sorted(keys, key=lambda entry: entry[0])


def _public_half(session: Any, kind: str, label: str) -> dict[str, str]:
    public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
    if kind == RSA_ROOT:
        return {"modulus": bytes(public[Attribute.MODULUS]).hex(),
                "exponent": bytes(public[Attribute.PUBLIC_EXPONENT]).hex()}  # fmt: skip
    return {"ec_params": bytes(public[Attribute.EC_PARAMS]).hex(), "ec_point": bytes(public[Attribute.EC_POINT]).hex()}


def _kcv(session: Any, kind: str, label: str, key: Any) -> str:
    if kind == AES_ROOT:
        zero = session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: bytes(32),
            Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
        })  # fmt: skip
        try:
            value = bytes(key.wrap_key(zero, mechanism=Mechanism.AES_KEY_WRAP_PAD, mechanism_param=None))
        finally:
            zero.destroy()
    elif kind == POLICY_KEY:
        value = bytes(key.sign(_KCV_LABEL, mechanism=Mechanism.SHA256_HMAC))
    else:
        value = "".join(_public_half(session, kind, label).values()).encode()
    return hashlib.sha256(_KCV_LABEL + value).hexdigest()[:16]


def inventory(hsm: Hsm) -> list[TokenKey]:
    """Returns every key kmsq keeps in the token, with its key check value (computed in the token), by label."""

    def op(session: Any) -> list[TokenKey]:
        return [
            TokenKey(label, kind, _kcv(session, kind, label, key),
                     bool(key[Attribute.EXTRACTABLE]) and bool(key[Attribute.WRAP_WITH_TRUSTED]))
            for label, kind, key in _kmsq_keys(session)
        ]  # fmt: skip

    return hsm.run(op)


# -- copies --------------------------------------------------------------------------------------------------------


def _oaep_wrap(transport: Any, key: Any) -> tuple[str, bytes]:
    for name, param in _OAEP.items():
        try:
            return name, bytes(transport.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=param))
        except (p11.ArgumentsBad, p11.MechanismParamInvalid, p11.MechanismInvalid):
            continue  # SoftHSM2 2.6: OAEP with SHA-1 only
    raise ConfigError("the token wraps with no RSA-OAEP variant kmsq can use")


def export_keys(hsm: Hsm, target: str, labels: set[str] | None = None, *, backup: bool = False) -> list[WrappedKey]:
    """Wraps the token's keys (those in ``labels``; default: all) for the trusted token ``target`` (with
    ``backup``: the trusted backup key ``target``), and, when a private key is among them, the replication key
    they are wrapped under. Keys that cannot leave (made before custody) are skipped.

    Raises ConfigError when ``target`` is not trusted here (``kmsq hsm trust``, ``kmsq backup trust``)."""

    def op(session: Any) -> list[WrappedKey]:
        found = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                                          Attribute.LABEL: _trusted_label(target, backup)}))  # fmt: skip
        if not found:
            hint = f"kmsq backup trust, with the backup key file of {target}" if backup else f"kmsq hsm trust {target}"
            raise ConfigError(f"{target!r} is not trusted by this token (run: {hint})")
        transport = found[0]
        if not transport[Attribute.TRUSTED]:
            raise ConfigError(f"the transport key of token {target!r} is not marked trusted")
        copies: list[WrappedKey] = []
        replication = None
        for label, kind, key in _kmsq_keys(session):
            if labels is not None and label not in labels:
                continue
            if not (key[Attribute.EXTRACTABLE] and key[Attribute.WRAP_WITH_TRUSTED]):
                continue
            kcv = _kcv(session, kind, label, key)
            if replication is None:
                replication = session.get_key(object_class=ObjectClass.SECRET_KEY, label=REPLICATION_PREFIX + target)
                mechanism, wrapped = _oaep_wrap(transport, replication)
                copies.insert(0, WrappedKey(REPLICATION_PREFIX + target, REPLICATION, mechanism, wrapped, ""))
            # Every key under the replication key: one RSA operation per copy set, not one per key.
            wrapped = bytes(replication.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD, mechanism_param=None))
            public = _public_half(session, kind, label) if kind in (RSA_ROOT, EC_SIGNING) else {}
            copies.append(WrappedKey(label, kind, _KWP, wrapped, kcv, public))
        return copies

    return hsm.run(op)


def _unwrap_template(kind: str, label: str) -> tuple[ObjectClass, KeyType, dict[Attribute, Any]]:
    hsm_id = POLICY_KEY_ID if kind == POLICY_KEY else label.encode("ascii")
    # The id and label first: SoftHSM2 applies a template in order, and after CKA_MODIFIABLE false it refuses
    # them (CKR_ATTRIBUTE_READ_ONLY).
    common = {Attribute.ID: hsm_id, Attribute.LABEL: label}
    if kind == AES_ROOT:
        return ObjectClass.SECRET_KEY, KeyType.AES, {**common, **_ROOT_AES_TEMPLATE}
    if kind == POLICY_KEY:
        return ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, {**common, **_POLICY_KEY_TEMPLATE}
    if kind == RSA_ROOT:
        return ObjectClass.PRIVATE_KEY, KeyType.RSA, {**common, **_ROOT_RSA_PRIVATE_TEMPLATE, **_PRIVATE_ONLY}
    return ObjectClass.PRIVATE_KEY, KeyType.EC, {**common, **_EC_PRIVATE_TEMPLATE, **_PRIVATE_ONLY}


def _make_public_half(session: Any, copy: WrappedKey) -> None:
    values = {name: bytes.fromhex(value) for name, value in copy.public.items()}
    common = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: copy.label.encode("ascii"),
              Attribute.LABEL: copy.label}  # fmt: skip
    if copy.kind == RSA_ROOT:
        parts = {Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: values["modulus"],
                 Attribute.PUBLIC_EXPONENT: values["exponent"]}  # fmt: skip
        session.create_object({**common, **parts, **_ROOT_RSA_PUBLIC_TEMPLATE})
    else:
        parts = {Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: values["ec_params"],
                 Attribute.EC_POINT: values["ec_point"]}  # fmt: skip
        session.create_object({**common, **parts, **_EC_PUBLIC_TEMPLATE})


_REPLICATION_SESSION_KEY = {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                            Attribute.UNWRAP: True}  # fmt: skip


def import_keys(hsm: Hsm, copies: list[WrappedKey]) -> list[str]:
    """Unwraps copies made for this token (:func:`export_keys`) into token objects, each checked against its key
    check value. A key already here with the same check value is skipped. Returns the labels imported.

    Raises ConfigError when the token has no transport key or already holds another key under a copy's label,
    IntegrityError when a copy does not unwrap or its check value differs (the copy is not kept)."""

    def op(session: Any) -> list[str]:
        found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: TRANSPORT_LABEL}))
        if not found:
            raise ConfigError("this token has no transport key (run: kmsq hsm enroll)")
        transport = found[0]
        present = {label: (kind, key) for label, kind, key in _kmsq_keys(session)}
        replication = [_unwrap(transport, copy, ObjectClass.SECRET_KEY, KeyType.AES, _REPLICATION_SESSION_KEY)
                       for copy in copies if copy.kind == REPLICATION]  # fmt: skip
        try:
            return [
                copy.label for copy in copies
                if copy.kind != REPLICATION and _import_one(session, transport, replication, present, copy)
            ]  # fmt: skip
        finally:
            for key in replication:
                key.destroy()

    return hsm.run(op, integrity=True)


def _import_one(
    session: Any, transport: Any, replication: list[Any], present: dict[str, tuple[str, Any]], copy: WrappedKey
) -> bool:
    """Imports one copy; returns False when the same key is already here."""
    if copy.label in present:
        kind, key = present[copy.label]
        if _kcv(session, kind, copy.label, key) != copy.kcv:
            raise ConfigError(f"this token already holds another key labelled {copy.label!r}")
        return False
    if copy.mechanism == _KWP and not replication:
        raise IntegrityError()  # a private key comes with the replication key it is wrapped under
    object_class, key_type, template = _unwrap_template(copy.kind, copy.label)
    key = _unwrap(replication[0] if copy.mechanism == _KWP else transport, copy, object_class, key_type, template)
    if copy.public:
        _make_public_half(session, copy)
    if _kcv(session, copy.kind, copy.label, key) != copy.kcv:
        for obj in session.get_objects({Attribute.LABEL: copy.label}):
            obj.destroy()
        raise IntegrityError()
    return True


def _unwrap(unwrapping: Any, copy: WrappedKey, object_class: ObjectClass, key_type: KeyType,
            template: dict[Attribute, Any]) -> Any:  # fmt: skip
    if copy.mechanism == _KWP:
        mechanism, param = Mechanism.AES_KEY_WRAP_PAD, None
    elif copy.mechanism in _OAEP:
        mechanism, param = Mechanism.RSA_PKCS_OAEP, _OAEP[copy.mechanism]
    else:
        raise IntegrityError()
    store = bool(template.get(Attribute.TOKEN, True))
    return unwrapping.unwrap_key(object_class, key_type, copy.wrapped, mechanism=mechanism, mechanism_param=param,
                                 store=store, capabilities=_NO_CAPABILITIES, template=template)  # fmt: skip


# -- restoring a backup ------------------------------------------------------------------------------------------

_SESSION_POLICY_KEY = {Attribute.TOKEN: False, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                       Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.VERIFY: False,
                       Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.WRAP: False,
                       Attribute.UNWRAP: False, Attribute.DERIVE: False}  # fmt: skip


def _session_unwrapping_key(session: Any, private: rsa.RSAPrivateKey) -> Any:
    """The backup's private key as a session object that can only unwrap (it goes with the session)."""
    numbers = private.private_numbers()
    public = numbers.public_numbers

    def raw(value: int) -> bytes:
        return value.to_bytes((value.bit_length() + 7) // 8, "big")

    return session.create_object({
        Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA, Attribute.TOKEN: False,
        Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.UNWRAP: True,
        Attribute.DECRYPT: False, Attribute.SIGN: False, Attribute.DERIVE: False,
        Attribute.MODULUS: raw(public.n), Attribute.PUBLIC_EXPONENT: raw(public.e),
        Attribute.PRIVATE_EXPONENT: raw(numbers.d), Attribute.PRIME_1: raw(numbers.p),
        Attribute.PRIME_2: raw(numbers.q),
        Attribute.EXPONENT_1: raw(numbers.dmp1), Attribute.EXPONENT_2: raw(numbers.dmq1),
        Attribute.COEFFICIENT: raw(numbers.iqmp),
    })  # fmt: skip


def _refuse_other_keys(session: Any, copies: list[WrappedKey]) -> dict[str, tuple[str, Any]]:
    """Returns the kmsq keys in the token. Raises ConfigError when one has a copy's label but not its check value."""
    present = {label: (kind, key) for label, kind, key in _kmsq_keys(session)}
    for copy in copies:
        if copy.label in present and _kcv(session, present[copy.label][0], copy.label,
                                          present[copy.label][1]) != copy.kcv:  # fmt: skip
            raise ConfigError(f"this token already holds another key labelled {copy.label!r}; nothing was restored")
    return present


def _import_all(session: Any, transport: Any, replication: list[Any], present: dict[str, tuple[str, Any]],
                copies: list[WrappedKey]) -> list[str]:  # fmt: skip
    """Imports every copy but the replication keys; on a failure removes what it imported. Returns the labels."""
    restored: list[str] = []
    try:
        for copy in copies:
            if copy.kind != REPLICATION and _import_one(session, transport, replication, present, copy):
                restored.append(copy.label)
    except Exception:
        for label in restored:
            for obj in list(session.get_objects({Attribute.LABEL: label})):
                obj.destroy()
        raise
    return restored


def restore_keys(
    hsm: Hsm, private: rsa.RSAPrivateKey, copies: list[WrappedKey], verify: Callable[[Callable[[bytes], bytes]], None]
) -> list[str]:
    """Restores a backup's copies (worker.backup) into this token: ``private`` (the backup key, put together by
    the custodians) becomes a session object that only unwraps; the policy key is unwrapped first as a session
    key and handed to ``verify`` as an HMAC function, which raises when the backup does not verify; only then are
    the keys unwrapped into token objects, each checked against its key check value, with the templates a
    replicated key gets (so the token can pass them on). The session objects are destroyed. Returns the labels
    restored (a key already here with the same check value is not restored again).

    Raises ConfigError, before anything is written, when the token holds another key under a copy's label;
    IntegrityError when a copy does not unwrap or does not check (what this call restored is removed again), or
    what ``verify`` raises."""

    def op(session: Any) -> list[str]:
        present = _refuse_other_keys(session, copies)
        policy = [copy for copy in copies if copy.kind == POLICY_KEY]
        if len(policy) != 1:
            raise IntegrityError()
        transient = [_session_unwrapping_key(session, private)]
        try:
            replication = [
                _unwrap(transient[0], copy, ObjectClass.SECRET_KEY, KeyType.AES, _REPLICATION_SESSION_KEY)
                for copy in copies if copy.kind == REPLICATION
            ]  # fmt: skip
            transient.extend(replication)
            if policy[0].mechanism == _KWP and not replication:
                raise IntegrityError()
            unwrapping = replication[0] if policy[0].mechanism == _KWP else transient[0]
            policy_key = _unwrap(unwrapping, policy[0], ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET,
                                 _SESSION_POLICY_KEY)  # fmt: skip
            transient.append(policy_key)
            verify(lambda data: bytes(policy_key.sign(data, mechanism=Mechanism.SHA256_HMAC)))
            return _import_all(session, transient[0], replication, present, copies)
        finally:
            for key in transient:
                key.destroy()

    return hsm.run(op, integrity=True)


# -- what the token can do -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capability:
    """One thing kmsq needs of a token, what needs it, and whether this token has it."""

    name: str
    needed_for: str  # "every pool", "rsa-* root keys", "--in-hsm signing keys", "key custody"
    ok: bool
    detail: str = ""


_MECHANISMS = (
    ("CKM_AES_KEY_GEN", Mechanism.AES_KEY_GEN, "every pool"),
    ("CKM_AES_KEY_WRAP_PAD (RFC 5649)", Mechanism.AES_KEY_WRAP_PAD, "every pool"),
    ("CKM_AES_GCM", Mechanism.AES_GCM, "every pool"),
    ("CKM_GENERIC_SECRET_KEY_GEN", Mechanism.GENERIC_SECRET_KEY_GEN, "every pool"),
    ("CKM_SHA256_HMAC", Mechanism.SHA256_HMAC, "every pool"),
    ("CKM_RSA_PKCS_KEY_PAIR_GEN", Mechanism.RSA_PKCS_KEY_PAIR_GEN, "rsa-* root keys, key custody"),
    ("CKM_RSA_PKCS_OAEP", Mechanism.RSA_PKCS_OAEP, "rsa-* root keys, key custody"),
    ("CKM_EC_KEY_PAIR_GEN", Mechanism.EC_KEY_PAIR_GEN, "--in-hsm signing keys"),
    ("CKM_ECDSA", Mechanism.ECDSA, "--in-hsm signing keys"),
)


def probe(hsm: Hsm) -> list[Capability]:
    """Tries what kmsq needs of the token, with session objects it destroys: the mechanisms it names (in the
    token's list), random numbers, secp256k1 key generation, and that ``CKA_WRAP_WITH_TRUSTED`` is enforced (a key
    carrying it must not wrap out under an untrusted key). Returns each result."""
    from pkcs11.util.ec import encode_named_curve_parameters

    def op(session: Any) -> list[Capability]:
        have = set(session.token.slot.get_mechanisms())
        found = [Capability(name, needed, mechanism in have) for name, mechanism, needed in _MECHANISMS]
        found.append(_tried("C_GenerateRandom", "every pool", lambda: len(session.generate_random(64)) == 8))

        def secp256k1() -> bool:
            parameters = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256k1")}, local=True
            )
            public, private = parameters.generate_keypair(mechanism=Mechanism.EC_KEY_PAIR_GEN, store=False)
            private.destroy()
            public.destroy()
            return True

        found.append(_tried("secp256k1 key pairs", "--in-hsm signing keys", secp256k1))
        found.append(_tried("CKA_WRAP_WITH_TRUSTED enforced", "key custody", lambda: _trusted_wrap_enforced(session)))
        return found

    return hsm.run(op)


def _tried(name: str, needed_for: str, attempt: Any) -> Capability:
    try:
        return Capability(name, needed_for, bool(attempt()))
    except p11.PKCS11Error as e:
        return Capability(name, needed_for, False, type(e).__name__)


def _trusted_wrap_enforced(session: Any) -> bool:
    def aes(template: dict[Attribute, Any]) -> Any:
        return session.generate_key(KeyType.AES, 256, store=False, capabilities=_NO_CAPABILITIES,
                                    mechanism=Mechanism.AES_KEY_GEN, template=template)  # fmt: skip

    guarded = aes({Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True})
    untrusted = aes({Attribute.WRAP: True})
    try:
        untrusted.wrap_key(guarded, mechanism=Mechanism.AES_KEY_WRAP_PAD, mechanism_param=None)
    except p11.KeyNotWrappable:
        return True
    finally:
        guarded.destroy()
        untrusted.destroy()
    return False


def missing(capabilities: list[Capability], root_key_types: set[str], custody: bool) -> list[Capability]:
    """What the token lacks that this deployment needs: what every pool needs, what its RSA root keys need (when
    ``root_key_types`` has one), and what key custody needs (``custody``: the token takes part in it). The needs
    of ``--in-hsm`` signing keys are left out: without them only those requests fail, each with its reason."""
    needed = {"every pool"}
    if any(kind.startswith("rsa-") for kind in root_key_types):
        needed.add("rsa-* root keys")
    if custody:
        needed.add("key custody")
    return [c for c in capabilities if not c.ok and any(part.strip() in needed for part in c.needed_for.split(","))]
