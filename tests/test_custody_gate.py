"""KMSQ_MIN_TOKENS (issue 23, item 1): with a rule of two tokens, a worker wraps nothing under a root key version
until two tokens reported holding it, by ``token_keys`` rows whose MAC verifies under the policy key; a row a
database writer adds does not count. On the real SoftHSM2 token, with SQLite and Postgres (``token_unit``)."""

from __future__ import annotations

from sqlalchemy import select

from tasks.codec import KmsCodec
from tests.unit_fixtures import Unit, answer, refusal
from worker import replication
from worker.hsm import Hsm
from worker.keystore import root_key_label
from worker.pipeline import Delivery
from worker.storage.db import transaction
from worker.storage.models import RootKey, TokenKey


def _holds(unit: Unit, token: str, label: str, *, forged: bool = False) -> None:
    """A token_keys row saying ``token`` holds ``label`` (MACed as that token's replication would, unless forged)."""
    hsm = unit.service.hsm
    assert isinstance(hsm, Hsm)
    mac = "0" * 64 if forged else replication._held_mac(hsm, token, label, "kcv-of-the-key")
    with transaction(unit.service.sessions) as db:
        db.add(TokenKey(token=token, label=label, kind="aes-root", kcv="kcv-of-the-key", replicable=True, mac=mac))


def _data_key(unit: Unit, codec: KmsCodec) -> Delivery:
    return unit.deliver(codec, {"op": "generate_data_key", "root_key_id": unit.roots["aes"]}, final=True)


def _two_token_rule(unit: Unit) -> tuple[Hsm, KmsCodec]:
    """The unit's worker under KMSQ_MIN_TOKENS=2, and a caller allowed everything."""
    hsm = unit.service.hsm
    assert isinstance(hsm, Hsm)
    codec = unit.register("full")
    unit.ctx.gate = replication.CustodyGate(hsm, 2)
    return hsm, codec


def test_nothing_is_wrapped_under_a_version_on_fewer_tokens_than_the_rule(token_unit: Unit) -> None:
    unit = token_unit
    hsm, codec = _two_token_rule(unit)
    with unit.service.sessions() as db:
        root = db.get(RootKey, unit.roots["aes"])
        assert root is not None
        label = root_key_label(root.id, root.current_version)
    code, message = refusal(codec, _data_key(unit, codec))
    assert code == "unavailable" and "is on 0 of the 2 tokens KMSQ_MIN_TOKENS asks for" in message
    _holds(unit, hsm.token_serial(), label)
    _holds(unit, "a-token-nobody-trusted", label, forged=True)  # a database writer's row
    code, message = refusal(codec, _data_key(unit, codec))
    assert code == "unavailable" and "is on 1 of the 2 tokens" in message
    _holds(unit, "token-b", label)
    made = answer(codec, _data_key(unit, codec))
    assert "encryptedKey" in made
    with unit.service.sessions() as db:  # the refusals changed nothing but their own records
        assert len(list(db.scalars(select(TokenKey).where(TokenKey.label == label)))) == 3


def test_token_keys_are_refused_while_the_rule_asks_for_more_than_one_token(token_unit: Unit) -> None:
    unit = token_unit
    _, codec = _two_token_rule(unit)
    params = {"op": "generate_signing_key", "coin": "hteth", "source": "user", "type": "independent", "in_hsm": True}
    code, message = refusal(codec, unit.deliver(codec, params))
    assert code == "invalid" and "KMSQ_MIN_TOKENS" in message and "without in_hsm" in message
