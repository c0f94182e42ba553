"""Signing rules (issue 26, docs/PROTOCOL.md "Signing rules") on PSBTs that BitGo's own ``@bitgo/utxo-lib`` builds:
what leaves the wallet (change is proved, never taken on a PSBT's word), the destination lists, the per-transaction,
fee and window caps, input and output limits, and what a refusal does (``policy_denied`` naming the rule, audited
with the payload's digest, nothing signed, nothing logged). The unit tier: the real pipeline on SQLite, and on
Postgres where two transactions meet."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from embit import bip32, script
from embit.networks import NETWORKS
from sqlalchemy import Engine, event, select, text

from schemas.signing_rules import RulesError, looser, parse_rules
from tasks.codec import KmsCodec
from tests.fake_hsm import FakeHsm
from tests.test_signing_psbt import Wallet
from tests.unit_fixtures import Unit, answer, refusal, units
from tests.utxo_lib import UtxoLib
from worker import psbt as wallet_psbt
from worker import signing_rules
from worker.signing_rule_rows import wallet_scope
from worker.storage.models import AuditRecord, SigningLogEntry

BTC = 100_000_000


def _address(seed: int) -> str:
    """A testnet p2wpkh address outside every wallet."""
    key = bip32.HDKey.from_seed(bytes([seed]) * 32)
    return str(script.p2wpkh(key.key.get_public_key()).address(NETWORKS["test"]))


def _input(index: int, value: int, kind: str = "p2wsh") -> dict[str, Any]:
    return {"scriptType": kind, "signer": "user", "cosigner": "bitgo", "index": index, "value": value}


@pytest.fixture
def wallet(unit: Unit, full: KmsCodec, utxo_lib: UtxoLib) -> Wallet:
    return Wallet(unit, full, utxo_lib)


def _pay(utxo_lib: UtxoLib, wallet: Wallet, to: str, amount: int, change: int, fee: int = 1_000,
         *, global_xpubs: bool = True) -> str:  # fmt: skip
    """A PSBT spending one wallet input of amount + change + fee: ``amount`` to ``to``, ``change`` back to the
    wallet's internal chain."""
    outputs = [{"address": to, "value": amount}] + (
        [{"scriptType": "p2wsh", "index": 5, "value": change}] if change else []
    )
    return utxo_lib.build("testnet", wallet.xpubs, [_input(0, amount + change + fee)], outputs,
                          global_xpubs=global_xpubs)  # fmt: skip


# -- what a PSBT does -------------------------------------------------------------------------------------


