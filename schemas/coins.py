"""The coins kmsq signs for (``sign``) and how: a UTXO coin's payload is a PSBT of a BitGo 2-of-3 wallet, an
ETH-like coin's a 32-byte operation hash. The names are BitGo's (mainnet and test networks); a token
(``hteth:bgerchv2``) signs as its chain. Other coins can be stored (``put_key``) but not signed for."""

from __future__ import annotations

from typing import Literal

SigningFamily = Literal["utxo", "eth"]

# UTXO coins whose signatures hash like Bitcoin's (BIP143 / BIP341). BCH, BTG (FORKID), ZEC (ZIP-244) and DASH
# hash differently: not signed for.
UTXO_COINS = frozenset({"btc", "tbtc", "tbtc4", "tbtcsig", "ltc", "tltc"})
_ETH_CHAINS = ("eth", "ethw", "rbtc", "etc", "avaxc", "polygon", "arbeth", "opeth", "bsc", "baseeth", "coredao",
               "oas", "flr", "sgb", "wemix", "xdc")  # fmt: skip
ETH_LIKE_COINS = frozenset({*_ETH_CHAINS, *(f"t{c}" for c in _ETH_CHAINS), "hteth", "gteth"})


def signing_family(coin: str) -> SigningFamily | None:
    """How keys of ``coin`` sign (``utxo``, ``eth``), or None when kmsq does not sign for it."""
    chain = coin.split(":", 1)[0].lower()
    if chain in UTXO_COINS:
        return "utxo"
    if chain in ETH_LIKE_COINS:
        return "eth"
    return None
