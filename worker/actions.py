"""The changes a proposal may carry (worker.proposals), each run with its arguments inside the operator's
transaction. Each returns a description of what it did."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from worker import callers
from worker.errors import InvalidRequest
from worker.keystore import KeyStore
from worker.proposals import action


def _text_list(arguments: Mapping[str, Any], name: str) -> list[str]:
    value = arguments.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{name} must be a list of names")
    return value


@action("caller.add")
def caller_add(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> callers.CallerInfo:
    """Registers a caller: ``name``, ``signing_key``, ``reply_key`` (its public identity), ``allowed_ops``,
    ``root_keys`` (a list, or None for every root key) and ``plaintext``."""
    try:
        identity = callers.PublicIdentity(str(arguments["name"]), str(arguments["signing_key"]),
                                          str(arguments["reply_key"]))  # fmt: skip
    except KeyError as e:
        raise InvalidRequest(f"caller.add needs {e.args[0]}") from None
    root_keys = None if arguments.get("root_keys") is None else _text_list(arguments, "root_keys")
    plaintext = arguments.get("plaintext", False)
    if not isinstance(plaintext, bool):
        raise InvalidRequest("plaintext must be true or false")
    return callers.add_caller(hsm, db, identity.caller, identity, _text_list(arguments, "allowed_ops"), root_keys,
                              plaintext)  # fmt: skip


@action("caller.enable")
def caller_enable(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> callers.CallerInfo:
    """Enables the caller ``name``."""
    return callers.set_caller_state(hsm, db, str(arguments.get("name")), "enabled")


@action("caller.disable")
def caller_disable(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> callers.CallerInfo:
    """Disables the caller ``name`` (one operator may do it alone; a proposal is not needed)."""
    return callers.set_caller_state(hsm, db, str(arguments.get("name")), "disabled")
