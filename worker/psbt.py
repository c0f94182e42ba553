"""Signing the PSBTs of BitGo 2-of-3 wallets (UTXO coins in external signing mode).

A wallet PSBT names, on each input, the public keys that may sign it and how each derives from its wallet key:
``bip32Derivation`` (p2sh, p2shP2wsh, p2wsh) or ``tapBip32Derivation`` (p2tr) entries holding the root key's
fingerprint and the path ``m/0/0/<chain>/<index>``. An input is this key's when an entry carries this root's
fingerprint; the derived key must then be the public key the entry names, and must appear in the input's script.

What is signed, per script type (the sighash is picked from the script, not from which UTXO field the PSBT
carries: BitGo's PSBTs carry ``witnessUtxo`` on legacy p2sh inputs too):

- p2sh: the legacy sighash of the redeem script; an ECDSA ``partialSig``.
- p2shP2wsh, p2wsh: the BIP143 sighash of the witness script and the input's value; an ECDSA ``partialSig``.
- p2tr script path: the BIP341 sighash of each leaf (``tapLeafScript``) holding this key; a Schnorr ``tapScriptSig``.
- p2tr MuSig2 key path (BitGo's ``p2trMusig2``, internal key and merkle root, no leaf): refused, it needs a nonce
  round the key-provider API does not have.

Sighashes come from embit (PSBT parsing and BIP143/BIP341 digests) and :class:`LegacySighash` (the legacy digest,
serializing the transaction once for every input), signatures from libsecp256k1 through coincurve (ECDSA with a low
s; BIP340 Schnorr with fresh auxiliary randomness).

What one PSBT may cost is bounded before any key is opened: at most ``MAX_PSBT_INPUTS`` inputs,
``MAX_PSBT_OUTPUTS`` outputs and ``MAX_PSBT_TAP_LEAVES_PER_INPUT`` leaves per input, and at most
``MAX_PSBT_LEGACY_SIGHASH_BYTES`` hashed by the legacy sighashes, which each cover the whole transaction (a
6,000-input p2sh PSBT held a worker for 135 s). An input names this key once (each derivation entry would hash its
script again).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

from schemas.limits import (
    MAX_PSBT_INPUTS,
    MAX_PSBT_LEGACY_SIGHASH_BYTES,
    MAX_PSBT_OUTPUTS,
    MAX_PSBT_TAP_LEAVES_PER_INPUT,
)
from worker.errors import InvalidRequest

if TYPE_CHECKING:
    from embit.bip32 import HDKey
    from embit.psbt import PSBT, InputScope
    from embit.script import Script
    from embit.transaction import Transaction

# The chains of a BitGo wallet's derivation paths m/0/0/<chain>/<index>: external and internal (change) per script
# type (p2sh 0/1, p2shP2wsh 10/11, p2wsh 20/21, p2tr 30/31, p2trMusig2 40/41).
WALLET_CHAINS = frozenset({0, 1, 10, 11, 20, 21, 30, 31, 40, 41})
_SIGHASH_DEFAULT = 0x00
_SIGHASH_ALL = 0x01
_TAPSCRIPT_LEAF_VERSION = 0xC0


@dataclass(frozen=True)
class SignedPsbt:
    """The PSBT with this key's signatures added (hex), and how many it added."""

    psbt: str
    signatures: int


