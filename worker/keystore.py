"""What the key service needs from an HSM: :class:`KeyStore`, the methods it calls, and :class:`RootKeyHandle`,
where a root key version lives.

:class:`worker.hsm.Hsm` implements it on a PKCS#11 token; ``tests/fake_hsm.py`` implements it in memory with
cryptography's AES key wrap and AES-GCM, for the fast unit tier. Imports no PKCS#11 code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.envelope import WrapAlgorithm
from worker.secret import SecretBytes


@dataclass(frozen=True)
class RootKeyHandle:
    """Where a root key version lives in the token: its ``CKA_ID`` and ``CKA_LABEL``, and how it wraps."""

    hsm_id: bytes
    label: str
    wrap_algorithm: WrapAlgorithm

    @property
    def is_rsa(self) -> bool:
        """True for RSA-OAEP root keys."""
        return self.wrap_algorithm is not WrapAlgorithm.AES_KWP


def root_key_label(key_id: str, version: int) -> str:
    """Returns the ``CKA_LABEL`` (and, encoded, the ``CKA_ID``) of root key ``key_id`` version ``version``."""
    return f"kmsq:{key_id}:v{version}"


class KeyStore(Protocol):
    """The HSM operations kmsq uses. Failures raise worker.errors: HsmUnavailable (transient), IntegrityError
    (a wrapped key or ciphertext that does not authenticate), NotFound, ConfigError, HsmError."""

    def check(self) -> None:
        """Opens (or re-checks) the connection to the token."""

    def create_aes_root_key(self, key_id: str, version: int) -> RootKeyHandle:
        """A non-extractable, sensitive AES-256 key that can only wrap and unwrap (RFC 5649 KWP)."""

    def create_rsa_root_key(self, key_id: str, version: int, bits: int) -> RootKeyHandle:
        """An RSA key pair whose private half is non-extractable and sensitive and can only unwrap (OAEP)."""

    def destroy_root_key(self, handle: RootKeyHandle) -> None:
        """Removes a root key version from the token."""

    def root_key_attributes(self, handle: RootKeyHandle) -> dict[str, Any]:
        """The security attributes of a root key version (for operators and tests)."""

    def generate_data_key(self, handle: RootKeyHandle, *, readable: bool) -> tuple[bytes, SecretBytes | None]:
        """A fresh AES-256 data key wrapped under ``handle``, and its value when ``readable``."""

    def generate_data_keys(
        self, handle: RootKeyHandle, count: int, *, readable: bool
    ) -> list[tuple[bytes, SecretBytes | None]]:
        """``count`` of :meth:`generate_data_key`."""

    def unwrap_data_key(self, handle: RootKeyHandle, wrapped: bytes) -> SecretBytes:
        """The value of a wrapped data key."""

    def rewrap(self, wrapped: Sequence[tuple[RootKeyHandle, bytes]], target: RootKeyHandle) -> list[bytes | None]:
        """Each data key unwrapped under its root key version and wrapped again under ``target``, inside the
        HSM (the value never leaves it); None for one that does not unwrap. A key under ``target`` already is
        only checked: it comes back as it was."""

    def seal(self, handle: RootKeyHandle, plaintext: SecretBytes, nonce: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """AES-256-GCM under a fresh data key that never leaves the token unwrapped: (wrapped key, ciphertext)."""

    def open(self, handle: RootKeyHandle, wrapped: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> SecretBytes:
        """What :meth:`seal` sealed."""

    def ensure_policy_key(self) -> bool:
        """Creates the policy key unless it exists; True when created."""

    def policy_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under the policy key."""

    def policy_anchors(self, scope: str, *, reread: bool = False) -> list[bytes]:
        """The values of the token's policy anchor objects of database ``scope`` (worker.policy_anchor); with
        ``reread``, after reading the token again (objects another process made since)."""

    def policy_anchor_scopes(self) -> list[str]:
        """The database scopes the token holds policy anchor objects of (read again first)."""

    def write_policy_anchor(self, scope: str, value: bytes, superseded: Sequence[bytes]) -> None:
        """Adds a policy anchor object of ``scope`` holding ``value``, then removes that scope's objects holding a
        value in ``superseded`` (first the new one, so that the token never has none)."""

    def random(self, count: int) -> bytearray:
        """``count`` bytes from the token's random generator."""

    def create_ec_signing_key(self, key_id: bytes) -> bytes:
        """A secp256k1 key pair kept in the token (private half non-extractable, sensitive, sign only): its
        uncompressed public point."""

    def sign_ecdsa(self, key_id: bytes, digest: bytes) -> bytes:
        """r || s of ``digest`` by the token key ``key_id`` (CKM_ECDSA; s may be high)."""

    def ec_signing_keys(self) -> list[str]:
        """The labels (and CKA_IDs) of the token's EC signing keys, sorted; read again first (another process's)."""

    def destroy_ec_signing_key(self, key_id: bytes) -> None:
        """Removes both halves of the token key ``key_id`` (NotFound when neither is there)."""
