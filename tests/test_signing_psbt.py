"""``sign`` for UTXO coins: kmsq adds its key's signatures to the PSBT of a BitGo 2-of-3 wallet. The PSBTs are
built by BitGo's own ``@bitgo/utxo-lib`` (tests/interop/utxo.js) exactly as the wallet platform builds them, and
what kmsq signed is checked and finalized by the same library: every script type a plain signature suffices for
(p2sh with a witnessUtxo or a nonWitnessUtxo, p2shP2wsh, p2wsh, p2tr script path), on bitcoin testnet and
litecoin, as user and as backup, and half-signed PSBTs that BitGo's own signer completes. What kmsq cannot
sign (a MuSig2 key path, a PSBT of another wallet, a malformed or tampered PSBT) is refused with a clear
``invalid`` and changes nothing."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from embit.psbt import PSBT
from sqlalchemy import func, select

from tasks.codec import KmsCodec, KmsError
from tests.test_no_plaintext_at_rest import dump_database, encodings
from tests.unit_fixtures import Unit, answer, refusal
from tests.utxo_lib import UtxoLib, UtxoLibError
from worker.storage.models import AuditRecord, PrivateKey

EVERY_TESTNET_TYPE = [
    {"scriptType": "p2sh", "signer": "user", "cosigner": "backup", "index": 0, "value": 110_000},
    {"scriptType": "p2sh", "signer": "user", "cosigner": "backup", "index": 1, "value": 120_000,
     "nonWitnessUtxo": True},
    {"scriptType": "p2shP2wsh", "signer": "user", "cosigner": "backup", "index": 2, "value": 130_000},
    {"scriptType": "p2wsh", "signer": "user", "cosigner": "backup", "index": 3, "value": 140_000},
    {"scriptType": "p2tr", "signer": "user", "cosigner": "backup", "index": 4, "value": 150_000},
]  # fmt: skip
LITECOIN_TYPES = [  # utxo-lib has no taproot on litecoin
    {"scriptType": "p2sh", "signer": "user", "cosigner": "backup", "index": 7, "value": 210_000},
    {"scriptType": "p2shP2wsh", "signer": "user", "cosigner": "backup", "index": 8, "value": 220_000},
    {"scriptType": "p2wsh", "signer": "user", "cosigner": "backup", "index": 9, "value": 230_000},
]


class Wallet:
    """A BitGo 2-of-3 wallet whose user and backup keys kmsq generated; the BitGo key is utxo-lib's."""

    def __init__(self, unit: Unit, codec: KmsCodec, utxo_lib: UtxoLib, coin: str = "tbtc") -> None:
        self.unit, self.codec, self.coin = unit, codec, coin
        self.user = self._generate("user")
        self.backup = self._generate("backup")
        xprvs, xpubs = utxo_lib.keys()
        self.bitgo_xprv = xprvs[2]
        self.xpubs = [self.user, self.backup, xpubs[2]]

    def _generate(self, source: str) -> str:
        params = {"op": "generate_signing_key", "coin": self.coin, "source": source, "type": "independent"}
        return str(answer(self.codec, self.unit.deliver(self.codec, params))["pub"])

    def sign(self, psbt: str, source: str) -> Any:
        """kmsq's answer to ``sign`` with the wallet's ``source`` key."""
        pub = self.user if source == "user" else self.backup
        params = {"op": "sign", "pub": pub, "source": source, "payload": psbt, "algorithm": "ecdsa"}
        return self.unit.deliver(self.codec, params)

    def signed(self, psbt: str, source: str) -> str:
        return str(answer(self.codec, self.sign(psbt, source))["signature"])


@pytest.fixture
def wallet(unit: Unit, full: KmsCodec, utxo_lib: UtxoLib) -> Wallet:
    return Wallet(unit, full, utxo_lib)


@pytest.mark.parametrize(("coin", "network", "inputs"), [("tbtc", "testnet", EVERY_TESTNET_TYPE),
                                                         ("ltc", "litecoin", LITECOIN_TYPES)])  # fmt: skip
def test_user_then_backup_sign_every_script_type_and_utxo_lib_finalizes(
    unit: Unit, full: KmsCodec, utxo_lib: UtxoLib, coin: str, network: str, inputs: list[dict[str, Any]]
) -> None:
    wallet = Wallet(unit, full, utxo_lib, coin)
    unsigned = utxo_lib.build(network, wallet.xpubs, inputs)
    half = wallet.signed(unsigned, "user")
    assert utxo_lib.signed_by(network, wallet.xpubs, half) == [{"user"}] * len(inputs)
    with pytest.raises(UtxoLibError):
        utxo_lib.finalize(network, half)  # one signature of two
    full_psbt = wallet.signed(half, "backup")
    assert utxo_lib.signed_by(network, wallet.xpubs, full_psbt) == [{"user", "backup"}] * len(inputs)
    final = utxo_lib.finalize(network, full_psbt)
    assert len(final["txid"]) == 64 and final["tx"]
    # Signing again (a redelivered or repeated request) changes no input's signatures' validity.
    again = wallet.signed(full_psbt, "backup")
    assert utxo_lib.signed_by(network, wallet.xpubs, again) == [{"user", "backup"}] * len(inputs)


