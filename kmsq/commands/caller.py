"""``kmsq caller keygen|add|list|disable|enable|limits``: caller identities and the caller registry.

``keygen`` is the caller's (it needs no HSM or database code); the others are the operator's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from kmsq.commands.common import service
from kmsq.output import console, one_line_errors, print_json, print_result, print_table
from schemas.limits import CALLER_LANES, MAX_RATE_PER_SECOND, MIN_RATE_PER_SECOND


@click.group("caller")
def caller() -> None:
    """Caller identities (keygen) and the caller registry (add, list, disable, enable, limits)."""


@caller.command("keygen")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def caller_keygen(name: str, directory: Path, as_json: bool) -> None:
    """Write a new caller identity: NAME.key.json (0600, private) and NAME.pub.json (for the operator)."""
    from tasks.identity import CallerIdentity

    identity = CallerIdentity.generate(name)
    private_path, public_path = identity.write(directory)
    if as_json:
        print_json(
            {"caller": name, "key_id": identity.key_id, "identity": str(private_path), "public": str(public_path)}
        )
    else:
        console.print(f"wrote {private_path} (private, 0600) and {public_path} (give this one to the operator)")
        console.print(f"key id {identity.key_id}")


def _split(values: str | None) -> list[str]:
    return [v.strip() for v in (values or "").split(",") if v.strip()]


@caller.command("add")
@click.argument("name")
@click.option("--public-key", "public_key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--allow", required=True, help="Operations, comma-separated (e.g. generate_data_key,put_key).")
@click.option("--root-keys", default=None, help="Root key ids the caller may use, comma-separated.")
@click.option("--all-root-keys", is_flag=True, help="Allow every root key, including future ones.")
@click.option("--plaintext", is_flag=True, help="Allow operations that return plaintext secrets.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def caller_add(
    name: str, public_key: Path, allow: str, root_keys: str | None, all_root_keys: bool, plaintext: bool, as_json: bool
) -> None:
    """Register a caller from its NAME.pub.json."""
    from worker import callers
    from worker.errors import InvalidRequest
    from worker.storage.db import transaction

    if all_root_keys == (root_keys is not None):
        raise InvalidRequest("give exactly one of --root-keys and --all-root-keys")
    identity = callers.read_public_identity(public_key)
    if identity.caller != name:
        raise InvalidRequest(f"{public_key} is the identity of {identity.caller!r}, not {name!r}")
    keys = service()
    with transaction(keys.sessions) as db:
        info = callers.add_caller(
            keys.hsm, db, name, identity, _split(allow), None if all_root_keys else _split(root_keys), plaintext
        )
    print_result(info, as_json, f"registered caller {info.name} ({info.key_id}): {', '.join(info.allowed_ops)}")


@caller.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def caller_list(as_json: bool) -> None:
    """List registered callers."""
    from worker import callers
    from worker.storage.db import transaction

    with transaction(service().sessions) as db:
        infos = callers.list_callers(db)
    if as_json:
        print_json([asdict(i) for i in infos])
        return
    print_table(
        "callers",
        ["name", "key id", "operations", "root keys", "plaintext", "state", "lane and quotas"],
        [
            [i.name, i.key_id, ",".join(i.allowed_ops), "all" if i.root_keys is None else ",".join(i.root_keys),
             "yes" if i.plaintext else "no", i.state, describe_limits(i)]
            for i in infos
        ],
    )  # fmt: skip


def _set_state(name: str, state: str) -> None:
    from worker import callers
    from worker.storage.db import transaction

    keys = service()
    with transaction(keys.sessions) as db:
        info = callers.set_caller_state(keys.hsm, db, name, state)
    console.print(f"caller {info.name} is {info.state}")


@caller.command("disable")
@click.argument("name")
@one_line_errors
def caller_disable(name: str) -> None:
    """Disable a caller: its requests are rejected as unauthenticated from now on."""
    _set_state(name, "disabled")


@caller.command("enable")
@click.argument("name")
@one_line_errors
def caller_enable(name: str) -> None:
    """Enable a disabled caller again."""
    _set_state(name, "enabled")


def limit_options(func: Callable[..., None]) -> Callable[..., None]:
    """The options of a caller's lane and quotas (``kmsq caller limits``, ``kmsq propose caller limits``)."""
    rate = click.FloatRange(MIN_RATE_PER_SECOND, MAX_RATE_PER_SECOND)
    options = (
        click.option("--lane", type=click.Choice(CALLER_LANES), default=None,
                     help="auto: the client picks (batch operations bulk); bulk: every request in the bulk lane."),
        click.option("--requests-per-second", "requests", type=rate, default=None, help="Quota of messages."),
        click.option("--items-per-second", "items", type=rate, default=None,
                     help="Quota of items (a batch's items; a single request is one)."),
        click.option("--no-requests-quota", "no_requests", is_flag=True, help="Remove the quota of messages."),
        click.option("--no-items-quota", "no_items", is_flag=True, help="Remove the quota of items."),
    )  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def merged_limits(
    current: Any, lane: str | None, requests: float | None, items: float | None, no_requests: bool, no_items: bool
) -> dict[str, Any]:
    """A caller's lane and quotas after the options given (the others as they are in ``current``, a CallerInfo).
    Raises InvalidRequest for a quota both set and removed."""
    from worker.errors import InvalidRequest

    if (no_requests and requests is not None) or (no_items and items is not None):
        raise InvalidRequest("give a quota or remove it, not both")
    return {
        "lane": lane or current.lane,
        "rate_requests": None if no_requests else (requests if requests is not None else current.rate_requests),
        "rate_items": None if no_items else (items if items is not None else current.rate_items),
    }


def describe_limits(info: Any) -> str:
    """One line: a caller's lane and quotas."""

    def rate(value: float | None) -> str:
        return "no quota" if value is None else f"{value:g}/s"

    return f"lane {info.lane}, requests {rate(info.rate_requests)}, items {rate(info.rate_items)}"


@caller.command("limits")
@click.argument("name")
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def caller_limits(
    name: str, lane: str | None, requests: float | None, items: float | None, no_requests: bool, no_items: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Show or set a caller's lane and quotas (docs/OPERATIONS.md, "Sharing a pool"). Setting or lowering a quota,
    or the bulk lane, one operator does alone; raising or removing one needs `kmsq propose caller limits`."""
    from worker import callers
    from worker.storage.db import transaction

    keys = service()
    with transaction(keys.sessions) as db:
        info = current = callers.caller_info(db, name)
        if any(v is not None for v in (lane, requests, items)) or no_requests or no_items:
            limits = merged_limits(current, lane, requests, items, no_requests, no_items)
            info = callers.set_caller_limits(keys.hsm, db, name, limits["lane"], limits["rate_requests"],
                                             limits["rate_items"])  # fmt: skip
    print_result(info, as_json, f"caller {info.name}: {describe_limits(info)}")
