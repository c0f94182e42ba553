"""What a PSBT does, as the signing rules judge it (schemas.signing_rules), established before any key is opened.

**Outputs.** Each output's script is turned into its address on the coin's network. An output is *change* only when
it provably stays in the wallet being spent: the PSBT names the wallet's three root keys (its global xpubs, as
BitGo's PSBTs carry them), one of them is the signing key, every input's script is the 2-of-3 multisig of those
three keys derived at the input's path, and the output's script is the 2-of-3 of the same three keys at its own
``m/0/0/<chain>/<index>`` path (its ``bip32Derivation`` entries say which, and its redeem or witness script is
checked against its scriptPubKey). A taproot input or output (BitGo's p2tr, chains 30/31, and p2trMusig2, 40/41)
is the wallet's when its output key is the one worker.bitgo_taproot rebuilds from the three keys at the one path
its ``tapBip32Derivation`` entries name. A derivation entry alone proves nothing (anyone can write one naming two
keys of their own beside this one), so an output that is not proved change is a *payment*.

**Amounts.** The payment is the sum of the payments' values; the fee is the inputs' values minus the outputs'.
An input without its previous output has no known value: a rule that needs the fee refuses such a PSBT.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas.signing_rules import SigningRules
from worker.bitgo_taproot import TAPROOT_CHAINS, wallet_roles

if TYPE_CHECKING:
    from embit.bip32 import HDKey
    from embit.psbt import PSBT
    from embit.script import Script

# Address prefixes per BitGo coin (embit knows Bitcoin's; Litecoin's are its chainparams').
_NETWORKS: dict[str, dict[str, object]] = {
    "btc": {"p2pkh": b"\x00", "p2sh": b"\x05", "bech32": "bc"},
    "tbtc": {"p2pkh": b"\x6f", "p2sh": b"\xc4", "bech32": "tb"},
    "ltc": {"p2pkh": b"\x30", "p2sh": b"\x32", "bech32": "ltc"},
    "tltc": {"p2pkh": b"\x6f", "p2sh": b"\x3a", "bech32": "tltc"},
}
_NETWORK_OF_COIN = {"btc": "btc", "tbtc": "tbtc", "tbtc4": "tbtc", "tbtcsig": "tbtc", "ltc": "ltc", "tltc": "tltc"}
_OP_2, _OP_3, _OP_CHECKMULTISIG = 0x52, 0x53, 0xAE
_WALLET_DOMAIN = b"kmsq/wallet/v1\x00"


class RuleDenied(Exception):
    """A rule refused the payload: ``rule`` names it (``max_payment``, ``deny_destinations``, ...), the text says
    why without the payload."""

    def __init__(self, scope: str, rule: str, message: str) -> None:
        super().__init__(f"signing rule {rule} of {scope}: {message}")
        self.scope = scope
        self.rule = rule


@dataclass(frozen=True)
class Output:
    """One output: its address (None for a script without one) and value, and whether it is proved change."""

    address: str | None
    value: int
    change: bool


@dataclass(frozen=True)
class Spend:
    """What a PSBT does: its outputs, the payment (what leaves the wallet), the fee (None when an input's value is
    unknown), its input count, and the wallet it spends when it is proved (``wallet_id``)."""

    outputs: tuple[Output, ...]
    inputs: int
    fee: int | None
    wallet_id: str | None
    kind: str = "psbt"  # psbt | operation (an ETH-like wallet's sendMultiSig: one output, no inputs or fee)
    call_data: bool = False  # an operation that calls a contract: what it moves is not its value

    @property
    def payment(self) -> int:
        return sum(o.value for o in self.outputs if not o.change)

    def destinations(self) -> list[str | None]:
        return [o.address for o in self.outputs if not o.change]


def wallet_id(xpubs: Sequence[str]) -> str:
    """The id of a wallet of three root keys (mainnet ``xpub`` strings, any order): 32 hex digits."""
    digest = hashlib.sha256(_WALLET_DOMAIN + "\x00".join(sorted(xpubs)).encode("ascii")).hexdigest()
    return digest[:32]


def network_of(coin: str) -> dict[str, object]:
    """The address prefixes of a UTXO coin's network. Raises KeyError for a coin kmsq does not sign for."""
    return _NETWORKS[_NETWORK_OF_COIN[coin.split(":", 1)[0].lower()]]


