"""Keys generated and used inside kmsq (``generate_signing_key``, ``sign``): BIP32 roots whose seed comes from
the HSM's random generator, and the signatures the wallet manager asks for in external signing mode.

- **ETH-like coins**: the payload is the wallet contract's operation hash (``0x`` and 32 bytes); the signature
  is ``0x`` + r + s + v, secp256k1 with a low s, v = 27 + the recovery id, made with the xprv's own key (no
  derivation), as BitGo's SDK signs ETH multisig operations. libsecp256k1 through ``coincurve``.
- **UTXO coins**: a PSBT of a BitGo 2-of-3 wallet; not signed yet (refused with ``invalid``).

The xprv is opened only here, only for the length of one signature, and the buffers holding it are
overwritten afterwards as far as Python allows (the ``str`` and ``bytes`` objects the libraries make cannot be).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

from schemas.coins import signing_family
from worker.errors import ConfigError, InvalidRequest

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


def payload_digest(payload: str) -> str:
    """The hex SHA-256 of a payload as sent (what the audit record keeps instead of the payload)."""
    return hashlib.sha256(payload.encode("ascii", "replace")).hexdigest()


def check_signable(coin: str, payload: str, algorithm: str) -> None:
    """Refuses a payload the key's coin cannot sign, before the key is opened. Raises InvalidRequest."""
    family = signing_family(coin)
    if family is None:
        raise InvalidRequest(f"kmsq does not sign for coin {coin[:32]!r}")
    if algorithm != "ecdsa":
        raise InvalidRequest("algorithm must be ecdsa for this coin")
    if family == "eth":
        _eth_hash(payload)
    else:
        raise InvalidRequest("signing PSBTs (UTXO coins) is not supported yet")


def _eth_hash(payload: str) -> bytes:
    if not payload.startswith("0x") or len(payload) != 2 + 2 * _ETH_HASH_BYTES:
        raise InvalidRequest("signablePayload must be 0x and a 32-byte hash (64 hex digits) for this coin")
    return bytes.fromhex(payload[2:])


def sign(coin: str, xprv: str, payload: str, algorithm: str) -> str:
    """Returns the signature of ``payload`` by the key ``xprv`` as the wallet manager expects it for ``coin``.
    Raises InvalidRequest for a payload the coin cannot sign."""
    check_signable(coin, payload, algorithm)
    return _sign_eth(xprv, _eth_hash(payload))


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