def parse(payload: str) -> PSBT:
    """Returns the PSBT in ``payload`` (hex, ``0x`` allowed). Raises InvalidRequest when it is not one, or when
    signing it could cost more than the limits allow (inputs, outputs, leaves per input, legacy sighash bytes)."""
    from embit.psbt import PSBT

    text = payload[2:] if payload.startswith(("0x", "0X")) else payload
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InvalidRequest("signablePayload must be the hex of a PSBT for this coin") from None
    if not raw.startswith(b"psbt\xff"):
        raise InvalidRequest("signablePayload is not a PSBT (it does not start with the PSBT magic bytes)")
    check_declared_counts(raw)
    try:
        psbt = PSBT.parse(raw)
    except Exception:  # embit raises several types (PSBTError, ValueError, IndexError...) on malformed input
        raise InvalidRequest("signablePayload is not a well-formed PSBT") from None
    if not psbt.inputs:
        raise InvalidRequest("the PSBT has no input")
    if len(psbt.inputs) > MAX_PSBT_INPUTS:
        raise InvalidRequest(f"the PSBT has {len(psbt.inputs)} inputs; a PSBT may have at most {MAX_PSBT_INPUTS}")
    if len(psbt.outputs) > MAX_PSBT_OUTPUTS:
        raise InvalidRequest(f"the PSBT has {len(psbt.outputs)} outputs; a PSBT may have at most {MAX_PSBT_OUTPUTS}")
    for i, inp in enumerate(psbt.inputs):
        if len(inp.taproot_scripts) > MAX_PSBT_TAP_LEAVES_PER_INPUT:
            raise InvalidRequest(
                f"input {i} carries {len(inp.taproot_scripts)} tapLeafScripts; an input may carry at most "
                f"{MAX_PSBT_TAP_LEAVES_PER_INPUT}"
            )
        _check_previous_output(i, inp)
    work = legacy_sighash_bytes(psbt)
    if work > MAX_PSBT_LEGACY_SIGHASH_BYTES:
        raise InvalidRequest(
            f"the legacy (p2sh) sighashes of this PSBT would hash {work} bytes; a PSBT may need at most "
            f"{MAX_PSBT_LEGACY_SIGHASH_BYTES}: send fewer inputs or outputs per PSBT"
        )
    return psbt


def check_declared_counts(raw: bytes) -> None:
    """Raises InvalidRequest when a count the PSBT declares would make embit build that many objects before it
    sees the data is not there: PSBTv2's input and output counts (global keys 0x04, 0x05) and the number of leaf
    hashes of a taproot derivation (input key 0x16, output key 0x07). A mutated PSBT of 4 KiB declaring 2**32 leaf
    hashes made the parser allocate 23 GiB. Walks the maps (``<keylen><key><vallen><value>``, each map ended by a
    zero key length) without parsing the values otherwise."""
    from embit.transaction import Transaction

    stream = BytesIO(raw[5:])
    global_map = _read_map(stream)
    for key, value in global_map:
        if key[:1] in (b"\x04", b"\x05") and _compact(value) > max(MAX_PSBT_INPUTS, MAX_PSBT_OUTPUTS):
            raise InvalidRequest("the PSBT declares more inputs or outputs than a PSBT may have")
    unsigned = next((value for key, value in global_map if key == b"\x00"), None)
    if unsigned is None:
        return  # PSBTv2 (its counts are checked above) or malformed: embit says which
    try:
        tx = Transaction.parse(unsigned)
    except Exception:  # embit raises several types on a malformed transaction
        raise InvalidRequest("signablePayload is not a well-formed PSBT") from None
    for count, leaf_key in ((len(tx.vin), 0x16), (len(tx.vout), 0x07)):
        for _ in range(count):
            for key, value in _read_map(stream):
                if key[:1] == bytes([leaf_key]):
                    value_stream = BytesIO(value)
                    if _read_compact(value_stream) * 32 > len(value) - value_stream.tell():
                        raise InvalidRequest("a taproot derivation of the PSBT declares more leaf hashes than it holds")


def _read_map(stream: BytesIO) -> list[tuple[bytes, bytes]]:
    """The key-value pairs of one PSBT map. Raises InvalidRequest when the data ends inside it."""
    pairs: list[tuple[bytes, bytes]] = []
    with stream.getbuffer() as view:
        total = len(view)
    while True:
        length = _read_compact(stream)
        if length == 0:
            return pairs
        if length > total - stream.tell():
            raise InvalidRequest("signablePayload is not a well-formed PSBT (it ends inside a map)")
        key = stream.read(length)
        size = _read_compact(stream)
        if size > total - stream.tell():
            raise InvalidRequest("signablePayload is not a well-formed PSBT (it ends inside a map)")
        pairs.append((key, stream.read(size)))