def analyse(psbt: PSBT, coin: str, own_xpub: str) -> Spend:
    """Returns what ``psbt`` (parsed by worker.psbt.parse) does for the signing key ``own_xpub`` of ``coin``."""
    network = network_of(coin)
    wallet = _wallet(psbt, own_xpub)
    outputs = []
    for i, vout in enumerate(psbt.tx.vout):
        change = wallet is not None and _pays_wallet(psbt, i, wallet)
        outputs.append(Output(_address(vout.script_pubkey, network), int(vout.value), change))
    values = [inp.utxo.value if inp.utxo is not None else None for inp in psbt.inputs]
    fee = None if None in values else sum(v for v in values if v is not None) - sum(o.value for o in outputs)
    return Spend(tuple(outputs), len(psbt.inputs), fee, None if wallet is None else wallet.id)


def operation_spend(to: str, value: int, call_data: bool) -> Spend:
    """What a ``sendMultiSig`` operation does: ``value`` wei to ``to`` (compared lowercase)."""
    return Spend((Output(to.lower(), value, False),), 0, None, None, kind="operation", call_data=call_data)


def _address(script: Script, network: dict[str, object]) -> str | None:
    try:
        return str(script.address(network))
    except ValueError:
        return None  # OP_RETURN and other scripts without an address: a payment with no destination


@dataclass
class _Wallet:
    id: str
    keys: tuple[HDKey, ...]
    taproot_roles: tuple[int, ...] = (0, 1, 2)  # the keys' roles in its last proved taproot output: tried first


def _wallet(psbt: PSBT, own_xpub: str) -> _Wallet | None:
    """The wallet the PSBT spends, when it is proved: three global xpubs, this key among them, every input the
    2-of-3 of their keys at its path."""
    from embit import bip32
    from embit.networks import NETWORKS

    roots = [key for key in psbt.xpubs if key.depth == 0]
    if len(roots) != 3 or len(psbt.xpubs) != 3:
        return None
    own = bip32.HDKey.from_string(own_xpub)
    mainnet = [bip32.HDKey(k.key, k.chain_code, version=NETWORKS["main"]["xpub"]) for k in roots]
    if not any(k.key.sec() == own.key.sec() and k.chain_code == own.chain_code for k in mainnet):
        return None
    wallet = _Wallet(wallet_id([k.to_string() for k in mainnet]), tuple(mainnet))
    for inp in psbt.inputs:
        spk = inp.utxo.script_pubkey if inp.utxo else None
        if spk is not None and spk.script_type() == "p2tr":
            if not _taproot_of_wallet(spk, inp.taproot_bip32_derivations, wallet):
                return None
            continue
        path = _wallet_path(inp.bip32_derivations)
        script = _multisig_script(spk, inp.redeem_script, inp.witness_script)
        if path is None or script is None or _multisig_keys(script) != _keys_at(wallet, path):
            return None
    return wallet


def _taproot_of_wallet(spk: Script, derivations: dict[Any, Any], wallet: _Wallet) -> bool:
    """Whether the p2tr script ``spk`` is the wallet's own output at the path its taproot derivations name."""
    path = _one_wallet_path([d for _leaves, d in derivations.values()]) if 1 <= len(derivations) <= 3 else None
    if path is None or path[2] not in TAPROOT_CHAINS:
        return False
    keys = tuple(key.derive(list(path)).key.sec() for key in wallet.keys)
    roles = wallet_roles(TAPROOT_CHAINS[path[2]], keys, bytes(spk.data[2:]), wallet.taproot_roles)
    if roles is None:
        return False
    wallet.taproot_roles = roles
    return True


def _pays_wallet(psbt: PSBT, index: int, wallet: _Wallet) -> bool:
    scope = psbt.outputs[index]
    spk = psbt.tx.vout[index].script_pubkey
    if spk.script_type() == "p2tr":
        return _taproot_of_wallet(spk, scope.taproot_bip32_derivations, wallet)
    path = _wallet_path(scope.bip32_derivations)
    if path is None:
        return False
    expected = _keys_at(wallet, path)
    if {pub.sec() for pub in scope.bip32_derivations} != expected:
        return False
    script = _multisig_script(psbt.tx.vout[index].script_pubkey, scope.redeem_script, scope.witness_script)
    return script is not None and _multisig_keys(script) == expected


def _wallet_path(derivations: dict[object, object]) -> tuple[int, ...] | None:
    """The one ``m/0/0/<chain>/<index>`` path all three entries name, or None."""
    return _one_wallet_path(list(derivations.values())) if len(derivations) == 3 else None


def _one_wallet_path(derivations: Sequence[Any]) -> tuple[int, ...] | None:
    """The one unhardened ``m/0/0/<chain>/<index>`` path all of ``derivations`` name, or None."""
    paths = {tuple(d.derivation) for d in derivations}
    if len(paths) != 1:
        return None
    path = paths.pop()
    if len(path) != 4 or path[:2] != (0, 0) or any(step >= 0x80000000 for step in path):
        return None
    return path


