"""BitGo's taproot wallet outputs rebuilt from the wallet's three public keys, as ``@bitgo/utxo-lib`` builds them
(``outputScripts.createPaymentP2tr`` and ``createPaymentP2trMusig2``), so that an output can be proved to be the
wallet's own (change) without trusting anything the PSBT says about it but its derivation path.

- ``p2tr`` (chains 30/31): leaves of two keys each, ``<a> OP_CHECKSIGVERIFY <b> OP_CHECKSIG``: user+bitgo at depth
  1, user+backup and backup+bitgo at depth 2; the internal key aggregates user and bitgo with BitGo's legacy MuSig
  (x-only keys sorted first, the second distinct key's coefficient 1).
- ``p2trMusig2`` (chains 40/41): leaves user+backup and backup+bitgo at depth 1; the internal key is BIP327's
  KeyAgg of user and bitgo (compressed keys, in that order).

The output key is the internal key tweaked by the tree's root (BIP341). Which of the three keys is the user's, the
backup's and BitGo's is not known (a PSBT's global xpubs come sorted), and need not be: in any assignment, every
key that can spend a matching output is two of the wallet's three. The six assignments are tried, the one that
matched last first (a rebuilt key costs about 0.13 ms; only an output that claims a wallet path is tried).
"""

from __future__ import annotations

import hashlib
from itertools import permutations

from coincurve import PublicKey

_CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_LEAF_VERSION = 0xC0
_OP_CHECKSIG, _OP_CHECKSIGVERIFY = 0xAC, 0xAD
# The script type of each taproot chain of a BitGo wallet (m/0/0/<chain>/<index>).
TAPROOT_CHAINS = {30: "p2tr", 31: "p2tr", 40: "p2trMusig2", 41: "p2trMusig2"}


def tagged_hash(tag: str, data: bytes) -> bytes:
    """BIP340's tagged hash: SHA-256 of SHA-256(tag) twice, then ``data``."""
    tag_digest = hashlib.sha256(tag.encode()).digest()
    return hashlib.sha256(tag_digest + tag_digest + data).digest()


def wallet_roles(
    script_type: str, keys: tuple[bytes, ...], output_key: bytes, first: tuple[int, ...] = (0, 1, 2)
) -> tuple[int, ...] | None:
    """The assignment of the three compressed ``keys`` to (user, backup, bitgo), as indices, whose ``script_type``
    output (``p2tr`` or ``p2trMusig2``) has ``output_key`` (32 bytes, x-only), trying ``first`` first; None when
    none has."""
    for roles in [first, *(order for order in permutations(range(3)) if order != first)]:
        if wallet_output_key(script_type, tuple(keys[i] for i in roles)) == output_key:
            return roles
    return None


def wallet_output_key(script_type: str, keys: tuple[bytes, ...]) -> bytes:
    """The x-only output key of the ``script_type`` output of ``keys`` = (user, backup, bitgo), compressed. Raises
    ValueError for another script type or an invalid key."""
    user, _backup, bitgo = keys
    x_user, x_backup, x_bitgo = (key[1:] for key in keys)
    if script_type == "p2tr":
        internal = _legacy_musig([x_user, x_bitgo])
        root = _branch(_leaf(x_user, x_bitgo), _branch(_leaf(x_user, x_backup), _leaf(x_backup, x_bitgo)))
    elif script_type == "p2trMusig2":
        internal = _bip327_key_agg([user, bitgo])
        root = _branch(_leaf(x_user, x_backup), _leaf(x_backup, x_bitgo))
    else:
        raise ValueError(f"not a taproot script type: {script_type}")
    tweak = tagged_hash("TapTweak", internal + root)
    return PublicKey(b"\x02" + internal).add(tweak).format()[1:]


def _leaf(a: bytes, b: bytes) -> bytes:
    script = bytes([32]) + a + bytes([_OP_CHECKSIGVERIFY, 32]) + b + bytes([_OP_CHECKSIG])
    return tagged_hash("TapLeaf", bytes([_LEAF_VERSION, len(script)]) + script)


def _branch(a: bytes, b: bytes) -> bytes:
    return tagged_hash("TapBranch", min(a, b) + max(a, b))


def _scalar(digest: bytes) -> bytes:
    return (int.from_bytes(digest, "big") % _CURVE_ORDER).to_bytes(32, "big")


def _key_agg(points: list[bytes], coefficient: dict[bytes, bytes]) -> bytes:
    """The x-only key of the sum of ``points`` (compressed), each times its coefficient (1 when it has none):
    MuSig's aggregation with the second distinct key's coefficient 1."""
    terms = [PublicKey(p).multiply(coefficient[p]) if p in coefficient else PublicKey(p) for p in points]
    return PublicKey.combine_keys(terms).format()[1:]


def _coefficients(points: list[bytes], agg_list: bytes, hashed: list[bytes]) -> dict[bytes, bytes]:
    """Each point's KeyAgg coefficient from ``agg_list`` and its ``hashed`` encoding, except the second distinct
    point's (1)."""
    second = next((p for p in points if p != points[0]), None)
    return {
        p: _scalar(tagged_hash("KeyAgg coefficient", agg_list + h)) for p, h in zip(points, hashed, strict=True)
        if p != second
    }  # fmt: skip


def _legacy_musig(xonly: list[bytes]) -> bytes:
    """utxo-lib's ``aggregateMuSigPubkeys``: x-only keys sorted, each lifted to its even point."""
    keys = sorted(xonly)
    points = [b"\x02" + key for key in keys]
    return _key_agg(points, _coefficients(points, tagged_hash("KeyAgg list", b"".join(keys)), keys))


def _bip327_key_agg(compressed: list[bytes]) -> bytes:
    """BIP327's KeyAgg of compressed keys in the given order; returns the aggregate's x-only key."""
    agg_list = tagged_hash("KeyAgg list", b"".join(compressed))
    return _key_agg(compressed, _coefficients(compressed, agg_list, compressed))
