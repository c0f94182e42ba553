"""Signing rules: what a worker checks in a payload before it signs it (docs/PROTOCOL.md, "Signing rules").

A rules document is JSON, kept in a policy row (``signing_rules``) per scope: ``default`` (a key with no rules of
its own), ``key:<xpub>``, ``wallet:<id>`` (the three keys of a BitGo wallet, worker.signing_rules.wallet_id),
``coin:<coin>`` or ``caller:<name>``. Every document that applies to a payload must pass. Amounts are integers
in the coin's base unit (satoshis, wei). ``{"none": true}`` is the explicit choice of no rules; a key to which no
document applies at all does not sign.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.limits import NAME, NAME_PATTERN
from schemas.wire import canonical_json

MAX_RULE_ADDRESSES = 1000
MAX_WINDOW_SECONDS = 31 * 24 * 3600
Amount = Annotated[int, Field(ge=0, lt=2**256)]  # satoshis, or wei
Address = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9]+$")]  # ETH-like: 0x..., any case
_SCOPE = re.compile(r"^(default|key:[1-9A-HJ-NP-Za-km-z]{100,120}|wallet:[0-9a-f]{32}|coin:[a-z0-9:]{1,32}|caller:.+)$")


class RulesError(ValueError):
    """A rules document or scope that is malformed (the text says what)."""


class Window(BaseModel):
    """A cap on what leaves over a rolling window."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    seconds: Annotated[int, Field(ge=60, le=MAX_WINDOW_SECONDS)]
    max_payment: Amount


class HashWindow(BaseModel):
    """A cap on how many bare hashes are signed over a rolling window."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    seconds: Annotated[int, Field(ge=60, le=MAX_WINDOW_SECONDS)]
    count: Annotated[int, Field(ge=0, le=10_000_000)]


class SigningRules(BaseModel):
    """One scope's rules. Absent fields impose nothing; ``none`` says so on purpose and takes no other field."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    none: bool = False
    allow_destinations: Annotated[tuple[Address, ...], Field(max_length=MAX_RULE_ADDRESSES)] | None = None
    deny_destinations: Annotated[tuple[Address, ...], Field(max_length=MAX_RULE_ADDRESSES)] = ()
    max_payment: Amount | None = None  # per transaction: the sum of the outputs that are not change
    window: Window | None = None
    max_fee: Amount | None = None
    max_fee_share_bps: Annotated[int, Field(ge=0, le=10_000)] | None = None  # fee / payment, in 1/10,000
    max_inputs: Annotated[int, Field(ge=1, le=100_000)] | None = None
    max_outputs: Annotated[int, Field(ge=1, le=100_000)] | None = None
    # Bare hashes (ETH-like coins, callers with the sign_hash permission): a document without this refuses them.
    max_hashes: HashWindow | None = None
    # Callers besides its owner that may sign with the key (key and wallet scopes only).
    grant_callers: Annotated[tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...], Field(max_length=100)] = ()

    @model_validator(mode="after")
    def _none_alone(self) -> SigningRules:
        if self.none and self.model_dump(exclude={"none"}, exclude_defaults=True):
            raise ValueError("'none' takes no other rule")
        return self

    def needs_amounts(self) -> bool:
        """True when checking these rules needs every input's value (the fee rules)."""
        return self.max_fee is not None or self.max_fee_share_bps is not None

    def canonical(self) -> str:
        """The document as stored and approved: canonical JSON of the fields set."""
        return canonical_json(self.model_dump(mode="json", exclude_defaults=True)).decode()


def parse_rules(text: str | bytes) -> SigningRules:
    """Returns the rules document in ``text`` (JSON). Raises RulesError when it is not one."""
    try:
        data: Any = json.loads(text)
        if isinstance(data, dict):
            for name in ("allow_destinations", "deny_destinations", "grant_callers"):
                if isinstance(data.get(name), list):
                    data[name] = tuple(data[name])
            if isinstance(data.get("window"), dict):
                data["window"] = Window(**data["window"])
            if isinstance(data.get("max_hashes"), dict):
                data["max_hashes"] = HashWindow(**data["max_hashes"])
        return SigningRules(**data) if isinstance(data, dict) else _not_an_object()
    except (ValueError, TypeError, ValidationError) as e:
        raise RulesError(f"not a signing rules document: {_first_error(e)}") from None


def _not_an_object() -> SigningRules:
    raise RulesError("a signing rules document is a JSON object")


def _first_error(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        return f"{where}: {first['msg']}"
    return str(error)


def check_scope(scope: str) -> str:
    """Returns ``scope`` when it names one (``default``, ``key:<xpub>``, ``wallet:<id>``, ``coin:<coin>``,
    ``caller:<name>``). Raises RulesError otherwise."""
    if not _SCOPE.fullmatch(scope) or (scope.startswith("caller:") and not NAME.fullmatch(scope[7:])):
        raise RulesError(
            f"not a signing rules scope: {scope[:40]!r} (default, key:XPUB, wallet:ID, coin:COIN or caller:NAME)"
        )
    return scope


def looser(before: SigningRules | None, after: SigningRules) -> list[str]:
    """What ``after`` allows that ``before`` did not (empty when it only tightens): the changes that need a
    quorum. ``before`` None is a key to which no document applied, which did not sign at all."""
    if before is None:
        return ["signing allowed where nothing was signed"]
    granted = [] if set(after.grant_callers) <= set(before.grant_callers) else ["grant_callers widened"]
    if after.none or before.none:
        return granted + ([] if before.none else ["rules replaced by none"])
    found = granted + _looser_lists(before, after)
    for name in ("max_payment", "max_fee", "max_fee_share_bps", "max_inputs", "max_outputs"):
        old, new = getattr(before, name), getattr(after, name)
        if old is not None and (new is None or new > old):
            found.append(f"{name} raised")
    if before.window is not None:
        new_window = after.window
        if new_window is None or new_window.max_payment > before.window.max_payment:
            found.append("window raised")
        elif new_window.seconds < before.window.seconds:
            found.append("window shortened")
    if after.max_hashes is not None and (
        before.max_hashes is None or after.max_hashes.count > before.max_hashes.count
        or after.max_hashes.seconds < before.max_hashes.seconds
    ):  # fmt: skip
        found.append("max_hashes raised")
    return found


def _looser_lists(before: SigningRules, after: SigningRules) -> list[str]:
    found = []
    if before.allow_destinations is not None and (
        after.allow_destinations is None or not set(after.allow_destinations) <= set(before.allow_destinations)
    ):
        found.append("allow_destinations widened")
    if not set(before.deny_destinations) <= set(after.deny_destinations):
        found.append("deny_destinations shortened")
    return found
