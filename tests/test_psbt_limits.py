"""What one PSBT may cost a worker (issue 22, item 2): a 6,000-input p2sh PSBT held one for 135 s, because the
legacy sighash serializes the whole transaction for every input. kmsq now refuses, before the key is opened, a
PSBT over ``MAX_PSBT_INPUTS`` inputs, ``MAX_PSBT_OUTPUTS`` outputs, ``MAX_PSBT_TAP_LEAVES_PER_INPUT`` leaves on an
input or ``MAX_PSBT_LEGACY_SIGHASH_BYTES`` of legacy sighash work, and an input naming its key more than once; the
legacy digest serializes the transaction once (:class:`worker.psbt.LegacySighash`), byte for byte embit's
``sighash_legacy``. The PSBTs are built here with embit, the size a wallet PSBT at the caps has; BitGo's own
utxo-lib checks what kmsq signs in tests/test_signing_psbt.py."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from coincurve import PublicKey
from embit import bip32
from embit.psbt import PSBT, DerivationPath
from embit.script import Script, p2sh
from embit.transaction import Transaction, TransactionInput, TransactionOutput
from sqlalchemy import select

from schemas.limits import (
    MAX_PSBT_INPUTS,
    MAX_PSBT_LEGACY_SIGHASH_BYTES,
    MAX_PSBT_OUTPUTS,
    MAX_PSBT_TAP_LEAVES_PER_INPUT,
)
from tasks.codec import KmsCodec
from tests.unit_fixtures import Unit, answer, refusal
from worker import psbt as psbt_signing
from worker.errors import InvalidRequest
from worker.psbt import LegacySighash, legacy_sighash_bytes
from worker.storage.models import AuditRecord

_COSIGNERS = [bip32.HDKey.from_seed(bytes([n]) * 64).key.get_public_key().sec() for n in (1, 2)]
_P2WSH_OUTPUT = 8 + 1 + 34  # the largest output BitGo's wallets make (p2wsh, p2tr: 43 bytes)


def _push(data: bytes) -> bytes:
    return bytes([len(data)]) + data


def _wallet_psbt(xpub: str, inputs: int, outputs: int = 1, output_script: bytes | None = None) -> PSBT:
    """A PSBT spending ``inputs`` p2sh 2-of-3 outputs of the wallet whose user key is ``xpub`` (chain 0, index i:
    ``m/0/0/0/i``, as BitGo derives them) to ``outputs`` p2wsh outputs, or to outputs of ``output_script``."""
    root = bip32.HDKey.from_string(xpub)
    chain = root.derive([0, 0, 0])
    script = Script(output_script if output_script is not None else b"\x00\x20" + bytes(32))
    vin = [TransactionInput(hashlib.sha256(b"utxo %d" % i).digest(), i % 3) for i in range(inputs)]
    psbt = PSBT(Transaction(vin=vin, vout=[TransactionOutput(1000 + j, script) for j in range(outputs)]))
    for i, inp in enumerate(psbt.inputs):
        user = chain.child(i).key
        redeem = Script(b"\x52" + b"".join(_push(key) for key in (user.sec(), *_COSIGNERS)) + b"\x53\xae")
        inp.witness_utxo = TransactionOutput(100_000, p2sh(redeem))
        inp.redeem_script = redeem
        inp.bip32_derivations[user] = DerivationPath(root.my_fingerprint, [0, 0, 0, i])
    return psbt


def _hex(psbt: PSBT) -> str:
    return str(psbt.serialize().hex())


def _random_transaction(rng: random.Random, inputs: int, outputs: int) -> Transaction:
    lengths = (0, 1, 22, 34, 75, 252, 253, 300)  # 253 and more: a 3-byte compact size
    vin = [
        TransactionInput(rng.randbytes(32), rng.randrange(2**32), Script(rng.randbytes(rng.choice(lengths))),
                         rng.choice((0, 0xFFFFFFFD, 0xFFFFFFFF, rng.randrange(2**32))))
        for _ in range(inputs)
    ]  # fmt: skip
    vout = [TransactionOutput(rng.randrange(2**63), Script(rng.randbytes(rng.choice(lengths)))) for _ in range(outputs)]
    return Transaction(rng.randrange(2**32), vin, vout, rng.randrange(2**32))


def test_the_legacy_digest_is_embits_on_random_transactions() -> None:
    """A seeded loop: every input of 120 random transactions (input scripts that are not empty, sequences, counts
    of 253 and more whose compact size takes 3 bytes, no output at all), signing random scripts."""
    rng = random.Random(22)
    compared = 0
    for n in range(120):
        inputs = rng.randrange(253, 260) if n % 40 == 0 else rng.randrange(1, 30)
        outputs = rng.randrange(253, 256) if n % 40 == 20 else rng.randrange(0, 12)
        tx = _random_transaction(rng, inputs, outputs)
        legacy = LegacySighash(tx)
        for index in range(len(tx.vin)) if inputs < 253 else rng.sample(range(inputs), 8):
            script = Script(rng.randbytes(rng.choice((0, 71, 105, 253, 520))))
            assert legacy.digest(index, script) == tx.sighash_legacy(index, script), (n, index)
            compared += 1
    assert compared > 1500
    with pytest.raises(IndexError):
        LegacySighash(tx).digest(len(tx.vin), Script(b""))


def test_the_legacy_digest_of_a_wallet_psbt_is_embits_and_its_work_is_counted_exactly() -> None:
    """What ``legacy_sighash_bytes`` counts is what the legacy digests hash: per p2sh input, the transaction with
    the others' scripts empty and its own redeem script, and the sighash type (p2shP2wsh and p2wsh inputs take
    the BIP143 digest and count nothing)."""
    root = bip32.HDKey.from_seed(bytes(range(64)))
    psbt = _wallet_psbt(root.to_public().to_string(), 12, outputs=3)
    witness = Script(b"\x52" + b"".join(_push(key) for key in _COSIGNERS) + b"\x52\xae")
    nested = Script(b"\x00\x20" + hashlib.sha256(witness.data).digest())
    psbt.inputs[3].redeem_script, psbt.inputs[3].witness_script = nested, witness  # p2shP2wsh
    psbt.inputs[3].witness_utxo = TransactionOutput(100_000, p2sh(nested))
    psbt.inputs[7].witness_utxo = TransactionOutput(100_000, Script(nested.data))  # p2wsh
    psbt.inputs[7].redeem_script, psbt.inputs[7].witness_script = None, witness
    tx = psbt.tx
    legacy = LegacySighash(tx)
    hashed = 0
    for index, inp in enumerate(psbt.inputs):
        if index in (3, 7):
            continue
        assert legacy.digest(index, inp.redeem_script) == tx.sighash_legacy(index, inp.redeem_script)
        preimage = Transaction(tx.version, [TransactionInput(v.txid, v.vout, Script(b""), v.sequence)
                                            for v in tx.vin], tx.vout, tx.locktime)  # fmt: skip
        preimage.vin[index].script_sig = inp.redeem_script
        hashed += len(preimage.serialize()) + 4
    assert legacy_sighash_bytes(psbt) == hashed


@pytest.fixture
def wallet_key(unit: Unit, full: KmsCodec) -> str:
    """The xpub of a tbtc user key kmsq generated."""
    params = {"op": "generate_signing_key", "coin": "tbtc", "source": "user", "type": "independent"}
    return str(answer(full, unit.deliver(full, params))["pub"])


def _sign(unit: Unit, codec: KmsCodec, pub: str, payload: str) -> Any:
    params = {"op": "sign", "pub": pub, "source": "user", "payload": payload, "algorithm": "ecdsa"}
    return unit.deliver(codec, params)


def _opened(unit: Unit, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the sealed values the token opens (a key's xprv is one) from now on."""
    hsm, calls = unit.service.hsm, []
    real = hsm.open

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(hsm, "open", counting)
    return calls


