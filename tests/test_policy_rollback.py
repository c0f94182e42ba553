"""Issue 22, item 1: a database writer who kept an earlier copy of a policy row (a backup, a replica, a WAL
archive) writes it back, MAC and all. The MAC still verifies, but the rows no longer hash to the token's anchor
(worker.policy_anchor): the worker refuses every policy row, so the operator's change is not undone. Each of
the five rollbacks the adversarial run made, in process through the real pipeline: on the in-memory token
(unit tier), and on SoftHSM2 with Postgres and SQLite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, update

from tasks.codec import KmsCodec
from tests.unit_fixtures import Unit, answer, refusal
from worker import policy, policy_anchor
from worker.pipeline import Delivery
from worker.policy import PolicyNotAnchored
from worker.storage.db import transaction
from worker.storage.models import Caller, Pool, RootKey

Model = type[Caller] | type[RootKey] | type[Pool]


def _copy(unit: Unit, model: Model, key: str) -> dict[str, Any]:
    """A row's columns as the database holds them (what a backup keeps)."""
    with unit.service.sessions() as db:
        row = db.get(model, key)
        assert row is not None
        return {c.key: getattr(row, c.key) for c in model.__table__.columns}


def _put_back(unit: Unit, model: Model, values: dict[str, Any]) -> None:
    """Writes an earlier copy of a row back, as a database writer can (no HSM, no operator command)."""
    primary = list(model.__table__.primary_key)
    where = [c == values[c.key] for c in primary]
    with transaction(unit.service.sessions) as db:
        if db.execute(select(*primary).where(*where)).first() is None:
            db.execute(insert(model).values(**values))
        else:
            db.execute(update(model).where(*where).values(**values))


def _refused_unanchored(unit: Unit, delivery: Delivery, request_id: str) -> None:
    """Refused before authentication (no policy row is trusted): no reply, counted with its reason."""
    assert (delivery.queue, delivery.code) == (None, "unauthenticated")
    assert unit.rejection(request_id).reason == "policy rows not anchored"


def _deliver(unit: Unit, codec: KmsCodec, params: dict[str, Any]) -> tuple[Delivery, str]:
    request, args = codec.build_request(params, "alpha")
    return unit.handle_args(request, args), str(request.request_id)


def _anchored(unit: Unit) -> bool:
    with unit.service.sessions() as db:
        return policy_anchor.status(unit.service.hsm, db).matches


def _caller_disable(unit: Unit, full: KmsCodec) -> None:
    earlier = _copy(unit, Caller, "full")
    from worker import callers

    with transaction(unit.service.sessions) as db:
        callers.set_caller_state(unit.service.hsm, db, "full", "disabled")
    assert refusal(full, unit.deliver(full, {"op": "generate_data_key"}))[0] == "unauthenticated"  # disabled
    _put_back(unit, Caller, earlier)


def _root_key_disable(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    earlier = _copy(unit, RootKey, root)
    unit.service.set_root_key_state(root, "disabled")
    assert refusal(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root})) == (
        "invalid", f"root key {root} is disabled")  # fmt: skip
    _put_back(unit, RootKey, earlier)