def test_change_is_recognized_only_when_the_wallet_is_proved(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    payee = _address(1)
    named = signing_rules.analyse(wallet_psbt.parse(_pay(utxo_lib, wallet, payee, 80_000, 60_000)), "tbtc", wallet.user)
    assert (named.outputs[0].address, named.outputs[0].value, named.outputs[0].change) == (payee, 80_000, False)
    assert named.outputs[1].change and named.payment == 80_000 and named.fee == 1_000
    assert named.wallet_id == signing_rules.wallet_id(wallet.xpubs)
    # Without the wallet's keys in the PSBT nothing proves the change output is the wallet's: all of it is payment.
    unnamed = signing_rules.analyse(
        wallet_psbt.parse(_pay(utxo_lib, wallet, payee, 80_000, 60_000, global_xpubs=False)), "tbtc", wallet.user
    )
    assert unnamed.payment == 140_000 and unnamed.wallet_id is None


def test_a_change_output_to_keys_of_someone_elses_naming_is_a_payment(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    """The PSBT names this key and two keys of the attacker's as "the wallet", and sends the rest to their 2-of-3 as
    change: the inputs are not that wallet's, so nothing is proved change."""
    _xprvs, theirs = utxo_lib.keys()
    forged = [wallet.user, theirs[1], theirs[2]]
    real_inputs = wallet_psbt.parse(_pay(utxo_lib, wallet, _address(2), 10_000, 0))
    to_attacker = wallet_psbt.parse(
        utxo_lib.build(
            "testnet",
            forged,
            [_input(0, 200_000)],
            [{"scriptType": "p2wsh", "index": 1, "value": 199_000}],
            global_xpubs=True,
        )
    )
    to_attacker.inputs[0] = real_inputs.inputs[0]  # the real wallet's input, the attacker's output and "wallet"
    spend = signing_rules.analyse(to_attacker, "tbtc", wallet.user)
    assert spend.wallet_id is None and spend.payment == 199_000


def _taproot_pay(utxo_lib: UtxoLib, xpubs: list[str], payee: str, change_index: int = 7) -> str:
    """A PSBT spending a p2tr (user+bitgo leaf) and a p2trMusig2 (user+backup leaf) input: 80,000 to ``payee``, and
    change to both taproot internal chains (31 and 41), as BitGo's platform builds it."""
    inputs = [
        {"scriptType": "p2tr", "signer": "user", "cosigner": "bitgo", "index": 3, "value": 100_000},
        {"scriptType": "p2trMusig2", "signer": "user", "cosigner": "backup", "index": 4, "value": 50_000},
    ]
    outputs = [
        {"address": payee, "value": 80_000},
        {"scriptType": "p2tr", "index": change_index, "value": 40_000},
        {"scriptType": "p2trMusig2", "index": change_index + 1, "value": 29_000},
    ]
    return utxo_lib.build("testnet", xpubs, inputs, outputs, global_xpubs=True)


def test_taproot_change_is_recognized_when_its_output_key_is_the_wallets(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    """BitGo's p2tr and p2trMusig2 change (chains 31 and 41): the output key rebuilt from the wallet's three keys at
    the output's path (legacy MuSig and BIP327 internal keys, BitGo's script trees) is the output's, so only the
    payee's 80,000 leave the wallet; a window counts only that."""
    payee = _address(3)
    spend = signing_rules.analyse(wallet_psbt.parse(_taproot_pay(utxo_lib, wallet.xpubs, payee)), "tbtc", wallet.user)
    assert [(o.address == payee, o.value, o.change) for o in spend.outputs] == [
        (True, 80_000, False),
        (False, 40_000, True),
        (False, 29_000, True),
    ]
    assert spend.payment == 80_000 and spend.fee == 1_000 and spend.wallet_id == signing_rules.wallet_id(wallet.xpubs)


def test_the_taproot_output_keys_kmsq_rebuilds_are_utxo_libs(utxo_lib: UtxoLib) -> None:
    """worker.bitgo_taproot against @bitgo/utxo-lib's createOutputScript2of3, for random wallets: the same output
    key for p2tr and p2trMusig2, found whatever the order the keys come in, and never the other type's."""
    from coincurve import PrivateKey

    from worker.bitgo_taproot import wallet_roles

    for _ in range(8):
        keys = tuple(PrivateKey(secrets.token_bytes(32)).public_key.format() for _ in range(3))
        for kind, other in (("p2tr", "p2trMusig2"), ("p2trMusig2", "p2tr")):
            script_pubkey = utxo_lib.script_pubkey(kind, list(keys))
            assert script_pubkey[:2] == b"\x51\x20"  # OP_1 <32-byte output key>
            assert wallet_roles(kind, keys, script_pubkey[2:]) == (0, 1, 2)
            assert wallet_roles(kind, (keys[2], keys[0], keys[1]), script_pubkey[2:]) == (1, 2, 0)
            assert wallet_roles(other, keys, script_pubkey[2:]) is None


def test_taproot_change_to_other_keys_or_on_a_rewritten_path_is_a_payment(wallet: Wallet, utxo_lib: UtxoLib) -> None:
    """A taproot output of the attacker's keys named as this wallet's change, and a real change output whose
    derivation path was rewritten (index 7 said to be 8), are payments: nothing of the PSBT's word is taken."""
    _xprvs, theirs = utxo_lib.keys()
    real = wallet_psbt.parse(_taproot_pay(utxo_lib, wallet.xpubs, _address(4)))
    forged = wallet_psbt.parse(_taproot_pay(utxo_lib, [wallet.user, theirs[1], theirs[2]], _address(4)))
    for i in (1, 2):  # the attacker's taproot outputs, with their derivations, in the real wallet's PSBT
        real.tx.vout[i] = forged.tx.vout[i]
        real.outputs[i] = forged.outputs[i]
    spend = signing_rules.analyse(real, "tbtc", wallet.user)
    assert spend.wallet_id == signing_rules.wallet_id(wallet.xpubs) and spend.payment == 149_000
    rewritten = wallet_psbt.parse(_taproot_pay(utxo_lib, wallet.xpubs, _address(4)))
    for _leaves, derivation in rewritten.outputs[1].taproot_bip32_derivations.values():
        derivation.derivation[3] += 1
    spend = signing_rules.analyse(rewritten, "tbtc", wallet.user)
    assert [o.change for o in spend.outputs] == [False, False, True] and spend.payment == 120_000


def test_the_rules_document_and_what_loosens_it() -> None:
    rules = parse_rules('{"max_payment": 100, "deny_destinations": ["tb1qx"], "window": {"seconds": 86400, '
                        '"max_payment": 1000}}')  # fmt: skip
    assert rules.canonical() == parse_rules(rules.canonical()).canonical()
    for bad in ('{"none": true, "max_payment": 1}', '{"max_payment": -1}', '{"surprise": 1}', '[]', "{",
                '{"window": {"seconds": 1, "max_payment": 5}}', '{"max_payment": "100"}'):  # fmt: skip
        with pytest.raises(RulesError):
            parse_rules(bad)
    tighter = parse_rules('{"max_payment": 50, "deny_destinations": ["tb1qx", "tb1qy"], "window": {"seconds": '
                          '172800, "max_payment": 900}, "max_inputs": 10}')  # fmt: skip
    assert looser(rules, tighter) == []
    assert looser(tighter, rules) == ["deny_destinations shortened", "max_payment raised", "max_inputs raised",
                                      "window raised"]  # fmt: skip
    assert looser(rules, parse_rules('{"none": true}')) == ["rules replaced by none"]
    assert looser(None, rules) and looser(parse_rules('{"none": true}'), rules) == []


# -- through the worker -----------------------------------------------------------------------------------


def _refused(wallet: Wallet, psbt: str, rule: str) -> str:
    code, message = refusal(wallet.codec, wallet.sign(psbt, "user"))
    assert code == "policy_denied", (code, message)
    assert f"signing rule {rule} " in message, message
    return message


def _log(unit: Unit) -> list[SigningLogEntry]:
    with unit.service.sessions() as db:
        return list(db.scalars(select(SigningLogEntry).order_by(SigningLogEntry.id)))


def test_destinations_caps_and_limits_are_checked_before_signing(unit: Unit, wallet: Wallet, utxo_lib: UtxoLib) -> None:
    allowed, denied, stranger = _address(3), _address(4), _address(5)
    rules = {"allow_destinations": [allowed, denied], "deny_destinations": [denied], "max_payment": BTC,
             "max_fee": 5_000, "max_fee_share_bps": 100, "max_inputs": 2}  # fmt: skip
    unit.set_rules("default", rules)
    signed = wallet.signed(_pay(utxo_lib, wallet, allowed, BTC, 50_000), "user")
    assert signed and [e.payment for e in _log(unit)] == [BTC]

    before = len(_log(unit))
    _refused(wallet, _pay(utxo_lib, wallet, denied, 1_000, 0), "deny_destinations")
    _refused(wallet, _pay(utxo_lib, wallet, stranger, 1_000, 0), "allow_destinations")
    _refused(wallet, _pay(utxo_lib, wallet, allowed, BTC + 1, 0), "max_payment")
    _refused(wallet, _pay(utxo_lib, wallet, allowed, 1_000_000, 0, fee=6_000), "max_fee")
    _refused(wallet, _pay(utxo_lib, wallet, allowed, 100_000, 0, fee=1_001), "max_fee_share_bps")
    three = utxo_lib.build("testnet", wallet.xpubs, [_input(i, 10_000) for i in range(3)],
                           [{"address": allowed, "value": 29_000}], global_xpubs=True)  # fmt: skip
    _refused(wallet, three, "max_inputs")
    assert len(_log(unit)) == before  # nothing refused was logged

    # Change comes back: only what leaves counts against the cap.
    wallet.signed(_pay(utxo_lib, wallet, allowed, 100_000, 5 * BTC), "user")
    assert _log(unit)[-1].payment == 100_000 and _log(unit)[-1].fee == 1_000


def test_a_fee_rule_refuses_a_psbt_whose_inputs_carry_no_value(unit: Unit, wallet: Wallet, utxo_lib: UtxoLib) -> None:
    unit.set_rules("default", {"max_fee": 5_000})
    parsed = wallet_psbt.parse(_pay(utxo_lib, wallet, _address(6), 10_000, 0))
    # An input of someone else's, with no previous output.
    parsed.inputs.append(type(parsed.inputs[0])(vin=type(parsed.tx.vin[0])(b"\x11" * 32, 0)))
    assert signing_rules.analyse(parsed, "tbtc", wallet.user).fee is None
    _refused(wallet, parsed.serialize().hex(), "max_fee")


def test_the_window_adds_up_across_transactions_and_refusals_are_audited(
    unit: Unit, wallet: Wallet, utxo_lib: UtxoLib
) -> None:
    payee = _address(7)
    unit.set_rules("default", {"window": {"seconds": 86400, "max_payment": 3 * BTC}})
    for _ in range(3):
        wallet.signed(_pay(utxo_lib, wallet, payee, BTC, 10_000), "user")
    over = _pay(utxo_lib, wallet, payee, 1, 10_000)
    message = _refused(wallet, over, "window")
    assert "300000000 already left" in message
    with unit.service.sessions() as db:
        record = db.scalars(select(AuditRecord).where(AuditRecord.outcome == "policy_denied")).one()
    digest = hashlib.sha256(over.encode()).hexdigest()
    assert digest in record.detail and "window" in record.detail and over[:64] not in record.detail
    # Another key of another wallet has its own window under the default.
    other = Wallet(unit, wallet.codec, utxo_lib)
    other.signed(_pay(utxo_lib, other, payee, BTC, 10_000), "user")


def test_a_wallet_scope_binds_both_of_its_keys(unit: Unit, wallet: Wallet, utxo_lib: UtxoLib) -> None:
    """The window of a wallet scope counts what its user and its backup key signed: two keys, one cap."""
    payee = _address(8)
    scope, members = wallet_scope(wallet.xpubs)
    unit.set_rules(scope, {"window": {"seconds": 3600, "max_payment": 2 * BTC}}, members)
    wallet.signed(_pay(utxo_lib, wallet, payee, BTC, 1_000), "user")
    backup_spend = utxo_lib.build("testnet", wallet.xpubs, [{**_input(0, BTC + 2_000), "signer": "backup"}],
                                  [{"address": payee, "value": BTC}], global_xpubs=False)  # fmt: skip
    answer(wallet.codec, wallet.sign(backup_spend, "backup"))  # the wallet is not named: all of it is payment
    code, message = refusal(wallet.codec, wallet.sign(_pay(utxo_lib, wallet, payee, 1, 0), "user"))
    assert code == "policy_denied" and f"signing rule window of {scope}" in message


def test_no_rules_at_all_signs_nothing_and_a_bare_hash_needs_none(
    unit: Unit, full: KmsCodec, utxo_lib: UtxoLib
) -> None:
    from sqlalchemy import delete

    from worker import policy_anchor
    from worker.storage.db import transaction
    from worker.storage.models import SigningRulesRow

    wallet = Wallet(unit, full, utxo_lib)
    eth = answer(full, unit.deliver(full, {"op": "generate_signing_key", "coin": "hteth", "source": "user",
                                           "type": "independent"}))["pub"]  # fmt: skip
    unit.set_rules("coin:hteth", {"max_payment": 1})  # a rule a bare hash cannot be judged by
    sign_hash = {"op": "sign", "pub": eth, "source": "user", "payload": "0x" + "ab" * 32, "algorithm": "ecdsa"}
    code, message = refusal(full, unit.deliver(full, sign_hash))
    assert code == "policy_denied" and "bare hash" in message
    with transaction(unit.service.sessions) as db:  # an operator removes every rule, and re-anchors
        db.execute(delete(SigningRulesRow))
        policy_anchor.arm(unit.service.hsm, db, approve=True)
    code, message = refusal(full, wallet.sign(_pay(utxo_lib, wallet, _address(9), 1_000, 0), "user"))
    assert code == "policy_denied" and "no signing rules apply" in message


# -- who may sign with which key --------------------------------------------------------------------------


def test_a_key_signs_for_the_caller_that_made_it_unless_its_rules_grant_another(
    unit: Unit, full: KmsCodec, utxo_lib: UtxoLib
) -> None:
    from sqlalchemy import update

    from worker.storage.db import transaction
    from worker.storage.models import PrivateKey

    wallet = Wallet(unit, full, utxo_lib)
    other = unit.register("other")
    psbt = _pay(utxo_lib, wallet, _address(10), 10_000, 0)
    params = {"op": "sign", "pub": wallet.user, "source": "user", "payload": psbt, "algorithm": "ecdsa"}
    code, message = refusal(other, unit.deliver(other, params))
    assert code == "forbidden" and "generated by another caller" in message
    unit.set_rules(f"key:{wallet.user}", {"grant_callers": ["other"]})
    assert answer(other, unit.deliver(other, params))["signature"]
    # The owner is bound into the key's ciphertext: a row whose owner was changed in the database does not open.
    with transaction(unit.service.sessions) as db:
        db.execute(update(PrivateKey).where(PrivateKey.pub == wallet.backup).values(owner="other"))
    backup = {**params, "pub": wallet.backup, "source": "backup"}
    code, message = refusal(other, unit.deliver(other, backup))
    assert (code, message) == ("invalid", "ciphertext failed integrity check")


def _as_before_owners(unit: Unit, pub: str, source: str) -> None:
    """Seals ``pub``'s key again without an owner: a key generated before owners were kept."""
    from worker import service
    from worker.storage.db import transaction
    from worker.storage.models import PrivateKey

    with transaction(unit.service.sessions) as db:
        row = db.scalars(select(PrivateKey).where(PrivateKey.pub == pub, PrivateKey.source == source)).one()
        prv = service.open_private_key(unit.service.hsm, db, row).prv
        version = service.wrapping_version(db, row.root_key, "alpha")
        sealed = service.sealed_private_key_row(unit.service.hsm, version, pub=pub, prv=prv, coin=row.coin,
                                                source=source, type=row.type, exportable=False)  # fmt: skip
        row.encrypted_prv, row.encrypted_data_key, row.owner = sealed.encrypted_prv, sealed.encrypted_data_key, None


def test_an_ownerless_key_signs_for_every_caller_until_an_operator_gives_it_an_owner(
    unit: Unit, full: KmsCodec, utxo_lib: UtxoLib
) -> None:
    """kmsq signing-key adopt (worker.key_owners): a key generated before owners were kept signs for any caller
    allowed to sign; adopted, it signs for its owner alone, is sealed again with the owner in its associated data,
    and each adoption is in the audit chain. A key that has an owner keeps it; an unknown caller changes nothing."""
    from worker import key_owners
    from worker.errors import NotFound

    wallet = Wallet(unit, full, utxo_lib)
    other = unit.register("other")
    _as_before_owners(unit, wallet.user, "user")
    psbt = _pay(utxo_lib, wallet, _address(12), 10_000, 0)
    params = {"op": "sign", "pub": wallet.user, "source": "user", "payload": psbt, "algorithm": "ecdsa"}
    assert answer(other, unit.deliver(other, params))["signature"]  # the gap: anyone allowed to sign
    with pytest.raises(NotFound, match="no caller 'nobody'"):
        key_owners.adopt(unit.service.hsm, unit.service.sessions, "alpha", "nobody")
    with unit.service.sessions() as db:
        assert [row.pub for row in key_owners.ownerless(db)] == [wallet.user]
    report = key_owners.adopt(unit.service.hsm, unit.service.sessions, "alpha", "full",
                              [wallet.user, wallet.backup, "xpub-unknown"])  # fmt: skip
    assert report.adopted == [(wallet.user, "user")]
    assert report.left == [(wallet.backup, "backup", "owned by full already"),
                           ("xpub-unknown", "", "no key is stored for this pub")]  # fmt: skip
    code, message = refusal(other, unit.deliver(other, params))
    assert code == "forbidden" and "generated by another caller" in message
    assert answer(full, unit.deliver(full, params))["signature"]  # resealed: it opens, for its owner
    with unit.service.sessions() as db:
        assert key_owners.ownerless(db) == []
        details = [r.detail for r in db.scalars(select(AuditRecord).where(AuditRecord.action == "signing key adopted"))]
    assert details == [f"key {wallet.user[:32]} (user): owner full"]
    assert key_owners.adopt(unit.service.hsm, unit.service.sessions, "alpha", "other").adopted == []


@pytest.mark.parametrize("path", [[], [0, 0, 99, 0], [0, 0, 0, 0x80000000], [1, 0, 0, 0], [0, 0, 0]])
def test_a_key_signs_only_on_its_wallets_paths(wallet: Wallet, utxo_lib: UtxoLib, path: list[int]) -> None:
    parsed = wallet_psbt.parse(_pay(utxo_lib, wallet, _address(11), 10_000, 0))
    fingerprint = bip32.HDKey.from_string(wallet.user).my_fingerprint
    derivations = parsed.inputs[0].bip32_derivations
    (ours,) = [d for d in derivations.values() if d.fingerprint == fingerprint]
    ours.derivation = path
    code, message = refusal(wallet.codec, wallet.sign(parsed.serialize().hex(), "user"))
    assert code == "invalid" and "is not a BitGo wallet path" in message, message


# -- signing in batches -----------------------------------------------------------------------------------


def test_a_batch_answers_each_item_and_opens_each_key_once(
    unit: Unit, wallet: Wallet, utxo_lib: UtxoLib, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import service

    payee, denied = _address(12), _address(13)
    unit.set_rules("default", {"deny_destinations": [denied], "window": {"seconds": 3600, "max_payment": 3 * BTC}})
    opened: list[str] = []
    real_open = service.open_private_key

    def counting(hsm: Any, db: Any, row: Any, keys: Any = service.DIRECT) -> Any:
        opened.append(row.pub)
        return real_open(hsm, db, row, keys)

    monkeypatch.setattr(service, "open_private_key", counting)
    psbts = [_pay(utxo_lib, wallet, payee, BTC, 1_000), _pay(utxo_lib, wallet, denied, 1_000, 0),
             _pay(utxo_lib, wallet, payee, BTC, 2_000), "0x" + "ab" * 32, _pay(utxo_lib, wallet, payee, BTC, 3_000),
             _pay(utxo_lib, wallet, payee, 1, 4_000)]  # fmt: skip
    items = [{"pub": wallet.user, "source": "user", "payload": p, "algorithm": "ecdsa"} for p in psbts]
    reply = answer(wallet.codec, unit.deliver(wallet.codec, {"op": "sign_many", "items": items}))["items"]
    assert [sorted(item) for item in reply] == [["signature"], ["error", "message"], ["signature"],
                                                ["error", "message"], ["signature"], ["error", "message"]]  # fmt: skip
    assert reply[1]["error"] == "policy_denied" and "deny_destinations" in reply[1]["message"]
    assert reply[3]["error"] == "invalid"  # a hash is not a payload of a UTXO key
    assert reply[5]["error"] == "policy_denied" and "window" in reply[5]["message"]  # the items before it counted
    assert opened == [wallet.user]  # one key, opened once for its three signatures
    assert [e.payment for e in _log(unit)] == [BTC, BTC, BTC]
    # Each refused item has its own audit record, after the batch's: its key, its payload's digest, the rule.
    with unit.service.sessions() as db:
        records = list(db.scalars(select(AuditRecord).order_by(AuditRecord.seq)))
    expected = [("sign_many", "ok"), ("sign", "policy_denied"), ("sign", "invalid"), ("sign", "policy_denied")]
    assert [(r.action, r.outcome) for r in records[-4:]] == expected
    for record, index in zip(records[-3:], (1, 3, 5), strict=True):
        digest = hashlib.sha256(psbts[index].encode()).hexdigest()
        assert record.detail.startswith(f"item {index}: key {wallet.user[:32]}, payload sha256 {digest}: ")
    assert "deny_destinations" in records[-3].detail and "window" in records[-1].detail


def test_rules_changed_outside_the_commands_stop_every_signature(unit: Unit, wallet: Wallet, utxo_lib: UtxoLib) -> None:
    """A database writer who loosens the default (its MAC no longer verifies), or a holder of the PIN who reseals it
    without the operators' approval, stops signing instead of loosening it."""
    from sqlalchemy import update

    from worker import policy_anchor
    from worker.policy_rows import mac_input
    from worker.storage.db import transaction
    from worker.storage.models import SigningRulesRow

    unit.set_rules("default", {"max_payment": 1_000})
    psbt = _pay(utxo_lib, wallet, _address(14), 5_000, 0)
    _refused(wallet, psbt, "max_payment")
    with transaction(unit.service.sessions) as db:
        db.execute(update(SigningRulesRow).where(SigningRulesRow.scope == "default").values(rules='{"none":true}'))
    code, message = refusal(wallet.codec, wallet.sign(psbt, "user"))
    assert (code, message) == ("invalid", "signing rules default failed its policy check")
    with transaction(unit.service.sessions) as db:  # resealed with the PIN, its evidence of approval left behind
        row = db.get(SigningRulesRow, "default")
        assert row is not None
        row.policy_mac = unit.service.hsm.policy_mac(mac_input(row)).hex()
        policy_anchor.arm(unit.service.hsm, db, approve=True)
    code, message = refusal(wallet.codec, wallet.sign(psbt, "user"))
    assert (code, message) == ("invalid", "signing rules default failed its policy check")
    assert _log(unit) == []


# -- two batches at once (Postgres) ------------------------------------------------------------------------


@pytest.fixture
def pg_unit(tmp_path: Path, pg_engine: Engine) -> Iterator[Unit]:
    """A Unit on a fresh Postgres database, where the window locks are taken (its rejection counter closed and its
    engine disposed after the test)."""
    yield from units(tmp_path, FakeHsm(), url=pg_engine.url.render_as_string(hide_password=False))


def test_a_batch_takes_all_of_its_window_locks_first_in_sorted_order(pg_unit: Unit) -> None:
    """A batch whose items name key B then key A takes A's window lock before B's, and both before its first item:
    with another transaction holding A's (as a batch of A then B would, on its way to B's), it holds nothing while
    it waits, so that transaction takes B's at once instead of the two waiting on each other until Postgres kills
    one as a deadlock."""
    from worker.signing_policy import lock

    unit = pg_unit
    codec = unit.register("batcher")
    pubs = sorted(_eth_key(unit, codec) for _ in range(2))  # key:A < key:B, the order the locks are taken in
    unit.set_rules("default", {"max_hashes": {"seconds": 3600, "count": 10}})
    items = [
        {"pub": pub, "source": "user", "payload": "0x" + "cd" * 32, "algorithm": "ecdsa"} for pub in reversed(pubs)
    ]
    holder = unit.service.sessions()
    holder.begin()
    lock(holder, {f"key:{pubs[0]}"})
    replies: list[Any] = []
    batch = threading.Thread(target=lambda: replies.append(unit.deliver(codec, {"op": "sign_many", "items": items})))
    batch.start()
    try:
        waiting = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid <> pg_backend_pid()"
        deadline = time.monotonic() + 30
        while not (blocked := holder.execute(text(waiting)).scalars().all()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(blocked) == 1, "the batch never waited on key A's lock"
        held = holder.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                                   "pid = :pid"), {"pid": blocked[0]}).scalar()  # fmt: skip
        assert held == 0  # not key B's: it waits on A before it takes B
        holder.execute(text("SET LOCAL lock_timeout = '5s'"))
        lock(holder, {f"key:{pubs[1]}"})  # the other batch's next lock: free, no cycle
    finally:
        holder.rollback()
        holder.close()
        batch.join(timeout=60)
    assert [sorted(item) for item in answer(codec, replies[0])["items"]] == [["signature"], ["signature"]]
    assert [entry.pub for entry in _log(unit)] == list(reversed(pubs))


def _eth_key(unit: Unit, codec: KmsCodec) -> str:
    params = {"op": "generate_signing_key", "coin": "hteth", "source": "user", "type": "independent"}
    return str(answer(codec, unit.deliver(codec, params))["pub"])


def test_a_batch_of_many_items_of_a_key_takes_no_more_statements_than_one_of_two(pg_unit: Unit) -> None:
    """On Postgres, a batch reads its key and the signing rules once and writes its signing log in one INSERT: 40
    items cost the database what 2 do. Before, each item read the key's row and the rules and flushed its own entry:
    ETH hash signing through the gateway at 256 in flight ran at half the rate (docs/PERFORMANCE.md, "Signing at
    batch speed"). (SQLite gets an INSERT per entry: SQLAlchemy cannot batch its inserts in order.)"""
    unit = pg_unit
    full = unit.register("batcher")
    pub = _eth_key(unit, full)
    engine = unit.service.sessions.kw["bind"]

    def statements(count: int) -> list[str]:
        seen: list[str] = []

        def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(" ".join(statement.split()[:4]))

        items = [{"pub": pub, "source": "user", "payload": "0x" + secrets.token_hex(32), "algorithm": "ecdsa"}
                 for _ in range(count)]  # fmt: skip
        event.listen(engine, "before_cursor_execute", note)
        try:
            reply = answer(full, unit.deliver(full, {"op": "sign_many", "items": items}))
        finally:
            event.remove(engine, "before_cursor_execute", note)
        assert [sorted(item) for item in reply["items"]] == [["signature"]] * count
        return seen

    statements(2)  # warm: the worker's caches
    two, forty = statements(2), statements(40)
    assert len(forty) == len(two), sorted(set(forty) - set(two)) or forty
    assert len(_log(unit)) == 2 + 2 + 40