def _over_the_budget(xpub: str) -> PSBT:
    """MAX_PSBT_INPUTS p2sh inputs and one output that makes the transaction about 80 KB: 40 MB to hash."""
    return _wallet_psbt(xpub, MAX_PSBT_INPUTS, output_script=b"\x6a" + bytes(60_000))


def _with_leaves(xpub: str, leaves: int) -> PSBT:
    """A PSBT whose input 0 carries ``leaves`` tapLeafScripts, each holding the user key of a p2tr output."""
    root = bip32.HDKey.from_string(xpub)
    key = root.derive([0, 0, 30, 0]).key
    spk = Script(b"\x51\x20" + bytes(32))
    psbt = PSBT(Transaction(vin=[TransactionInput(bytes(32), 0)], vout=[TransactionOutput(1000, spk)]))
    inp = psbt.inputs[0]
    inp.witness_utxo = TransactionOutput(2000, spk)
    inp.taproot_bip32_derivations[key] = ([], DerivationPath(root.my_fingerprint, [0, 0, 30, 0]))
    for leaf in range(leaves):
        inp.taproot_scripts[b"\xc0" + bytes([leaf]) * 32] = _push(key.xonly()) + b"\xac" + b"\xc0"
    return psbt


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda xpub: _wallet_psbt(xpub, MAX_PSBT_INPUTS + 1),
         f"the PSBT has {MAX_PSBT_INPUTS + 1} inputs; a PSBT may have at most {MAX_PSBT_INPUTS}"),
        (lambda xpub: _wallet_psbt(xpub, 1, outputs=MAX_PSBT_OUTPUTS + 1),
         f"the PSBT has {MAX_PSBT_OUTPUTS + 1} outputs; a PSBT may have at most {MAX_PSBT_OUTPUTS}"),
        (_over_the_budget, "the legacy (p2sh) sighashes of this PSBT would hash "),
        (lambda xpub: _with_leaves(xpub, MAX_PSBT_TAP_LEAVES_PER_INPUT + 1),
         f"input 0 carries {MAX_PSBT_TAP_LEAVES_PER_INPUT + 1} tapLeafScripts; an input may carry at most "
         f"{MAX_PSBT_TAP_LEAVES_PER_INPUT}"),
    ],
    ids=["inputs", "outputs", "legacy-sighash-budget", "tap-leaves"],
)  # fmt: skip
def test_a_psbt_over_a_limit_is_refused_before_the_key_is_opened(
    unit: Unit, full: KmsCodec, wallet_key: str, monkeypatch: pytest.MonkeyPatch, build: Any, expected: str
) -> None:
    """Every input is the key's: without the limit, each of these is signed."""
    payload = _hex(build(wallet_key))
    opened = _opened(unit, monkeypatch)
    code, message = refusal(full, _sign(unit, full, wallet_key, payload))
    assert code == "invalid" and message.startswith(expected), message
    assert opened == []  # the key's xprv was not opened
    with unit.service.sessions() as db:
        record = db.scalars(select(AuditRecord).where(AuditRecord.action == "sign").order_by(AuditRecord.seq)).all()
    assert record[-1].outcome == "invalid" and expected in record[-1].detail


