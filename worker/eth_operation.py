"""The operation hash of a BitGo multisig wallet's ``sendMultiSig`` (ETH-like coins), computed by kmsq from the
operation's fields so that the signing rules judge what it does instead of a bare hash.

The hash is Keccak-256 of the fields tightly packed, as Solidity's ``abi.encodePacked`` and BitGo's SDK
(``soliditySHA3`` of ``['string', 'address', 'uint', 'bytes', 'uint', 'uint']``) do: the network's prefix
(schemas.coins.operation_prefix) as UTF-8, the 20-byte destination, the value in wei as 32 bytes, the call data
as it is, the expire time and the sequence id as 32 bytes each, all big-endian.
"""

from __future__ import annotations

from dataclasses import dataclass

from Crypto.Hash import keccak

from worker.errors import InvalidRequest

_UINT256 = 32


@dataclass(frozen=True)
class Operation:
    """A ``sendMultiSig`` operation as the request gives it (checked by schemas.requests.SignOperation)."""

    to: str  # 0x and 40 hex digits
    value: int  # wei
    data: bytes
    expire_time: int
    sequence_id: int

    @property
    def destination(self) -> str:
        """The destination as the rules compare it: lowercase, ``0x``-prefixed."""
        return self.to.lower()


def operation_hash(prefix: str, operation: Operation) -> bytes:
    """Returns the 32-byte operation hash of ``operation`` for a network whose prefix is ``prefix``. Raises
    InvalidRequest for a field out of range."""
    if not 0 <= operation.value < 2**256 or not all(0 <= v < 2**256 for v in (operation.expire_time,
                                                                              operation.sequence_id)):  # fmt: skip
        raise InvalidRequest("value, expire_time and sequence_id must be unsigned 256-bit integers")
    packed = (
        prefix.encode("utf-8") + bytes.fromhex(operation.to[2:]) + operation.value.to_bytes(_UINT256, "big")
        + operation.data + operation.expire_time.to_bytes(_UINT256, "big")
        + operation.sequence_id.to_bytes(_UINT256, "big")
    )  # fmt: skip
    return keccak.new(digest_bits=256, data=packed).digest()