def _read_compact(stream: BytesIO) -> int:
    from embit import compact

    try:
        return int(compact.read_from(stream))
    except (RuntimeError, TypeError):
        raise InvalidRequest("signablePayload is not a well-formed PSBT (it ends inside a map)") from None


def _compact(value: bytes) -> int:
    return _read_compact(BytesIO(value))


def legacy_sighash_bytes(psbt: PSBT) -> int:
    """Returns how many bytes the legacy sighashes of ``psbt`` would hash if every input that takes one (it spends
    a p2sh output and its redeemScript is not p2wsh) were signed, whosever it is: for each, the transaction with
    every other input's script empty and its own redeem script, the sighash type appended. Linear in the PSBT."""
    from embit import compact

    scripts = [len(inp.redeem_script.serialize()) for inp in psbt.inputs if _takes_legacy_sighash(inp)]
    if not scripts:
        return 0
    tx = psbt.tx
    outputs = sum(8 + len(out.script_pubkey.serialize()) for out in tx.vout)
    size = 4 + len(compact.to_bytes(len(tx.vin))) + 41 * len(tx.vin) + len(compact.to_bytes(len(tx.vout))) + outputs
    return len(scripts) * (size - 1 + 8) + sum(scripts)  # its own empty script replaced; locktime, sighash type


def _takes_legacy_sighash(inp: InputScope) -> bool:
    utxo, redeem = inp.utxo, inp.redeem_script
    return (
        utxo is not None and redeem is not None and utxo.script_pubkey.script_type() == "p2sh"
        and redeem.script_type() != "p2wsh"
    )  # fmt: skip


def _check_previous_output(index: int, inp: InputScope) -> None:
    """Raises InvalidRequest unless an input's ``nonWitnessUtxo`` is the transaction the input spends (its txid,
    an output at its vout) and agrees with its ``witnessUtxo`` when it has both: a signer that took a value on
    trust could be led to sign away a fee it did not see."""
    previous = inp.non_witness_utxo
    if previous is None:
        return
    if inp.vout is None or inp.vout >= len(previous.vout) or previous.txid() != inp.txid:
        raise InvalidRequest(f"input {index}: its nonWitnessUtxo is not the transaction it spends")
    if inp.witness_utxo is not None and inp.witness_utxo.serialize() != previous.vout[inp.vout].serialize():
        raise InvalidRequest(f"input {index}: its witnessUtxo and nonWitnessUtxo disagree")


def sign(xprv: str, payload: str | PSBT) -> SignedPsbt:
    """Returns the PSBT in ``payload`` (hex, or as :func:`parse` returned it: then it is changed) with the
    signatures of the wallet key ``xprv`` added to every input that key can sign.

    Raises InvalidRequest for a payload that is not a PSBT, a PSBT with no input for this key, an input of this
    key that kmsq cannot sign (MuSig2 key path, an unsupported script or sighash type, a derivation that does not
    lead to the key it names, a missing previous output).
    """
    from embit import bip32

    psbt = parse(payload) if isinstance(payload, str) else payload
    keys = _Derivations(bip32.HDKey.from_string(xprv))
    try:
        plans = list(_plan(psbt, keys.root.my_fingerprint))
        if not plans:
            raise InvalidRequest("no input of this PSBT is for this key (no derivation with its fingerprint)")
        sighashes = _Sighashes(psbt)
        count = 0
        for plan in plans:
            count += _sign_input(psbt, sighashes, keys, plan)
    finally:
        keys.wipe()
    return SignedPsbt(psbt.serialize().hex(), count)


