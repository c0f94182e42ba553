"""``kmsq root-key create|rotate|list``: the HSM-held root keys."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from kmsq.commands.common import service
from kmsq.output import console, one_line_errors, print_json, print_table
from schemas.limits import ROOT_KEY_TYPES

if TYPE_CHECKING:
    from worker.service import RootKeyInfo


@click.group("root-key")
def root_key() -> None:
    """Manage root keys."""


def _print_root_keys(keys: list[RootKeyInfo], as_json: bool) -> None:
    if as_json:
        print_json([asdict(k) for k in keys])
        return
    print_table(
        "root keys",
        ["id", "type", "pool", "state", "version", "wrap", "created"],
        [
            [k.id, k.type, k.pool, k.state, k.version, k.wrap_algorithm, k.created_at.strftime("%Y-%m-%d %H:%M")]
            for k in keys
        ],
    )


@root_key.command("create")
@click.option("--type", "key_type", type=click.Choice(ROOT_KEY_TYPES), default="aes-256", show_default=True)
@click.option("--pool", default=None, help="HSM pool (default: the configured default pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_create(key_type: str, pool: str | None, as_json: bool) -> None:
    """Create a root key in the HSM."""
    keys = service()
    key = keys.create_root_key(key_type, pool)
    keys.ensure_fleet_key(key.pool)  # every pool with a root key can serve requests
    if as_json:
        print_json(asdict(key))
    else:
        console.print(f"created root key {key.id} ({key.type}, pool {key.pool}, {key.wrap_algorithm})")


@root_key.command("rotate")
@click.argument("root_key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_rotate(root_key_id: str, as_json: bool) -> None:
    """Add a new version to a root key; older versions keep decrypting."""
    key = service().rotate_root_key(root_key_id)
    if as_json:
        print_json(asdict(key))
    else:
        console.print(f"root key {key.id} is now at version {key.version}")


@root_key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_list(as_json: bool) -> None:
    """List root keys."""
    _print_root_keys(service().list_root_keys(), as_json)
