"""Keys generated and used inside kmsq (``generate_signing_key``, ``sign``): BIP32 roots whose seed comes from
the HSM's random generator, and the signatures the wallet manager asks for in external signing mode.

- **ETH-like coins**: the payload is the wallet contract's operation hash (``0x`` and 32 bytes); the signature
  is ``0x`` + r + s + v, secp256k1 with a low s, v = 27 + the recovery id, made with the xprv's own key (no
  derivation), as BitGo's SDK signs ETH multisig operations. libsecp256k1 through ``coincurve``.
- **UTXO coins**: the hex of a PSBT of a BitGo 2-of-3 wallet; the signature is the same PSBT with this key's
  signatures added (see :mod:`worker.psbt`).

The xprv is opened only here, only for the length of one signature, and the buffers holding it are
overwritten afterwards as far as Python allows (the ``str`` and ``bytes`` objects the libraries make cannot be).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from schemas.coins import signing_family
from worker import psbt
from worker.errors import ConfigError, HsmError, InvalidRequest

if TYPE_CHECKING:
    from embit.psbt import PSBT

SEED_BYTES = 64  # as BitGo's keychains().create()
_ETH_HASH_BYTES = 32


@functools.cache
def _constant_time_curve() -> None:
    """Raises ConfigError unless embit runs on libsecp256k1: without its shared library it falls back, silently,
    to a pure-Python curve that is not constant-time."""
    from embit.util import secp256k1

    if secp256k1.ecdsa_sign.__module__ != "embit.util.ctypes_secp256k1":
        raise ConfigError("embit is not using libsecp256k1 (its shared library did not load): signing is off")


@dataclass(frozen=True)
class GeneratedKey:
    """A new BIP32 root: its xpub (public) and xprv (secret: sealed before it leaves the worker's memory)."""

    xpub: str
    xprv: str = field(repr=False)


def bip32_root(seed: bytearray) -> GeneratedKey:
    """Returns the BIP32 root of ``seed`` (mainnet ``xprv``/``xpub`` versions, as BitGo uses for every coin)
    and overwrites ``seed``."""
    from embit import bip32

    try:
        _constant_time_curve()
        root = bip32.HDKey.from_seed(bytes(seed))
        return GeneratedKey(root.to_public().to_string(), root.to_string())
    finally:
        seed[:] = bytes(len(seed))


# A key kept in the token (generate_signing_key with in_hsm) is stored as a reference to it, sealed like any xprv.
IN_HSM_PREFIX = "pkcs11-ec:"
_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def token_key_id(random_bytes: bytearray) -> bytes:
    """Returns the CKA_ID (and label) of a new token signing key: ``kmsq-ec-`` and the hex of ``random_bytes``."""
    return b"kmsq-ec-" + bytes(random_bytes).hex().encode("ascii")


def token_key_reference(key_id: bytes) -> str:
    """Returns what the ``private_keys`` row of a token signing key holds instead of an xprv."""
    return IN_HSM_PREFIX + key_id.decode("ascii")


def token_key_of(prv: str) -> bytes | None:
    """Returns the CKA_ID a stored ``prv`` refers to, or None when it is an xprv."""
    return prv[len(IN_HSM_PREFIX) :].encode("ascii") if prv.startswith(IN_HSM_PREFIX) else None


def token_xpub(point: bytes, chain_code: bytearray) -> str:
    """Returns the depth-0 xpub of a token key's public ``point`` (uncompressed) and a random ``chain_code``: the
    form the wallet manager expects for ``pub``. Only the key itself signs (as ETH multisig does); children
    derived from the xpub have no private key anywhere."""
    from embit import bip32, ec
    from embit.networks import NETWORKS

    public = ec.PublicKey.parse(point)
    public.compressed = True  # an xpub holds the compressed form
    xpub: str = bip32.HDKey(public, bytes(chain_code), version=NETWORKS["main"]["xpub"]).to_string()
    return xpub


def eth_signature_of(r_s: bytes, digest: bytes, xpub: str) -> str:
    """Returns ``0x`` + r + s + v of the raw ECDSA signature ``r_s`` (r || s, as CKM_ECDSA gives it) of ``digest``
    by the key of ``xpub``: s made low, v = 27 + the recovery id that gives back that key. Raises HsmError when
    no recovery id does (the token signed with another key)."""
    from coincurve import PublicKey
    from embit import bip32

    r, s = int.from_bytes(r_s[:32], "big"), int.from_bytes(r_s[32:], "big")
    if s > _SECP256K1_ORDER // 2:
        s = _SECP256K1_ORDER - s
    compact = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    expected = bip32.HDKey.from_string(xpub).key.sec()
    for recovery_id in (0, 1):
        recovered = PublicKey.from_signature_and_message(compact + bytes([recovery_id]), digest, hasher=None)
        if recovered.format(compressed=True) == expected:
            return "0x" + (compact + bytes([27 + recovery_id])).hex()
    raise HsmError("the token's signature does not verify under the key's xpub")


def payload_digest(payload: str) -> str:
    """The hex SHA-256 of a payload as sent (what the audit record keeps instead of the payload)."""
    return hashlib.sha256(payload.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class Signable:
    """A payload checked against its key's coin: the ETH hash to sign, or the parsed PSBT."""

    digest: bytes | None = None
    psbt: PSBT | None = None


def check_signable(coin: str, payload: str, algorithm: str) -> Signable:
    """Returns ``payload`` checked and parsed for the key's coin, before the key is opened. Raises
    InvalidRequest for a coin kmsq does not sign for, another algorithm than ecdsa, or a malformed payload."""
    family = signing_family(coin)
    if family is None:
        raise InvalidRequest(f"kmsq does not sign for coin {coin[:32]!r}")
    if algorithm != "ecdsa":
        raise InvalidRequest("algorithm must be ecdsa for this coin")
    if family == "eth":
        return Signable(digest=eth_hash(payload))
    return Signable(psbt=psbt.parse(payload))


def eth_hash(payload: str) -> bytes:
    """Returns the 32 bytes of a ``0x`` hash payload. Raises InvalidRequest for anything else."""
    if not payload.startswith("0x") or len(payload) != 2 + 2 * _ETH_HASH_BYTES:
        raise InvalidRequest("signablePayload must be 0x and a 32-byte hash (64 hex digits) for this coin")
    return bytes.fromhex(payload[2:])


def sign(xprv: str, signable: Signable) -> str:
    """Returns the signature of a checked payload (:func:`check_signable`) by the key ``xprv``, as the wallet
    manager expects it. Raises InvalidRequest for a PSBT this key cannot sign."""
    if signable.psbt is not None:
        _constant_time_curve()
        return psbt.sign(xprv, signable.psbt).psbt
    assert signable.digest is not None
    return _sign_eth(xprv, signable.digest)


def _sign_eth(xprv: str, digest: bytes) -> str:
    from coincurve import PrivateKey
    from embit import bip32

    _constant_time_curve()
    secret = bytearray(bip32.HDKey.from_string(xprv).key.secret)
    try:
        signature = PrivateKey(bytes(secret)).sign_recoverable(digest, hasher=None)  # r | s | recovery id; low s
    finally:
        secret[:] = bytes(len(secret))
    return "0x" + (signature[:64] + bytes([27 + signature[64]])).hex()
