"""An in-memory :class:`worker.keystore.KeyStore` for the fast unit tier: the same operations as the PKCS#11
adapter, built on cryptography's RFC 5649 key wrap, RSA-OAEP, AES-GCM and HMAC. Key values live in this
process's memory, which is fine for tests and nothing else. The SoftHSM2 tests keep checking the real thing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding, aes_key_wrap_with_padding

from schemas.envelope import WrapAlgorithm
from worker.errors import HsmUnavailable, IntegrityError, NotFound
from worker.keystore import RootKeyHandle, root_key_label
from worker.secret import SecretBytes

_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class FakeHsm:
    """A KeyStore in memory. Set ``down`` to make every call raise HsmUnavailable, as a token gone away."""

    def __init__(self) -> None:
        self._aes: dict[bytes, bytes] = {}
        self._rsa: dict[bytes, rsa.RSAPrivateKey] = {}
        self._policy: bytes | None = None
        self._ec: dict[bytes, Any] = {}
        self._anchors: dict[str, list[bytes]] = {}
        self.down = False
        self.calls = 0

    def clone(self) -> FakeHsm:
        """A token with the same keys (the key objects are immutable, so they are shared) and a state of its own."""
        copy = FakeHsm()
        copy._aes, copy._rsa, copy._ec = dict(self._aes), dict(self._rsa), dict(self._ec)
        copy._policy = self._policy
        copy._anchors = {scope: list(values) for scope, values in self._anchors.items()}
        return copy

    def _ready(self) -> None:
        self.calls += 1
        if self.down:
            raise HsmUnavailable()

    def check(self) -> None:
        self._ready()

    def create_aes_root_key(self, key_id: str, version: int) -> RootKeyHandle:
        self._ready()
        label = root_key_label(key_id, version)
        self._aes[label.encode()] = os.urandom(32)
        return RootKeyHandle(label.encode(), label, WrapAlgorithm.AES_KWP)

    def create_rsa_root_key(self, key_id: str, version: int, bits: int) -> RootKeyHandle:
        self._ready()
        label = root_key_label(key_id, version)
        self._rsa[label.encode()] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return RootKeyHandle(label.encode(), label, WrapAlgorithm.RSA_OAEP_SHA256)

    def destroy_root_key(self, handle: RootKeyHandle) -> None:
        self._ready()
        self._aes.pop(handle.hsm_id, None)
        self._rsa.pop(handle.hsm_id, None)

    def root_key_attributes(self, handle: RootKeyHandle) -> dict[str, Any]:
        self._ready()
        return {"sensitive": True, "extractable": False, "wrap": True, "unwrap": True}

    def _wrap(self, handle: RootKeyHandle, key: bytes) -> bytes:
        if handle.is_rsa:
            return self._rsa_key(handle).public_key().encrypt(key, _OAEP)
        return aes_key_wrap_with_padding(self._aes_key(handle), key)

    def _unwrap(self, handle: RootKeyHandle, wrapped: bytes) -> bytes:
        try:
            if handle.is_rsa:
                return self._rsa_key(handle).decrypt(wrapped, _OAEP)
            return aes_key_unwrap_with_padding(self._aes_key(handle), wrapped)
        except (InvalidUnwrap, ValueError):
            raise IntegrityError() from None

    def _aes_key(self, handle: RootKeyHandle) -> bytes:
        key = self._aes.get(handle.hsm_id)
        if key is None:
            raise NotFound("root key not present in the HSM")
        return key

    def _rsa_key(self, handle: RootKeyHandle) -> rsa.RSAPrivateKey:
        key = self._rsa.get(handle.hsm_id)
        if key is None:
            raise NotFound("root key not present in the HSM")
        return key

    def generate_data_key(self, handle: RootKeyHandle, *, readable: bool) -> tuple[bytes, SecretBytes | None]:
        self._ready()
        key = os.urandom(32)
        return self._wrap(handle, key), SecretBytes(key) if readable else None

    def generate_data_keys(
        self, handle: RootKeyHandle, count: int, *, readable: bool
    ) -> list[tuple[bytes, SecretBytes | None]]:
        return [self.generate_data_key(handle, readable=readable) for _ in range(count)]

    def unwrap_data_key(self, handle: RootKeyHandle, wrapped: bytes) -> SecretBytes:
        self._ready()
        return SecretBytes(self._unwrap(handle, wrapped))

    def rewrap(self, wrapped: Sequence[tuple[RootKeyHandle, bytes]], target: RootKeyHandle) -> list[bytes | None]:
        self._ready()
        out: list[bytes | None] = []
        for handle, key in wrapped:
            try:
                unwrapped = self._unwrap(handle, key)
                out.append(key if handle == target else self._wrap(target, unwrapped))
            except IntegrityError:
                out.append(None)
        return out

    def seal(self, handle: RootKeyHandle, plaintext: SecretBytes, nonce: bytes, aad: bytes) -> tuple[bytes, bytes]:
        self._ready()
        key = os.urandom(32)
        return self._wrap(handle, key), AESGCM(key).encrypt(nonce, bytes(plaintext.view()), aad)

    def open(self, handle: RootKeyHandle, wrapped: bytes, nonce: bytes, aad: bytes, ciphertext: bytes) -> SecretBytes:
        self._ready()
        key = self._unwrap(handle, wrapped)
        try:
            return SecretBytes(AESGCM(key).decrypt(nonce, ciphertext, aad))
        except (InvalidTag, ValueError):
            raise IntegrityError() from None

    def ensure_policy_key(self) -> bool:
        self._ready()
        if self._policy is not None:
            return False
        self._policy = os.urandom(32)
        return True

    def policy_anchors(self, scope: str, *, reread: bool = False) -> list[bytes]:
        self._ready()
        return list(self._anchors.get(scope, []))

    def policy_anchor_scopes(self) -> list[str]:
        self._ready()
        return sorted(scope for scope, values in self._anchors.items() if values)

    def write_policy_anchor(self, scope: str, value: bytes, superseded: Sequence[bytes]) -> None:
        self._ready()
        values = [*self._anchors.get(scope, []), value]
        self._anchors[scope] = [a for a in values if a not in set(superseded)]

    def random(self, count: int) -> bytearray:
        self._ready()
        return bytearray(os.urandom(count))

    def create_ec_signing_key(self, key_id: bytes) -> bytes:
        from coincurve import PrivateKey

        self._ready()
        key = PrivateKey()
        self._ec[key_id] = key
        return key.public_key.format(compressed=False)

    def sign_ecdsa(self, key_id: bytes, digest: bytes) -> bytes:
        from coincurve import PrivateKey

        self._ready()
        if key_id not in self._ec:
            raise NotFound("signing key not present in the HSM")
        key: PrivateKey = self._ec[key_id]
        return key.sign_recoverable(digest, hasher=None)[:64]

    def ec_signing_keys(self) -> list[str]:
        self._ready()
        return sorted(key_id.decode("ascii") for key_id in self._ec)

    def destroy_ec_signing_key(self, key_id: bytes) -> None:
        self._ready()
        if self._ec.pop(key_id, None) is None:
            raise NotFound("signing key not present in the HSM")

    def policy_mac(self, data: bytes) -> bytes:
        self._ready()
        if self._policy is None:
            from worker.errors import ConfigError

            raise ConfigError("the token has no policy key (run: kmsq init)")
        return hmac.new(self._policy, data, hashlib.sha256).digest()