def test_a_psbt_kmsq_half_signed_is_completed_by_bitgos_own_signer(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    inputs = [{**item, "cosigner": "bitgo"} for item in EVERY_TESTNET_TYPE]  # the everyday spend: user + BitGo
    unsigned = utxo_lib.build("testnet", wallet.xpubs, inputs)
    half = wallet.signed(unsigned, "user")
    done = utxo_lib.sign("testnet", half, wallet.bitgo_xprv)
    assert utxo_lib.signed_by("testnet", wallet.xpubs, done) == [{"user", "bitgo"}] * len(inputs)
    assert utxo_lib.finalize("testnet", done)["txid"]


def test_backup_signs_what_bitgos_signer_half_signed(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    inputs = [{**item, "signer": "backup", "cosigner": "bitgo"} for item in EVERY_TESTNET_TYPE]
    half = utxo_lib.sign("testnet", utxo_lib.build("testnet", wallet.xpubs, inputs), wallet.bitgo_xprv)
    done = wallet.signed(half, "backup")
    assert utxo_lib.signed_by("testnet", wallet.xpubs, done) == [{"backup", "bitgo"}] * len(inputs)
    assert utxo_lib.finalize("testnet", done)["txid"]


def test_a_large_p2sh_consolidation_is_signed_and_utxo_lib_finalizes(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    """60 p2sh inputs (every tenth with a nonWitnessUtxo) to 20 outputs of every type: the legacy digests kmsq
    computes with the transaction serialized once (worker.psbt.LegacySighash) are the ones BitGo's library checks."""
    inputs = [{"scriptType": "p2sh", "signer": "user", "cosigner": "backup", "index": i, "value": 10_000 + i,
               **({"nonWitnessUtxo": True} if i % 10 == 9 else {})} for i in range(60)]  # fmt: skip
    outputs = [{"scriptType": kind, "index": j, "value": 5_000}
               for j, kind in enumerate(["p2sh", "p2shP2wsh", "p2wsh", "p2tr"] * 5)]  # fmt: skip
    unsigned = utxo_lib.run("build", {"network": "testnet", "xpubs": wallet.xpubs, "inputs": inputs,
                                      "outputs": outputs})["psbt"]  # fmt: skip
    done = wallet.signed(wallet.signed(unsigned, "user"), "backup")
    assert utxo_lib.signed_by("testnet", wallet.xpubs, done) == [{"user", "backup"}] * len(inputs)
    assert utxo_lib.finalize("testnet", done)["txid"]


def test_only_the_inputs_of_this_key_are_signed(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    inputs = [
        {"scriptType": "p2wsh", "signer": "user", "cosigner": "bitgo", "index": 0, "value": 50_000},
        {"scriptType": "p2tr", "signer": "backup", "cosigner": "bitgo", "index": 1, "value": 60_000},  # no user leaf
        {"scriptType": "p2trMusig2", "signer": "backup", "cosigner": "bitgo", "index": 2, "value": 70_000},
    ]
    signed = wallet.signed(utxo_lib.build("testnet", wallet.xpubs, inputs), "user")
    assert utxo_lib.signed_by("testnet", wallet.xpubs, signed) == [{"user"}, set(), set()]


def test_a_musig2_key_path_input_of_this_key_is_refused(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    inputs = [
        {"scriptType": "p2wsh", "signer": "user", "cosigner": "bitgo", "index": 0, "value": 50_000},
        {"scriptType": "p2trMusig2", "signer": "user", "cosigner": "bitgo", "index": 1, "value": 60_000},
    ]
    code, message = refusal(wallet.codec, wallet.sign(utxo_lib.build("testnet", wallet.xpubs, inputs), "user"))
    assert code == "invalid" and message.startswith("input 1 is a MuSig2 key-path spend (p2trMusig2)")


def test_what_kmsq_cannot_sign_is_refused_clearly(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    item = {"scriptType": "p2wsh", "signer": "user", "cosigner": "bitgo", "index": 5, "value": 50_000}
    _, other_xpubs = utxo_lib.keys()
    of_another_wallet = utxo_lib.build("testnet", other_xpubs, [item])
    mine = utxo_lib.build("testnet", wallet.xpubs, [item])
    with_previous_tx = utxo_lib.build("testnet", wallet.xpubs, [{**item, "scriptType": "p2sh", "nonWitnessUtxo": True}])
    cases = {
        of_another_wallet: "no input of this PSBT is for this key",
        "0102": "not a PSBT",
        mine[: len(mine) // 4 * 2]: "not a well-formed PSBT",
        "0x" + "00" * 32: "not a PSBT",
        _with_our_path_changed(mine, wallet.user): "does not lead to the public key it names",
        _with_sighash(mine, 0x83): "sighash type 0x83",
        _spending_another_txid(with_previous_tx, 0): "its nonWitnessUtxo is not the transaction it spends",
    }
    for payload, expected in cases.items():
        code, message = refusal(wallet.codec, wallet.sign(payload, "user"))
        assert code == "invalid" and expected in message, (expected, message)
    with pytest.raises(KmsError, match="signablePayload must be hex"):  # refused before it is sent
        wallet.sign("zz" + mine[2:], "user")


def test_refusals_change_nothing_and_the_audit_names_only_the_digest(
    unit: Unit, wallet: Wallet, utxo_lib: UtxoLib
) -> None:
    item = {"scriptType": "p2trMusig2", "signer": "user", "cosigner": "bitgo", "index": 0, "value": 50_000}
    refused = utxo_lib.build("testnet", wallet.xpubs, [item])
    signed_payload = utxo_lib.build("testnet", wallet.xpubs, [{**item, "scriptType": "p2wsh"}])
    with unit.service.sessions() as db:
        keys_before = db.scalar(select(func.count()).select_from(PrivateKey))
    refusal(wallet.codec, wallet.sign(refused, "user"))
    wallet.signed(signed_payload, "user")
    with unit.service.sessions() as db:
        assert db.scalar(select(func.count()).select_from(PrivateKey)) == keys_before
        signs = list(db.scalars(select(AuditRecord).where(AuditRecord.action == "sign").order_by(AuditRecord.seq)))
    assert [r.outcome for r in signs] == ["invalid", "ok"]
    for record, payload in zip(signs, (refused, signed_payload), strict=True):
        assert hashlib.sha256(payload.encode()).hexdigest() in record.detail
        assert payload[:64] not in record.detail


def test_no_generated_xprv_of_a_utxo_wallet_is_in_the_database(unit: Unit, full: KmsCodec, utxo_lib: UtxoLib) -> None:
    from embit import bip32

    seeds = iter([bytes([n]) * 64 for n in (7, 9)])
    unit.service.hsm.random = lambda count: bytearray(next(seeds)[:count])  # type: ignore[method-assign]
    wallet = Wallet(unit, full, utxo_lib)
    roots = [bip32.HDKey.from_seed(bytes([n]) * 64) for n in (7, 9)]
    assert wallet.xpubs[:2] == [root.to_public().to_string() for root in roots]
    item = {"scriptType": "p2wsh", "signer": "user", "cosigner": "backup", "index": 0, "value": 50_000}
    wallet.signed(wallet.signed(utxo_lib.build("testnet", wallet.xpubs, [item]), "user"), "backup")
    dump = dump_database(unit.service)
    for root in roots:
        child = root.derive([0, 0, 20, 0])
        for secret in (root.to_string().encode(), root.key.secret, child.key.secret, child.to_string().encode()):
            assert not any(form in dump for form in encodings(secret))


def _with_our_path_changed(psbt_hex: str, xpub: str) -> str:
    """The PSBT with this key's derivation entry pointing at another index (the pubkey it names unchanged)."""
    from embit import bip32

    fingerprint = bip32.HDKey.from_string(xpub).my_fingerprint
    psbt = PSBT.parse(bytes.fromhex(psbt_hex))
    for derivation in psbt.inputs[0].bip32_derivations.values():
        if derivation.fingerprint == fingerprint:
            derivation.derivation[-1] += 1
    return str(psbt.serialize().hex())


def _spending_another_txid(psbt_hex: str, index: int) -> str:
    psbt = PSBT.parse(bytes.fromhex(psbt_hex))
    psbt.inputs[index].txid = bytes(32)
    return str(psbt.serialize().hex())


def test_a_mutated_psbt_is_signed_or_refused_never_an_internal_error(utxo_lib: UtxoLib) -> None:
    """Bytes flipped, cut out or inserted anywhere in a wallet PSBT of every script type (a fixed seed): each
    one is signed or refused with InvalidRequest. Found: a nonWitnessUtxo too short for the input's vout was
    an IndexError."""
    from embit import bip32

    from worker import psbt as psbt_signing
    from worker.errors import InvalidRequest

    root = bip32.HDKey.from_seed(bytes(range(64)))
    _, others = utxo_lib.keys()
    base = bytes.fromhex(utxo_lib.build("testnet", [root.to_public().to_string(), *others[1:]], EVERY_TESTNET_TYPE))
    rng = random.Random(16)
    outcomes = {"signed": 0, "refused": 0}
    for _ in range(1500):
        data = bytearray(base)
        for _ in range(rng.choice((1, 1, 2, 4))):
            at, roll = rng.randrange(len(data)), rng.random()
            if roll < 0.5:
                data[at] = rng.randrange(256)
            elif roll < 0.75:
                del data[at : at + rng.randrange(1, 8)]
            else:
                data[at:at] = rng.randbytes(rng.randrange(1, 8))
        try:
            psbt_signing.sign(root.to_string(), data.hex())
            outcomes["signed"] += 1
        except InvalidRequest:
            outcomes["refused"] += 1
    assert outcomes["signed"] > 50 and outcomes["refused"] > 1000, outcomes


def _with_sighash(psbt_hex: str, sighash: int) -> str:
    psbt = PSBT.parse(bytes.fromhex(psbt_hex))
    psbt.inputs[0].sighash_type = sighash
    return str(psbt.serialize().hex())
