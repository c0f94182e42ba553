"""``kmsq pool list|disable|enable``: the HSM pools (a disabled pool's workers refuse its requests)."""

from __future__ import annotations

from dataclasses import asdict

import click

from kmsq.commands.common import service
from kmsq.output import one_line_errors, print_json, print_result, print_table


@click.group("pool")
def pool_group() -> None:
    """The HSM pools: list them, disable or enable one."""


@pool_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def pool_list(as_json: bool) -> None:
    """List pools: state and root keys."""
    pools = service().list_pools()
    if as_json:
        print_json([asdict(p) for p in pools])
        return
    print_table("pools", ["pool", "state", "root keys", "changed"],
                [[p.name, p.state, p.root_keys, p.updated_at.strftime("%Y-%m-%d %H:%M") if p.updated_at else "-"]
                 for p in pools])  # fmt: skip


def _set(name: str, state: str, as_json: bool) -> None:
    info = service().set_pool_state(name, state)
    print_result(info, as_json, f"pool {info.name} is {info.state}")


@pool_group.command("disable")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def pool_disable(name: str, as_json: bool) -> None:
    """Disable a pool: its workers refuse every request (invalid: pool … is disabled) until it is enabled."""
    _set(name, "disabled", as_json)


@pool_group.command("enable")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def pool_enable(name: str, as_json: bool) -> None:
    """Enable a disabled pool again."""
    _set(name, "enabled", as_json)