class LegacySighash:
    """The legacy (pre-segwit) ``SIGHASH_ALL`` digests of a transaction's inputs, byte for byte embit's
    ``Transaction.sighash_legacy``, with the transaction serialized once instead of once per input.

    An input's digest is the double SHA-256 of the transaction with every input's script empty but its own, which
    is the script signed, and the sighash type appended. What every digest shares (version, input count, each input
    as outpoint, empty script and sequence, the outputs, locktime and sighash type) is one buffer; an input's
    digest hashes the buffer before that input, its outpoint, script and sequence, and the buffer after it. The
    bytes hashed still grow with inputs x transaction size (``MAX_PSBT_LEGACY_SIGHASH_BYTES`` bounds them), the
    Python work per input no longer does (embit serializes every input and output for each: the digests of a
    1,600-input p2sh PSBT took it 10-19 s, and take this 0.08-0.12 s)."""

    def __init__(self, tx: Transaction) -> None:
        from embit import compact

        self._inputs = [
            (bytes(reversed(vin.txid)) + vin.vout.to_bytes(4, "little"), vin.sequence.to_bytes(4, "little"))
            for vin in tx.vin
        ]
        shared = bytearray(tx.version.to_bytes(4, "little") + compact.to_bytes(len(tx.vin)))
        self._starts: list[int] = []
        for outpoint, sequence in self._inputs:
            self._starts.append(len(shared))
            shared += outpoint + b"\x00" + sequence
        self._starts.append(len(shared))
        shared += compact.to_bytes(len(tx.vout))
        for out in tx.vout:
            shared += out.serialize()
        shared += tx.locktime.to_bytes(4, "little") + _SIGHASH_ALL.to_bytes(4, "little")
        self._shared = bytes(shared)

    def digest(self, index: int, script: Script) -> bytes:
        """Returns the ``SIGHASH_ALL`` digest of input ``index`` signing ``script`` (a p2sh input's redeem script)."""
        if not 0 <= index < len(self._inputs):
            raise IndexError("input index out of range")
        shared = memoryview(self._shared)
        outpoint, sequence = self._inputs[index]
        h = hashlib.sha256(shared[: self._starts[index]])
        h.update(outpoint)
        h.update(script.serialize())
        h.update(sequence)
        h.update(shared[self._starts[index + 1] :])
        return hashlib.sha256(h.digest()).digest()


class _Sighashes:
    """What the sighashes of one PSBT's inputs share, made once: the transaction (whose caches of the prevouts,
    sequences and outputs serve every BIP143 and BIP341 digest), the legacy serialization, and every input's
    previous output (which a BIP341 digest commits to)."""

    def __init__(self, psbt: PSBT) -> None:
        self.psbt = psbt
        self.tx = psbt.tx

    @functools.cached_property
    def legacy(self) -> LegacySighash:
        return LegacySighash(self.tx)

    @functools.cached_property
    def spent(self) -> tuple[list[Script], list[int]]:
        """Every input's previous output script and value. Raises InvalidRequest when an input carries none."""
        missing = [j for j, other in enumerate(self.psbt.inputs) if other.utxo is None]
        if missing:
            raise InvalidRequest(
                f"input {missing[0]} carries no previous output, which a taproot signature commits to (every input's)"
            )
        utxos = [other.utxo for other in self.psbt.inputs]
        return [utxo.script_pubkey for utxo in utxos], [utxo.value for utxo in utxos]


class _Derivations:
    """The keys derived from one root for one PSBT. A wallet's inputs share their path up to the chain
    (``m/0/0/<chain>``), so each prefix is derived once (it was 60% of the signing time)."""

    def __init__(self, root: HDKey) -> None:
        self.root = root
        self._derived: dict[tuple[int, ...], HDKey] = {(): root}

    def derive(self, path: tuple[int, ...]) -> HDKey:
        """Returns the key at ``path`` below the root."""
        known = len(path)
        while path[:known] not in self._derived:
            known -= 1
        key = self._derived[path[:known]]
        for depth in range(known, len(path)):
            key = key.child(path[depth] & 0x7FFFFFFF, hardened=path[depth] >= 0x80000000)
            self._derived[path[: depth + 1]] = key
        return key

    def wipe(self) -> None:
        """Drops every derived key's secret (and the root's)."""
        for key in self._derived.values():
            _wipe(key)
        self._derived.clear()


@dataclass(frozen=True)
class _Plan:
    index: int
    pub: Any  # embit ec.PublicKey named by the derivation entry
    path: tuple[int, ...]
    taproot: bool


