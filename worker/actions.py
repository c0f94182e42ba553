"""The changes a proposal may carry (worker.proposals), each run with its arguments inside the operator's
transaction. Each returns a description of what it did."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from worker import callers
from worker.errors import InvalidRequest
from worker.keystore import KeyStore

Action = Callable[[KeyStore, Session, Mapping[str, Any]], object]
ACTIONS: dict[str, Action] = {}


def action(name: str) -> Callable[[Action], Action]:
    """Registers ``func`` as the action ``name`` that proposals may carry."""

    def register(func: Action) -> Action:
        ACTIONS[name] = func
        return func

    return register


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


@action("caller.limits")
def caller_limits(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> callers.CallerInfo:
    """Sets the lane (``auto`` or ``bulk``) and the quotas (``rate_requests``, ``rate_items``: per second, or None
    for none) of the caller ``name``."""
    rates = [arguments.get("rate_requests"), arguments.get("rate_items")]
    if not all(r is None or (isinstance(r, int | float) and not isinstance(r, bool)) for r in rates):
        raise InvalidRequest("rate_requests and rate_items must be numbers or null")
    requests, items = (None if r is None else float(r) for r in rates)
    return callers.set_caller_limits(hsm, db, str(arguments.get("name")), str(arguments.get("lane", "auto")),
                                     requests, items)  # fmt: skip


@action("root-key.enable")
def root_key_enable(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> object:
    """Enables the root key ``root_key_id`` again."""
    from worker import lifecycle

    return lifecycle.set_root_key_state(hsm, db, str(arguments.get("root_key_id")), "enabled")


@action("root-key.min-decryption-version")
def root_key_min_decryption_version(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> object:
    """Sets the minimum decryption version of ``root_key_id`` to ``version`` (lowering it needs the quorum)."""
    from worker import lifecycle

    version = arguments.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidRequest("version must be an integer")
    return lifecycle.set_min_decryption_version(hsm, db, str(arguments.get("root_key_id")), version)


@action("pool.enable")
def pool_enable(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> object:
    """Enables the pool ``name`` again."""
    from worker import lifecycle

    return lifecycle.set_pool_state(hsm, db, str(arguments.get("name")), "enabled")


@action("root-key.destroy-version")
def root_key_destroy_version(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> object:
    """Schedules the destruction of version ``version`` of ``root_key_id`` after ``wait_days`` (default 7)."""
    from worker import lifecycle

    version, wait = arguments.get("version"), arguments.get("wait_days", lifecycle.DEFAULT_DESTROY_WAIT_DAYS)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (version, wait)):
        raise InvalidRequest("version and wait_days must be integers")
    assert isinstance(version, int) and isinstance(wait, int)
    return lifecycle.destroy_root_key_version(hsm, db, str(arguments.get("root_key_id")), version, wait)


@action("signing-rules.set")
def signing_rules_set(hsm: KeyStore, db: Session, arguments: Mapping[str, Any]) -> object:
    """Sets the signing rules of ``scope`` to ``rules`` (a document), with ``members`` for a wallet scope."""
    from schemas.signing_rules import RulesError, parse_rules
    from schemas.wire import canonical_json
    from worker import signing_rule_rows

    try:
        rules = parse_rules(canonical_json(arguments.get("rules")))
    except (RulesError, TypeError, ValueError) as e:
        raise InvalidRequest(str(e)) from None
    members = arguments.get("members", "")
    if not isinstance(members, str):
        raise InvalidRequest("members must be text")
    return signing_rule_rows.set_rules(hsm, db, str(arguments.get("scope")), rules, members)