def _min_decryption_version(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    unit.service.rotate_root_key(root)
    earlier = _copy(unit, RootKey, root)
    unit.service.set_min_decryption_version(root, 2)
    _put_back(unit, RootKey, earlier)


def _rotate(unit: Unit, full: KmsCodec) -> None:
    root = unit.roots["aes"]
    earlier = _copy(unit, RootKey, root)
    unit.service.rotate_root_key(root)
    _put_back(unit, RootKey, earlier)  # the new version's row stays; the root key names version 1 again


def _pool_disable(unit: Unit, full: KmsCodec) -> None:
    unit.service.set_pool_state("alpha", "enabled")  # a row of an earlier `pool enable`, with its MAC
    earlier = _copy(unit, Pool, "alpha")
    unit.service.set_pool_state("alpha", "disabled")
    _put_back(unit, Pool, earlier)


def _pool_deleted(unit: Unit, full: KmsCodec) -> None:
    unit.service.set_pool_state("alpha", "disabled")
    with transaction(unit.service.sessions) as db:
        db.execute(delete(Pool).where(Pool.name == "alpha"))


ROLLBACKS: dict[str, Callable[[Unit, KmsCodec], None]] = {
    "caller disable undone": _caller_disable,
    "root-key disable undone": _root_key_disable,
    "min decryption version undone": _min_decryption_version,
    "rotate undone": _rotate,
    "pool disable undone": _pool_disable,
    "pool row deleted": _pool_deleted,
}


def check_rollback(unit: Unit, full: KmsCodec, name: str) -> None:
    """The operator's change, the earlier row put back: every request is refused, nothing is served from the
    rows put back; the operator's review and `policy seal` (here: the rows restored) bring service back."""
    old = answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": unit.roots["aes"]}))
    assert _anchored(unit)
    ROLLBACKS[name](unit, full)
    assert not _anchored(unit)
    for params in ({"op": "generate_data_key", "root_key_id": unit.roots["aes"]},
                   {"op": "decrypt_data_key", "encrypted_key": old["encryptedKey"]}):  # fmt: skip
        delivery, request_id = _deliver(unit, full, params)
        _refused_unanchored(unit, delivery, request_id)


@pytest.mark.unit
@pytest.mark.parametrize("name", list(ROLLBACKS))
def test_a_policy_row_put_back_is_refused(unit: Unit, full: KmsCodec, name: str) -> None:
    check_rollback(unit, full, name)


@pytest.mark.parametrize("name", list(ROLLBACKS))
def test_a_policy_row_put_back_is_refused_on_softhsm2(token_unit: Unit, name: str) -> None:
    """The anchor is a data object of the real token (CKO_DATA, written by the operator commands)."""
    check_rollback(token_unit, token_unit.register("full"), name)


@pytest.mark.unit
def test_no_operator_command_approves_a_row_put_back(unit: Unit, full: KmsCodec) -> None:
    """An ordinary operator command after a rollback changes nothing (it would anchor the row put back along with
    its own change); the operator reviews (`kmsq policy check`), and only `kmsq policy seal` approves the rows as
    they are."""
    root, other = unit.roots["aes"], unit.roots["rsa"]
    earlier = _copy(unit, RootKey, root)
    unit.service.set_root_key_state(root, "disabled")
    _put_back(unit, RootKey, earlier)
    with unit.service.sessions() as db:
        assert "do not match" in policy_anchor.status(unit.service.hsm, db).describe()
    with pytest.raises(PolicyNotAnchored, match="no operator change is made until then"):
        unit.service.set_root_key_state(other, "disabled")
    assert _copy(unit, RootKey, other)["state"] == "enabled"
    with transaction(unit.service.sessions) as db:
        policy.review(unit.service.hsm, db, seal_failing=True)  # `kmsq policy seal`: the operator approves
    assert _anchored(unit)
    assert "encryptedKey" in answer(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root}))
    unit.service.set_root_key_state(root, "disabled")  # and disables it again: anchored, and disabled
    assert _anchored(unit)
    assert refusal(full, unit.deliver(full, {"op": "generate_data_key", "root_key_id": root})) == (
        "invalid", f"root key {root} is disabled")  # fmt: skip


@pytest.mark.unit
def test_an_anchor_vouches_for_the_rows_and_nothing_else(unit: Unit) -> None:
    with unit.service.sessions() as db:
        state = policy_anchor.policy_state(db)
        scope = policy_anchor.deployment_id(db)
    digest = policy_anchor.state_digest(state)
    assert scope is not None and policy_anchor.accepted(unit.service.hsm, scope, state)
    changed = dict(state)
    changed[("caller", "someone")] = None
    assert policy_anchor.state_digest(changed) != digest
    assert not policy_anchor.accepted(unit.service.hsm, scope, changed)
    assert not policy_anchor.accepted(unit.service.hsm, "another-database", state)
    assert policy_anchor.Anchor.decode(b"not json") is None
    anchor = policy_anchor.Anchor(3, digest, "ab")
    assert policy_anchor.Anchor.decode(anchor.encode()) == anchor and anchor.accepts("ab")


@pytest.mark.unit
def test_a_savepoint_released_does_not_move_the_anchor(unit: Unit) -> None:
    """SQLAlchemy fires before_commit and after_commit when a savepoint is released: an operator transaction that
    releases one (an audit chain's first record, a private key's insert) and then rolls back leaves the anchor as
    it was (found by a review; it would have anchored rows that never committed)."""
    with unit.service.sessions() as db:
        before = policy_anchor.anchors(unit.service.hsm, policy_anchor.deployment_id(db))
    with pytest.raises(RuntimeError), transaction(unit.service.sessions) as db:
        policy.ensure_pool_row(unit.service.hsm, db, "gamma")  # seals a row: the transaction is armed
        with db.begin_nested():
            db.execute(select(Pool.name))
        raise RuntimeError("rolled back after the savepoint")
    with unit.service.sessions() as db:
        assert policy_anchor.anchors(unit.service.hsm, policy_anchor.deployment_id(db)) == before
        assert db.get(Pool, "gamma") is None
    assert _anchored(unit)
