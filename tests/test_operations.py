"""The operation table (schemas.operations) is the one declaration of each operation: these checks fail when a
layer that reads it (the worker's handlers and tasks, the SDK, the coalescer's batch forms, the caller commands,
the gateway) and the table disagree."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import pytest

from kmsq.commands.keys import CALLER_COMMANDS, COMMANDS
from kmsq.gateway import ENDPOINTS, check_endpoints
from schemas.messages import Request
from schemas.operations import (
    ALLOWABLE_OPS,
    BATCH_ITEMS,
    BATCH_OPS,
    OPERATIONS,
    OPS,
    PLAINTEXT_OPS,
    SIGN_HASH,
    item_operation,
    item_sealed_field,
    permission_of,
    returns_plaintext,
)
from schemas.replies import sealed_fields
from tasks.client import AsyncKmsClient, KmsClient
from worker.handlers import FAMILIES, handler_of
from worker.handlers.registry import HANDLERS, OpCall, Outcome, handles

pytestmark = pytest.mark.unit


def _op_literal(model: type) -> str:
    (value,) = typing.get_args(model.model_fields["op"].annotation)  # type: ignore[attr-defined]
    return str(value)


def test_each_row_names_its_own_request_model_and_a_reply_model() -> None:
    assert tuple(OPERATIONS) == OPS and len(set(OPS)) == len(OPS)
    for name, row in OPERATIONS.items():
        assert row.name == name and _op_literal(row.request) == name
        assert row.reply.model_config.get("extra") == "forbid" and row.reply.model_config.get("frozen")
    # The signed request's params are exactly the table's request models.
    params = Request.model_fields["params"].annotation
    assert {_op_literal(model) for model in typing.get_args(params)} == set(OPS)


def test_permissions_come_from_the_rows() -> None:
    singles = [row for row in OPERATIONS.values() if row.name not in BATCH_OPS and row.permission is not None]
    assert (*(row.name for row in singles), SIGN_HASH) == ALLOWABLE_OPS and all(r.permission == r.name for r in singles)
    assert {"generate_data_key", "decrypt_data_key", "get_key"} == PLAINTEXT_OPS
    assert permission_of({"op": "get_result"}) is None
    assert permission_of({"op": "generate_data_keys", "count": 2}) == "generate_data_key"
    assert permission_of({"op": "generate_data_keys", "count": 2, "with_plaintext": False}) == (
        "generate_data_key_without_plaintext"
    )
    assert (permission_of({"op": "get_keys"}), returns_plaintext({"op": "get_keys"})) == ("get_key", True)
    assert (permission_of({"op": "rewrap_data_keys"}), returns_plaintext({"op": "rewrap_data_keys"})) == (
        "rewrap_data_key",
        False,
    )


def test_each_batch_form_fits_both_models() -> None:
    batches = {"generate_data_keys", "decrypt_data_keys", "rewrap_data_keys", "put_keys", "get_keys", "sign_many"}
    assert batches == BATCH_OPS
    for batch, singles in BATCH_ITEMS.items():
        assert OPERATIONS[batch].permission is None and batch not in ALLOWABLE_OPS
        for row in singles:
            assert row.batch is not None and item_operation({"op": batch, **row.batch.fixed}) is row
            single_fields, batch_fields = row.request.model_fields, OPERATIONS[batch].request.model_fields
            assert set(row.batch.item_fields) <= set(single_fields)
            assert set(row.batch.shared) <= set(single_fields) & set(batch_fields)
            assert set(row.batch.fixed) <= set(batch_fields) and row.batch.items in batch_fields
            assert (row.batch.sealed is None) == (row.sealed_input is None)
            if row.batch.sealed is not None:
                assert OPERATIONS[batch].sealed_input is not None
                assert OPERATIONS[batch].sealed_input.field == row.batch.sealed  # type: ignore[union-attr]
            # A batch's items are its single operation's replies, and carry its sealed field.
            item_types = typing.get_args(typing.get_args(OPERATIONS[batch].reply.model_fields["items"].annotation)[0])
            assert row.reply in item_types
        sealed = {f for row in singles for f in sealed_fields(row.reply)}
        assert item_sealed_field(batch) == (next(iter(sealed)) if sealed else None) and len(sealed) <= 1


def test_sealed_inputs_and_pools_name_request_fields() -> None:
    for row in OPERATIONS.values():
        fields = row.request.model_fields
        if row.sealed_input is not None:
            assert row.sealed_input.field in fields
        if row.pool_from is not None:
            assert row.pool_from in fields


def test_every_operation_has_one_handler_in_its_familys_module() -> None:
    assert set(HANDLERS) == set(OPS)
    for name, row in OPERATIONS.items():
        module = FAMILIES[row.family]
        assert handler_of(name).__module__ == module.__name__, name
        assert Path(module.__file__ or "").stem == row.family
    with pytest.raises(ValueError, match="has a handler already"):
        handles("data_keys", "generate_data_key")(_no_handler)
    with pytest.raises(ValueError, match="signing family"):
        handles("data_keys", "sign")(_no_handler)
    with pytest.raises(KeyError):
        handles("data_keys", "no_such_operation")(_no_handler)
    assert HANDLERS["sign"] is not _no_handler and HANDLERS["generate_data_key"] is not _no_handler


def _no_handler(call: OpCall, params: Any) -> Outcome:
    raise AssertionError("never registered")


def test_the_sdk_has_each_operation_three_ways_with_the_table_s_fields() -> None:
    for name, row in OPERATIONS.items():
        submit = KmsClient.__dict__[f"submit_{name}"]
        assert getattr(KmsClient, name).__wrapped__ is submit, name  # the blocking twin of submit_<op>
        assert getattr(AsyncKmsClient, name).__wrapped__ is submit, name  # and the coroutine
        assert inspect.iscoroutinefunction(getattr(AsyncKmsClient, name))
        parameters = set(inspect.signature(submit).parameters) - {"self"}
        # Every request field is a parameter (a batch's sealed list travels inside its items), and a pool
        # can be named wherever no field picks it.
        expected = set(row.request.model_fields) - {"op"}
        if name == "put_keys":
            expected = {"items", "root_key_id"}
        assert expected <= parameters, (name, expected - parameters)
        assert "pool" in parameters


def test_each_caller_command_asks_for_its_operation_s_fields() -> None:
    assert len(CALLER_COMMANDS) == len(COMMANDS)
    for spec, command in zip(COMMANDS, CALLER_COMMANDS, strict=True):
        asked = {p.name for p in command.params} | {f"{field}" for field in spec.from_file}
        fields = set(OPERATIONS[spec.op].request.model_fields) - {"op"}
        assert fields <= asked | {f"{f}_file" for f in spec.from_file}, (spec.name, fields - asked)


def test_the_gateway_answers_are_fields_of_their_operations_replies() -> None:
    check_endpoints()
    assert {op for op, _ in ENDPOINTS.values()} <= set(OPS)
    for _, answer in ENDPOINTS.values():
        assert "prv" not in answer.model_fields or answer.__name__ == "GetKeyAnswer"