def _plan(psbt: PSBT, fingerprint: bytes) -> Iterator[_Plan]:
    """Yields the inputs this root's fingerprint appears on, checking each can be signed before anything is."""
    for i, inp in enumerate(psbt.inputs):
        ours = [(pub, der) for pub, der in inp.bip32_derivations.items() if der.fingerprint == fingerprint]
        taproot = inp.taproot_bip32_derivations.items()
        ours_taproot = [(pub, der) for pub, (_leaves, der) in taproot if der.fingerprint == fingerprint]
        if not ours and not ours_taproot:
            continue
        if inp.final_scriptsig is not None or inp.final_scriptwitness is not None:
            continue  # already finalized: nothing left to sign
        if len(ours) + len(ours_taproot) > 1:  # each would hash the input's script again: 4,000 took 3 s
            raise InvalidRequest(
                f"input {i} names this key's fingerprint in {len(ours) + len(ours_taproot)} derivations; a wallet "
                "input names each of its keys once"
            )
        if ours_taproot and inp.taproot_internal_key is not None and not inp.taproot_scripts:
            raise InvalidRequest(
                f"input {i} is a MuSig2 key-path spend (p2trMusig2), which needs a nonce exchange kmsq does not "
                "offer; only script-path taproot inputs are signed"
            )
        sighash = inp.sighash_type
        allowed = (_SIGHASH_ALL,) if ours else (_SIGHASH_DEFAULT, _SIGHASH_ALL)  # ECDSA: SIGHASH_ALL only
        if sighash is not None and sighash not in allowed:
            raise InvalidRequest(f"input {i} asks for sighash type {sighash:#x}; kmsq signs SIGHASH_ALL only")
        if inp.utxo is None:
            raise InvalidRequest(f"input {i} carries no previous output (witnessUtxo or nonWitnessUtxo)")
        for pub, der in ours:
            yield _Plan(i, pub, _wallet_path(i, der.derivation), taproot=False)
        for pub, der in ours_taproot:
            yield _Plan(i, pub, _wallet_path(i, der.derivation), taproot=True)


def _wallet_path(index: int, derivation: list[int]) -> tuple[int, ...]:
    """Returns ``derivation`` when it is a BitGo wallet path, ``m/0/0/<chain>/<index>``. Raises InvalidRequest for
    any other (the root itself, a hardened step, another chain): a wallet key signs only where its wallet spends."""
    path = tuple(derivation)
    if len(path) != 4 or path[:2] != (0, 0) or path[2] not in WALLET_CHAINS or path[3] >= 0x80000000:
        shown = "m" + "".join(f"/{p & 0x7FFFFFFF}" + ("'" if p >= 0x80000000 else "") for p in path)
        raise InvalidRequest(f"input {index}: the derivation path {shown} of this key is not a BitGo wallet path "
                             "(m/0/0/<chain>/<index>, chains 0, 1, 10, 11, 20, 21, 30, 31, 40, 41)")  # fmt: skip
    return path


def _derive(keys: _Derivations, plan: _Plan) -> HDKey:
    """Returns the key ``plan``'s path leads to. Raises InvalidRequest unless it is the public key the entry names."""
    child = keys.derive(plan.path)
    public = child.key.get_public_key()
    matches = public.xonly() == plan.pub.xonly() if plan.taproot else public.sec() == plan.pub.sec()
    if not matches:
        raise InvalidRequest(
            f"input {plan.index}: the derivation path given for this key's fingerprint does not lead to the public "
            "key it names"
        )
    return child


def _sign_input(psbt: PSBT, sighashes: _Sighashes, keys: _Derivations, plan: _Plan) -> int:
    child = _derive(keys, plan)
    inp = psbt.inputs[plan.index]
    if plan.taproot:
        return _sign_taproot(sighashes, plan.index, inp, child)
    digest, sighash = _ecdsa_digest(sighashes, plan.index, inp, plan.pub.sec())
    inp.partial_sigs[plan.pub] = _ecdsa(child, digest) + bytes([sighash])
    return 1


