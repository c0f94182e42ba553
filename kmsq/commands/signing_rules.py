"""``kmsq signing-rules set|list`` and ``kmsq signing-log``: the rules workers check before they sign
(docs/PROTOCOL.md, "Signing rules"), and what they signed. ``kmsq propose signing-rules set`` is the quorum's form
of ``set`` (kmsq.commands.quorum)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from kmsq.commands.common import service
from kmsq.output import console, one_line_errors, print_json, print_table


def scope_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that name a scope and its document: exactly one of ``--default``, ``--key``, ``--wallet``,
    ``--coin``, ``--caller``, and exactly one of ``--rules FILE`` and ``--none``."""
    for option in (
        click.option("--none", "no_rules", is_flag=True, help="No rules, chosen on purpose."),
        click.option(
            "--rules",
            "rules_file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="The rules document (JSON).",
        ),
        click.option("--caller", "caller_name", help="The rules of one caller."),
        click.option("--coin", help="The rules of one coin (btc, tbtc, ltc, ...)."),
        click.option("--wallet", help="The rules of one wallet: its keys' xpubs, comma-separated."),
        click.option("--key", help="The rules of one signing key (its xpub)."),
        click.option("--default", "default_scope", is_flag=True, help="The rules of keys without their own."),
    ):
        func = option(func)
    return func


def scope_arguments(
    default_scope: bool, key: str | None, wallet: str | None, coin: str | None, caller_name: str | None,
    rules_file: Path | None, no_rules: bool,
) -> dict[str, Any]:  # fmt: skip
    """Returns the ``signing-rules.set`` arguments the options name: ``scope``, ``rules`` (the document as JSON
    data) and ``members``. Raises InvalidRequest for a missing or doubled option or a bad document."""
    import json

    from schemas.signing_rules import RulesError, parse_rules
    from worker.errors import InvalidRequest
    from worker.signing_rule_rows import wallet_scope

    given = (default_scope and "default", key and f"key:{key}", wallet and "wallet", coin and f"coin:{coin}",
             caller_name and f"caller:{caller_name}")  # fmt: skip
    named = [s for s in given if s]
    if len(named) != 1:
        raise InvalidRequest("name exactly one scope: --default, --key, --wallet, --coin or --caller")
    if (rules_file is None) == (not no_rules):
        raise InvalidRequest("give exactly one of --rules FILE and --none")
    try:
        rules = parse_rules('{"none": true}' if no_rules else rules_file.read_bytes())  # type: ignore[union-attr]
    except RulesError as e:
        raise InvalidRequest(f"{rules_file}: {e}") from None
    scope, members = named[0], ""
    if wallet is not None:
        scope, members = wallet_scope([x.strip() for x in wallet.split(",") if x.strip()])
    return {"scope": scope, "rules": json.loads(rules.canonical()), "members": members}


@click.group("signing-rules")
def signing_rules_group() -> None:
    """The rules workers check before they sign (set, list)."""


@signing_rules_group.command("set")
@scope_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def signing_rules_set(
    default_scope: bool, key: str | None, wallet: str | None, coin: str | None, caller_name: str | None,
    rules_file: Path | None, no_rules: bool, as_json: bool,
) -> None:  # fmt: skip
    """Set one scope's signing rules. Tightening is one operator's; a change that allows more needs the quorum
    (`kmsq propose signing-rules set`)."""
    from worker.actions import signing_rules_set as set_action
    from worker.storage.db import transaction

    arguments = scope_arguments(default_scope, key, wallet, coin, caller_name, rules_file, no_rules)
    keys = service()
    with transaction(keys.sessions) as db:
        info = set_action(keys.hsm, db, arguments)
    if as_json:
        print_json(info)
    else:
        console.print(f"signing rules of {arguments['scope']}: {_describe(arguments['rules'])}")


def _describe(document: dict[str, Any]) -> str:
    if document.get("none"):
        return "none (every payload the key can sign is signed)"
    return ", ".join(f"{k} {v}" for k, v in sorted(document.items())) or "nothing"


@signing_rules_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def signing_rules_list(as_json: bool) -> None:
    """List every scope's signing rules."""
    from worker.signing_rule_rows import list_rules

    keys = service()
    with keys.sessions() as db:
        found = list_rules(db)
    if as_json:
        print_json([asdict(info) for info in found])
        return
    if not found:
        console.print("no signing rules: no key signs (set them with `kmsq signing-rules set`)")
        return
    print_table("signing rules", ["scope", "rules", "keys"],
                [(_short(i.scope), _describe(i.rules), len(i.members) or "") for i in found])  # fmt: skip


def _short(text: str) -> str:
    return text if len(text) <= 48 else text[:24] + "..." + text[-12:]


@click.command("signing-log")
@click.option("--key", help="Only this key's signatures (its xpub).")
@click.option("--caller", "caller_name", help="Only this caller's.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def signing_log(key: str | None, caller_name: str | None, limit: int, as_json: bool) -> None:
    """List what the workers signed, newest first: key, payload digest, what left the wallet, when."""
    from worker.signing_rule_rows import signing_log as read_log

    keys = service()
    with keys.sessions() as db:
        entries = read_log(db, pub=key, caller=caller_name, limit=limit)
    if as_json:
        print_json([asdict(e) for e in entries])
        return
    print_table("signing log", ["when (UTC)", "caller", "key", "coin", "kind", "payment", "fee", "payload sha256"],
                [(f"{e.signed_at:%Y-%m-%d %H:%M:%S}", e.caller, _short(e.pub), e.coin, e.kind, e.payment,
                  "" if e.fee is None else e.fee, e.payload_digest[:16]) for e in entries])  # fmt: skip