def test_the_budget_counts_the_bytes_and_names_the_limit() -> None:
    psbt = _over_the_budget(bip32.HDKey.from_seed(bytes(range(64))).to_public().to_string())
    work = legacy_sighash_bytes(psbt)
    assert work > MAX_PSBT_LEGACY_SIGHASH_BYTES
    with pytest.raises(InvalidRequest) as refused:
        psbt_signing.parse(_hex(psbt))
    assert str(refused.value) == (
        f"the legacy (p2sh) sighashes of this PSBT would hash {work} bytes; a PSBT may need at most "
        f"{MAX_PSBT_LEGACY_SIGHASH_BYTES}: send fewer inputs or outputs per PSBT"
    )


def test_a_wallet_psbt_at_both_caps_is_signed_and_its_signatures_verify(
    unit: Unit, full: KmsCodec, wallet_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAX_PSBT_INPUTS p2sh inputs and MAX_PSBT_OUTPUTS outputs of the largest size BitGo makes fit the budget; the
    signatures verify (libsecp256k1) against embit's own legacy digest."""
    psbt = _wallet_psbt(wallet_key, MAX_PSBT_INPUTS, outputs=MAX_PSBT_OUTPUTS)
    assert all(len(out.vout.serialize()) == _P2WSH_OUTPUT for out in psbt.outputs)
    assert legacy_sighash_bytes(psbt) <= MAX_PSBT_LEGACY_SIGHASH_BYTES
    opened = _opened(unit, monkeypatch)
    signed = PSBT.parse(bytes.fromhex(answer(full, _sign(unit, full, wallet_key, _hex(psbt)))["signature"]))
    assert opened  # the key was opened to sign
    tx = signed.tx
    for index in [*range(0, MAX_PSBT_INPUTS, 61), MAX_PSBT_INPUTS - 1]:
        inp = signed.inputs[index]
        ((pub, signature),) = inp.partial_sigs.items()
        assert signature[-1] == 0x01  # SIGHASH_ALL
        digest = tx.sighash_legacy(index, inp.redeem_script)
        assert PublicKey(pub.sec()).verify(signature[:-1], digest, hasher=None), index


def test_an_input_naming_this_key_twice_is_refused(wallet_key: str) -> None:
    """Two derivation entries of this key on one input, both valid and in its script: each would be a signature
    and hash the script again (4,000 of them in one input took 3 s)."""
    root = bip32.HDKey.from_seed(bytes(range(64)))
    psbt = _wallet_psbt(root.to_public().to_string(), 2)
    other = root.derive([0, 0, 0, 1]).key.get_public_key()
    inp = psbt.inputs[0]
    redeem = Script(inp.redeem_script.data[:-2] + _push(other.sec()) + b"\x54\xae")  # 2-of-4, the second key in
    inp.redeem_script, inp.witness_utxo = redeem, TransactionOutput(100_000, p2sh(redeem))
    inp.bip32_derivations[other] = DerivationPath(root.my_fingerprint, [0, 0, 0, 1])
    with pytest.raises(InvalidRequest, match="input 0 names this key's fingerprint in 2 derivations"):
        psbt_signing.sign(root.to_string(), _hex(psbt))
    assert psbt_signing.sign(root.to_string(), _hex(_wallet_psbt(root.to_public().to_string(), 2))).signatures == 2


_PARSE_UNDER_2_GIB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
from worker import psbt
from worker.errors import InvalidRequest
try:
    psbt.parse(sys.stdin.read())
except InvalidRequest as e:
    print("refused:", e)
"""


def _declaring(where: str) -> bytes:
    """A small PSBT that declares 2**32 of something: leaf hashes in an output's taproot derivation, or PSBTv2
    inputs in its global map. embit builds that many objects before it sees the data is not there."""
    from embit import compact, ec, script

    key = ec.PrivateKey(bytes(range(1, 33))).get_public_key()
    tx = Transaction(vin=[TransactionInput(bytes(32), 0)], vout=[TransactionOutput(1000, script.p2wpkh(key))])
    raw = bytes(PSBT(tx).serialize())
    huge = b"\xfe\xff\xff\xff\xff"
    if where == "leaf hashes":  # the output map's last byte is its end: add key 0x07 before it
        value = huge + bytes(8)
        return bytes(raw[:-1] + compact.to_bytes(33) + b"\x07" + key.xonly() + compact.to_bytes(len(value)) + value
                     + b"\x00")  # fmt: skip
    # PSBTv2: no unsigned transaction; the global map says how many inputs (0x04) and outputs (0x05) follow.
    return bytes(
        b"psbt\xff" + b"\x01\xfb\x04\x02\x00\x00\x00" + b"\x01\x04" + compact.to_bytes(len(huge)) + huge + b"\x00"
    )


@pytest.mark.parametrize("where", ["leaf hashes", "PSBTv2 inputs"])
def test_a_psbt_declaring_billions_of_items_is_refused_without_the_memory(where: str) -> None:
    """Found by the fresh-clone CI: a mutated PSBT made tests/test_signing_psbt.py's fuzzing allocate 23 GiB, and
    the run was killed. The same payload would have killed a worker on every redelivery. Parsed here in a process
    allowed 2 GiB."""
    import subprocess
    import sys
    from pathlib import Path

    payload = _declaring(where).hex()
    done = subprocess.run([sys.executable, "-c", _PARSE_UNDER_2_GIB], input=payload, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("refused:"), done.stdout
    assert "more" in done.stdout, done.stdout


def test_an_empty_tap_leaf_script_is_refused(unit: Unit, full: KmsCodec, wallet_key: str) -> None:
    """Found by fuzzing: an empty tapLeafScript was an IndexError (an internal error)."""
    psbt = _with_leaves(wallet_key, 1)
    (control,) = psbt.inputs[0].taproot_scripts
    psbt.inputs[0].taproot_scripts[control] = b""
    code, message = refusal(full, _sign(unit, full, wallet_key, _hex(psbt)))
    assert (code, message) == ("invalid", "input 0 carries an empty tapLeafScript")