def _keys_at(wallet: _Wallet, path: tuple[int, ...]) -> set[bytes]:
    return {key.derive(list(path)).key.sec() for key in wallet.keys}


def _multisig_script(spk: Script | None, redeem: Script | None, witness: Script | None) -> bytes | None:
    """The multisig script an output's scriptPubKey commits to, when its redeem or witness script hashes to it."""
    from embit import hashes

    if spk is None:
        return None
    kind = spk.script_type()
    if kind == "p2sh" and redeem is not None and hashes.hash160(redeem.data) == spk.data[2:22]:
        if redeem.script_type() != "p2wsh":
            return bytes(redeem.data)
        spk = redeem
        kind = "p2wsh"
    if kind == "p2wsh" and witness is not None and hashlib.sha256(witness.data).digest() == spk.data[2:]:
        return bytes(witness.data)
    return None


def _multisig_keys(script: bytes) -> set[bytes] | None:
    """The three keys of ``OP_2 <k1> <k2> <k3> OP_3 OP_CHECKMULTISIG``, or None for another script."""
    if len(script) != 105 or script[0] != _OP_2 or script[-2] != _OP_3 or script[-1] != _OP_CHECKMULTISIG:
        return None
    keys = [script[1 + 34 * i : 35 + 34 * i] for i in range(3)]
    if any(key[0] != 33 for key in keys):
        return None
    return {key[1:] for key in keys}


def check(scope: str, rules: SigningRules, spend: Spend, window_spent: int | None = None) -> None:
    """Raises RuleDenied when ``spend`` breaks one of ``rules`` (of ``scope``); ``window_spent`` is what the
    window has already let leave (needed when the rules have a window)."""
    if rules.none:
        return
    if spend.call_data:
        raise RuleDenied(scope, "data", "an operation with call data (a contract call or a token transfer) moves what "
                         "its value does not say, so its rules cannot judge it")  # fmt: skip
    for rule in (_counts, _destinations, _amounts) if spend.kind == "psbt" else (_destinations, _amounts):
        rule(scope, rules, spend)
    if rules.window is not None:
        spent = window_spent or 0
        if spent + spend.payment > rules.window.max_payment:
            raise RuleDenied(scope, "window", f"{spent} already left in the last {rules.window.seconds} s; "
                             f"{spend.payment} more would pass {rules.window.max_payment}")  # fmt: skip


def _counts(scope: str, rules: SigningRules, spend: Spend) -> None:
    if rules.max_inputs is not None and spend.inputs > rules.max_inputs:
        raise RuleDenied(scope, "max_inputs", f"{spend.inputs} inputs, at most {rules.max_inputs}")
    if rules.max_outputs is not None and len(spend.outputs) > rules.max_outputs:
        raise RuleDenied(scope, "max_outputs", f"{len(spend.outputs)} outputs, at most {rules.max_outputs}")


def _destinations(scope: str, rules: SigningRules, spend: Spend) -> None:
    destinations = spend.destinations()
    fold = spend.kind == "operation"  # ETH addresses compare in any case
    deny = {a.lower() if fold else a for a in rules.deny_destinations}
    denied = [d for d in destinations if d is not None and d in deny]
    if denied:
        raise RuleDenied(scope, "deny_destinations", f"pays {denied[0]}, which is denied")
    if rules.allow_destinations is not None:
        allowed = {a.lower() if fold else a for a in rules.allow_destinations}
        other = [d for d in destinations if d not in allowed]
        if other:
            raise RuleDenied(scope, "allow_destinations", f"pays {other[0] or 'a script without an address'}, "
                             "which is not on the allow list")  # fmt: skip


def _amounts(scope: str, rules: SigningRules, spend: Spend) -> None:
    if rules.max_payment is not None and spend.payment > rules.max_payment:
        raise RuleDenied(scope, "max_payment", f"pays {spend.payment}, at most {rules.max_payment} per transaction")
    if not rules.needs_amounts() or spend.kind != "psbt":  # an operation's gas is not the wallet's to pay
        return
    if spend.fee is None:
        raise RuleDenied(scope, "max_fee", "an input carries no previous output, so the fee cannot be known")
    if rules.max_fee is not None and spend.fee > rules.max_fee:
        raise RuleDenied(scope, "max_fee", f"a fee of {spend.fee}, at most {rules.max_fee}")
    share = rules.max_fee_share_bps
    if share is not None and spend.payment > 0 and spend.fee * 10_000 > share * spend.payment:
        raise RuleDenied(scope, "max_fee_share_bps", f"a fee of {spend.fee} on a payment of {spend.payment}, "
                         f"more than {share / 100:g}% of it")  # fmt: skip
