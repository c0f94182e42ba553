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


# The prefix of a BitGo multisig wallet's native-coin operation hash (the ``string`` first in its
# ``sendMultiSig`` operation), per coin: @bitgo/statics' ``nativeCoinOperationHashPrefix`` of each network
# (checked in tests/test_eth_operation.py). A coin missing here (avaxc has none) cannot sign operations.
ETH_OPERATION_PREFIXES = {
    "eth": "ETHER", "hteth": "ETHER", "teth": "ETHER", "gteth": "ETHER", "ethw": "ETHER",
    "polygon": "POLYGON", "tpolygon": "POLYGON", "etc": "ETC", "tetc": "ETC", "rbtc": "RSK", "trbtc": "RSK",
    "arbeth": "42161", "tarbeth": "421614", "opeth": "10", "topeth": "11155420", "bsc": "56", "tbsc": "97",
    "baseeth": "8453", "tbaseeth": "84532", "coredao": "1116", "tcoredao": "1114", "oas": "248", "toas": "9372",
    "flr": "14", "tflr": "114", "sgb": "19", "tsgb": "16", "wemix": "1111", "twemix": "1112", "xdc": "50",
    "txdc": "51",
}  # fmt: skip


def operation_prefix(coin: str) -> str | None:
    """The operation hash prefix of an ETH-like ``coin``'s wallets, or None when kmsq does not hash its operations
    (a token, ``hteth:...``, is refused too: its transfers use another prefix and call data)."""
    return None if ":" in coin else ETH_OPERATION_PREFIXES.get(coin.lower())