def _ecdsa_digest(sighashes: _Sighashes, index: int, inp: InputScope, sec: bytes) -> tuple[bytes, int]:
    """Returns the sighash digest of a p2sh, p2shP2wsh or p2wsh input and its sighash type. Raises InvalidRequest
    for another script type, scripts that do not hash to the previous output's, or a script without this key."""
    from embit import hashes

    spk = inp.utxo.script_pubkey
    kind = spk.script_type()
    redeem, witness = inp.redeem_script, inp.witness_script
    if kind == "p2sh":
        if redeem is None or hashes.hash160(redeem.data) != spk.data[2:22]:
            raise InvalidRequest(f"input {index}: its redeemScript does not hash to the p2sh output it spends")
        segwit = redeem.script_type() == "p2wsh"
        if segwit and (witness is None or hashlib.sha256(witness.data).digest() != redeem.data[2:]):
            raise InvalidRequest(f"input {index}: its witnessScript does not hash to the p2shP2wsh redeemScript")
    elif kind == "p2wsh":
        segwit = True
        if witness is None or hashlib.sha256(witness.data).digest() != spk.data[2:]:
            raise InvalidRequest(f"input {index}: its witnessScript does not hash to the p2wsh output it spends")
    else:
        raise InvalidRequest(f"input {index} spends a {kind} output, which is not a BitGo multisig script kmsq signs")
    script = witness if segwit else redeem
    assert script is not None
    if sec not in script.data:
        raise InvalidRequest(f"input {index}: this key's derived public key is not in the input's script")
    sighash = inp.sighash_type if inp.sighash_type is not None else _SIGHASH_ALL  # SIGHASH_ALL: _plan refuses others
    if segwit:
        return sighashes.tx.sighash_segwit(index, script, inp.utxo.value, sighash=sighash), sighash
    return sighashes.legacy.digest(index, script), sighash


def _sign_taproot(sighashes: _Sighashes, index: int, inp: InputScope, child: HDKey) -> int:
    """Signs every leaf of a script-path input that holds ``child``'s key. Returns how many it signed."""
    from embit import ec, hashes
    from embit.script import Script

    if inp.utxo.script_pubkey.script_type() != "p2tr":
        raise InvalidRequest(f"input {index} has taproot derivations but does not spend a p2tr output")
    spks, values = sighashes.spent
    xonly = child.key.get_public_key().xonly()
    sighash = inp.sighash_type if inp.sighash_type is not None else _SIGHASH_DEFAULT
    signed = 0
    for leaf in inp.taproot_scripts.values():
        if not leaf:
            raise InvalidRequest(f"input {index} carries an empty tapLeafScript")
        leaf_version, script = leaf[-1], Script(leaf[:-1])
        if leaf_version != _TAPSCRIPT_LEAF_VERSION or xonly not in script.data:
            continue
        digest = sighashes.tx.sighash_taproot(
            index, script_pubkeys=spks, values=values, sighash=sighash, ext_flag=1, script=script,
            leaf_version=leaf_version,
        )  # fmt: skip
        signature = _schnorr(child, digest) + (bytes([sighash]) if sighash != _SIGHASH_DEFAULT else b"")
        leaf_hash = hashes.tagged_hash("TapLeaf", bytes([leaf_version]) + script.serialize())
        inp.taproot_sigs[(ec.PublicKey.from_xonly(xonly), leaf_hash)] = signature
        signed += 1
    if not signed:
        raise InvalidRequest(f"input {index}: no tapLeafScript of this taproot input holds this key")
    return signed


def _ecdsa(key: HDKey, digest: bytes) -> bytes:
    """Returns the DER ECDSA signature (low s) of ``digest`` by ``key``, through libsecp256k1."""
    from coincurve import PrivateKey

    return bytes(PrivateKey(key.key.secret).sign(digest, hasher=None))


def _schnorr(key: HDKey, digest: bytes) -> bytes:
    """Returns the BIP340 signature of ``digest`` by ``key``, with fresh auxiliary randomness."""
    from coincurve import PrivateKey

    return bytes(PrivateKey(key.key.secret).sign_schnorr(digest, os.urandom(32)))


def _wipe(key: HDKey) -> None:
    """Drops the secret embit keeps in an HDKey (an immutable bytes object: replaced, as far as Python allows)."""
    key.key._secret = bytes(32)
