"""Backups of a deployment's token keys, held M-of-N by custodians (``kmsq backup ...``; docs/OPERATIONS.md).

A **backup key** is an RSA-3072 key pair made once by ``kmsq backup init``. Its public half is trusted by the
token's security officer (worker.hsm_custody, as a new token's transport key is), so the token wraps every key
kmsq keeps for it, exactly as it does for another HSM. Its private half is sealed (AES-256-GCM) under a 256-bit
**seal key**, which is split into SLIP-39 Shamir shares, M of N needed; each share is sealed (HPKE) to one
custodian's key (schemas.custodian). The **backup key file** holds the public key, the sealed private key, the
sealed shares and a MAC under a key derived from the seal key; it holds nothing that opens a key without M
custodians, and can be copied anywhere.

``kmsq backup create`` (no SO PIN, no custodian) writes a **backup file**: the backup key file, every key of the
token wrapped for the backup key, and the policy anchor, MACed under the deployment's policy key. ``kmsq backup
restore`` on a fresh token: M custodians open their shares, the seal key is put together, the backup key file's
MAC verified and the private key opened; the private key becomes a session object in the new token that can
only unwrap; the policy key is unwrapped first as a session key, checked against the check value the backup key
file carries and used to verify the backup file's MAC; only then are the keys unwrapped into the token, each
checked against its key check value.

Key material outside a token, and why: PKCS#11 has no mechanism that splits a key into shares or puts shares
together (M-of-N is each vendor's own: Luna PED keys, nCipher operator cards, CloudHSM quorum), so the seal key
and the backup private key exist in the memory of the ``kmsq backup init`` process, from their generation until
the shares are sealed (milliseconds), and of the ``kmsq backup restore`` process, from the shares' combination
until the private key is a session object in the new token (milliseconds). Neither is written anywhere. The keys
the backup protects never exist outside a token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from schemas.custodian import Custodian, CustodianKey, CustodianKeyError, open_share, seal_share
from schemas.wire import WireError, b64u, canonical_json, from_b64u
from worker import hsm_custody as custody
from worker.errors import ConfigError, InvalidRequest
from worker.hsm import Hsm

KEY_FORMAT = "kmsq-backup-key/v1"
BACKUP_FORMAT = "kmsq-backup/v1"
MAX_CUSTODIANS = 16  # SLIP-39's limit on the shares of one group
MAX_BACKUP_BYTES = 256 << 20
_POLICY_CHECK = b"kmsq/backup-policy-check/v1\x00"
_BODY = b"kmsq/backup/v1\x00"
_KEY_MAC_INFO = b"kmsq/backup-key-mac/v1"
_KEY_SEAL_INFO = b"kmsq/backup-key-seal/v1"


class BackupRefused(InvalidRequest):
    """A backup or backup key file that does not verify, or not enough custodians to open it; nothing changed."""


def _derive(seal_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seal_key)


def target_name(key_id: str) -> str:
    """The name a backup key is trusted under in a token (worker.hsm_custody.BACKUP_PREFIX)."""
    return f"backup-{key_id}"


@dataclass(frozen=True)
class BackupKey:
    """A backup key file's content (see the module docstring); ``mac`` covers everything else."""

    key_id: str
    fingerprint: str
    public_key: str  # DER SubjectPublicKeyInfo, base64url
    threshold: int
    custodians: list[dict[str, str]]  # name, public, share (sealed to the custodian)
    sealed_private: str  # nonce and AES-256-GCM ciphertext of the PKCS#8 private key, base64url
    policy_check: str  # HMAC under the policy key of _POLICY_CHECK + key_id, hex
    created_at: str
    mac: str = ""

    def content(self) -> dict[str, Any]:
        """What the MAC covers."""
        return {"format": KEY_FORMAT, "id": self.key_id, "fingerprint": self.fingerprint,
                "public_key": self.public_key, "threshold": self.threshold, "custodians": self.custodians,
                "sealed_private": self.sealed_private, "policy_check": self.policy_check,
                "created_at": self.created_at}  # fmt: skip

    def document(self) -> dict[str, Any]:
        """The backup key file's content."""
        return {**self.content(), "mac": self.mac}

    @classmethod
    def from_document(cls, data: Any) -> BackupKey:
        """Parses a backup key file's content (its shape only: :func:`open_backup_key` verifies it). Raises
        BackupRefused."""
        if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
            raise BackupRefused(f"not a backup key (format {KEY_FORMAT})")
        try:
            key = cls(str(data["id"]), str(data["fingerprint"]), str(data["public_key"]), int(data["threshold"]),
                      [{"name": str(c["name"]), "public": str(c["public"]), "share": str(c["share"])}
                       for c in data["custodians"]],
                      str(data["sealed_private"]), str(data["policy_check"]), str(data["created_at"]),
                      str(data["mac"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise BackupRefused("the backup key is malformed") from None
        if not 1 <= key.threshold <= len(key.custodians) <= MAX_CUSTODIANS:
            raise BackupRefused("the backup key is malformed (threshold and custodians)")
        return key

    def public_der(self) -> bytes:
        """The public key. Raises BackupRefused."""
        try:
            return from_b64u(self.public_key, max_len=1024)
        except WireError:
            raise BackupRefused("the backup key is malformed (public key)") from None


def _split(seal_key: bytes, threshold: int, count: int) -> list[str]:
    import shamir_mnemonic

    if threshold == 1:  # SLIP-39 forbids 1-of-N groups: every custodian gets the one 1-of-1 share
        return [str(share) for share in shamir_mnemonic.generate_mnemonics(1, [(1, 1)], seal_key)[0]] * count
    return [str(share) for share in shamir_mnemonic.generate_mnemonics(1, [(threshold, count)], seal_key)[0]]


def new_backup_key(hsm: Hsm, custodians: list[Custodian], threshold: int, created_at: str) -> BackupKey:
    """Makes a backup key for ``custodians``, ``threshold`` of whom will be needed to restore (see the module
    docstring; the token computes the policy check value). Returns the backup key file's content; the private
    key and the seal key are gone when it returns.

    Raises ConfigError for a threshold or custodian list that cannot work, or when the token has no policy key."""
    names = [c.name for c in custodians]
    if len(set(names)) != len(names) or len({c.public for c in custodians}) != len(custodians):
        raise ConfigError("each custodian appears once, with a key of their own")
    if not 1 <= threshold <= len(custodians) <= MAX_CUSTODIANS:
        raise ConfigError(f"the threshold is 1 to the number of custodians, who are 1 to {MAX_CUSTODIANS}")
    private = rsa.generate_private_key(public_exponent=65537, key_size=custody.TRANSPORT_BITS)
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    shown = custody.fingerprint(der)
    key_id = hashlib.sha256(der).hexdigest()[:16]
    seal_key = bytearray(os.urandom(32))
    try:
        pkcs8 = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())  # fmt: skip
        nonce = os.urandom(12)
        sealed = nonce + AESGCM(_derive(bytes(seal_key), _KEY_SEAL_INFO)).encrypt(nonce, pkcs8, shown.encode())
        shares = _split(bytes(seal_key), threshold, len(custodians))
        entries = [{"name": c.name, "public": c.public, "share": seal_share(c, key_id, share)}
                   for c, share in zip(custodians, shares, strict=True)]  # fmt: skip
        key = BackupKey(key_id, shown, b64u(der), threshold, entries, b64u(sealed),
                        hsm.policy_mac(_POLICY_CHECK + key_id.encode()).hex(), created_at)  # fmt: skip
        mac = hmac.new(_derive(bytes(seal_key), _KEY_MAC_INFO), canonical_json(key.content()), "sha256").hexdigest()
        return BackupKey(**{**key.__dict__, "mac": mac})
    finally:
        seal_key[:] = bytes(len(seal_key))
        del private


def check_for_this_deployment(hsm: Hsm, key: BackupKey, fingerprint: str) -> None:
    """Checks, on a host that holds the deployment's keys, that a backup key file is the one the operator means
    (``fingerprint``, as ``kmsq backup init`` showed it) and was made by a token holding this deployment's policy
    key. Raises BackupRefused."""
    _check_fingerprint(key, fingerprint)
    expected = hsm.policy_mac(_POLICY_CHECK + key.key_id.encode()).hex()
    if not hmac.compare_digest(expected, key.policy_check):
        raise BackupRefused("this backup key was not made for this deployment (its policy check value differs)")


def _normalized(fingerprint: str) -> str:
    return "".join(ch for ch in fingerprint.lower() if ch in "0123456789abcdef")


def _check_fingerprint(key: BackupKey, fingerprint: str) -> None:
    der = key.public_der()
    actual = custody.fingerprint(der)
    if actual != key.fingerprint or hashlib.sha256(der).hexdigest()[:16] != key.key_id:
        raise BackupRefused("the backup key is malformed (its id or fingerprint is not its key's)")
    if _normalized(fingerprint) != _normalized(actual):
        raise BackupRefused(f"the backup key's fingerprint is {actual}, not the one given; nothing was done")


# -- backup files ------------------------------------------------------------------------------------------------


def _copy_document(copy: custody.WrappedKey) -> dict[str, Any]:
    return {"label": copy.label, "kind": copy.kind, "mechanism": copy.mechanism, "wrapped": b64u(copy.wrapped),
            "kcv": copy.kcv, "public": copy.public}  # fmt: skip


@dataclass
class Made:
    """What ``kmsq backup create`` wrote."""

    key_id: str
    keys: int
    left_out: list[str] = field(default_factory=list)  # keys made before custody: they cannot leave their token
    digest: str = ""  # SHA-256 of the file


def create(
    hsm: Hsm, key: BackupKey, *, scope: str | None, anchor: bytes | None, created_at: str
) -> tuple[dict[str, Any], Made]:
    """Wraps every key of the token for ``key`` and returns the backup file's content, MACed under the policy
    key, with what it holds. The token must trust the backup key (``kmsq backup init`` or ``kmsq backup trust``).

    Raises ConfigError when the backup key is not trusted here, or the policy key cannot leave the token."""
    held = custody.inventory(hsm)
    copies = custody.export_keys(hsm, target_name(key.key_id), backup=True)
    if not any(copy.kind == custody.POLICY_KEY for copy in copies):
        raise ConfigError("the policy key was made before key custody and cannot leave its token: no backup of it "
                          "can be made (see docs/OPERATIONS.md, Key custody)")  # fmt: skip
    body = {"backup_key": key.document(), "created_at": created_at, "source_token": hsm.token_serial(),
            "deployment": scope, "anchor": None if anchor is None else b64u(anchor),
            "copies": [_copy_document(copy) for copy in copies]}  # fmt: skip
    document = {"format": BACKUP_FORMAT, "body": body, "mac": hsm.policy_mac(_BODY + canonical_json(body)).hex()}
    wrapped = {copy.label for copy in copies}
    made = Made(key.key_id, len([c for c in copies if c.kind != custody.REPLICATION]),
                sorted(k.label for k in held if k.label not in wrapped))  # fmt: skip
    return document, made


def file_text(document: dict[str, Any]) -> bytes:
    """The backup file's bytes."""
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def read_backup(raw: bytes) -> dict[str, Any]:
    """Parses a backup file's bytes (its shape only). Raises BackupRefused."""
    if len(raw) > MAX_BACKUP_BYTES:
        raise BackupRefused(f"a backup file is at most {MAX_BACKUP_BYTES >> 20} MiB")
    try:
        data = json.loads(raw)
    except ValueError:
        raise BackupRefused("not a backup file (JSON)") from None
    if not isinstance(data, dict) or data.get("format") != BACKUP_FORMAT or not isinstance(data.get("body"), dict):
        raise BackupRefused(f"not a backup file (format {BACKUP_FORMAT})")
    return data


def _copies(body: dict[str, Any]) -> list[custody.WrappedKey]:
    try:
        return [custody.WrappedKey(str(c["label"]), str(c["kind"]), str(c["mechanism"]),
                                   from_b64u(c["wrapped"], max_len=1 << 16), str(c["kcv"]),
                                   {str(k): str(v) for k, v in c["public"].items()})
                for c in body["copies"]]  # fmt: skip
    except (KeyError, TypeError, AttributeError, WireError):
        raise BackupRefused("the backup file is malformed (its keys)") from None


def _open_private(key: BackupKey, custodian_keys: list[CustodianKey]) -> rsa.RSAPrivateKey:
    """Opens the backup key's private half with the custodians' shares. Raises BackupRefused."""
    import shamir_mnemonic

    entries = {(entry["name"], entry["public"]): entry["share"] for entry in key.custodians}
    shares: dict[str, str] = {}
    for custodian_key in custodian_keys:
        sealed = entries.get((custodian_key.name, custodian_key.custodian.public))
        if sealed is None:
            raise BackupRefused(f"{custodian_key.name!r} is not a custodian of this backup key (or not with this key)")
        try:
            shares[custodian_key.name] = open_share(custodian_key, key.key_id, sealed)
        except CustodianKeyError as e:
            raise BackupRefused(str(e)) from None
    distinct = list(dict.fromkeys(shares.values()))
    if len(distinct) < key.threshold:
        raise BackupRefused(f"this backup needs {key.threshold} of its {len(key.custodians)} custodians; "
                            f"{len(shares)} opened a share; nothing was restored")  # fmt: skip
    try:
        seal_key = bytearray(shamir_mnemonic.combine_mnemonics(distinct[: key.threshold]))
    except shamir_mnemonic.MnemonicError:
        raise BackupRefused("the custodians' shares do not combine (altered, or of another backup key)") from None
    try:
        mac = hmac.new(_derive(bytes(seal_key), _KEY_MAC_INFO), canonical_json(key.content()), "sha256").hexdigest()
        if not hmac.compare_digest(mac, key.mac):
            raise BackupRefused("the backup key does not verify (altered); nothing was restored")
        ciphertext = from_b64u(key.sealed_private, max_len=8192)
        pkcs8 = AESGCM(_derive(bytes(seal_key), _KEY_SEAL_INFO)).decrypt(ciphertext[:12], ciphertext[12:],
                                                                         key.fingerprint.encode())  # fmt: skip
    except (WireError, ValueError):
        raise BackupRefused("the backup key does not verify (altered); nothing was restored") from None
    finally:
        seal_key[:] = bytes(len(seal_key))
    private = serialization.load_der_private_key(pkcs8, None)
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    if not isinstance(private, rsa.RSAPrivateKey) or public != key.public_der():
        raise BackupRefused("the backup key does not verify (altered); nothing was restored")
    return private


@dataclass
class Restored:
    """What ``kmsq backup restore`` did."""

    key_id: str
    created_at: str
    source_token: str
    restored: list[str]
    already_here: list[str]
    anchor_adopted: bool


def restore(hsm: Hsm, raw: bytes, fingerprint: str, custodian_keys: list[CustodianKey]) -> Restored:
    """Restores a backup file into this token, with the keys of at least M custodians; ``fingerprint`` is the
    backup key's, as ``kmsq backup init`` showed it. Nothing is written to the token before the backup verified.

    Raises BackupRefused (too few custodians, a file or share altered, another backup key), ConfigError when
    the token holds other keys under the backup's labels (nothing is restored)."""
    from worker import policy_anchor

    document = read_backup(raw)
    body = document["body"]
    key = BackupKey.from_document(body.get("backup_key"))
    _check_fingerprint(key, fingerprint)
    copies = _copies(body)
    private = _open_private(key, custodian_keys)

    def verify(policy_hmac: Any) -> None:
        if not hmac.compare_digest(policy_hmac(_POLICY_CHECK + key.key_id.encode()).hex(), key.policy_check):
            raise BackupRefused("the backup's policy key is not the one its backup key was made for; nothing was "
                                "restored")  # fmt: skip
        if not hmac.compare_digest(policy_hmac(_BODY + canonical_json(body)).hex(), str(document.get("mac"))):
            raise BackupRefused("the backup file does not verify (altered); nothing was restored")

    try:
        restored = custody.restore_keys(hsm, private, copies, verify)
    finally:
        del private
    adopted = False
    scope, anchor = body.get("deployment"), body.get("anchor")
    if isinstance(scope, str) and isinstance(anchor, str):
        adopted = policy_anchor.adopt(hsm, scope, from_b64u(anchor, max_len=4096))
    labels = [c.label for c in copies if c.kind != custody.REPLICATION]
    return Restored(key.key_id, str(body.get("created_at")), str(body.get("source_token")), restored,
                    [label for label in labels if label not in restored], adopted)  # fmt: skip
