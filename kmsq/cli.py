"""The ``kmsq`` command line (operator commands for now)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from kmsq import caller_cli, legacy_cli, operator_cli
from kmsq.chaos.run import chaos
from kmsq.demo import demo
from kmsq.output import console, one_line_errors, print_json, print_table

ROOT_KEY_TYPE_NAMES = ("aes-256", "rsa-2048", "rsa-3072", "rsa-4096")


def _service() -> Any:
    from worker.config import load_settings
    from worker.runtime import KeyService

    return KeyService.from_settings(load_settings())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """kmsq: a key-management service on a PKCS#11 HSM, reached through signed queue messages."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def init(as_json: bool) -> None:
    """Create the embedded token (if no HSM is configured), migrate the database, create a default root key
    and the default pool's fleet keys.

    Safe to run again: it creates only what is missing.
    """
    from worker.config import load_settings
    from worker.runtime import KeyService
    from worker.softhsm import ensure_embedded_token
    from worker.storage.db import migrate

    settings = load_settings()
    token_created = ensure_embedded_token(settings) if settings.embedded_hsm else False
    service = KeyService.from_settings(settings)
    service.hsm.check()
    policy_key_created = service.hsm.ensure_policy_key()
    before = migrate(service.engine)
    keys = service.list_root_keys()
    created_key = None
    if not any(k.pool == settings.default_pool and k.state == "enabled" for k in keys):
        created_key = service.create_root_key("aes-256", settings.default_pool)
    fleet, fleet_created = service.ensure_fleet_key(settings.default_pool)
    failing = _unsealed(service)
    report = {
        "home": str(settings.home),
        "hsm": "embedded SoftHSM2" if settings.embedded_hsm else settings.pkcs11_module,
        "token_label": settings.pkcs11_token_label,
        "token_created": token_created,
        "database": service.engine.url.render_as_string(hide_password=True),
        "database_migrated_from": before,
        "root_key_created": asdict(created_key) if created_key else None,
        "fleet_key": {"pool": fleet.pool, "signing_key_id": fleet.signing_key_id, "created": fleet_created},
        "policy_key_created": policy_key_created,
        "policy_rows_failing": failing,
    }
    if as_json:
        print_json(report)
        return
    console.print(f"KMSQ_HOME      {report['home']}")
    console.print(
        f"HSM            {report['hsm']}, token {settings.pkcs11_token_label!r}"
        + (" (created)" if token_created else " (exists)")
    )
    console.print(f"database       {report['database']}" + (" (created)" if before is None else " (migrated)"))
    if created_key:
        console.print(f"root key       {created_key.id} {created_key.type} pool={created_key.pool} (created)")
    else:
        console.print("root key       a root key already exists in the default pool")
    console.print(f"fleet key      {fleet.signing_key_id} pool={fleet.pool}" + (" (created)" if fleet_created else ""))
    console.print(
        "policy key     " + ("created" if policy_key_created else "exists")
        + (f"; {len(failing)} rows are not sealed: review them, then run `kmsq policy seal`" if failing else "")
    )  # fmt: skip


def _unsealed(service: Any) -> list[str]:
    """Rows that workers would refuse (e.g. from before policy MACs): listed, never sealed automatically."""
    from worker import policy
    from worker.runtime import transaction

    with transaction(service.sessions) as db:
        return [s.row for s in policy.review(service.hsm, db) if not s.verifies]


@main.group("root-key")
def root_key() -> None:
    """Manage root keys."""


def _print_root_keys(keys: list[Any], as_json: bool) -> None:
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
@click.option("--type", "key_type", type=click.Choice(ROOT_KEY_TYPE_NAMES), default="aes-256", show_default=True)
@click.option("--pool", default=None, help="HSM pool (default: the configured default pool).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_create(key_type: str, pool: str | None, as_json: bool) -> None:
    """Create a root key in the HSM."""
    service = _service()
    key = service.create_root_key(key_type, pool)
    service.ensure_fleet_key(key.pool)  # every pool with a root key can serve requests
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
    key = _service().rotate_root_key(root_key_id)
    if as_json:
        print_json(asdict(key))
    else:
        console.print(f"root key {key.id} is now at version {key.version}")


@root_key.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def root_key_list(as_json: bool) -> None:
    """List root keys."""
    _print_root_keys(_service().list_root_keys(), as_json)


@main.group("caller")
def caller() -> None:
    """Caller identities (keygen) and the caller registry (add, list, disable, enable)."""


caller.add_command(caller_cli.caller_keygen)
caller.add_command(operator_cli.caller_add)
caller.add_command(operator_cli.caller_list)
caller.add_command(operator_cli.caller_disable)
caller.add_command(operator_cli.caller_enable)
main.add_command(operator_cli.worker)
main.add_command(operator_cli.broker_group)
main.add_command(operator_cli.fleet_key)
main.add_command(operator_cli.policy_group)
main.add_command(operator_cli.bench)
main.add_command(caller_cli.generate_data_key)
main.add_command(caller_cli.decrypt_data_key)
main.add_command(caller_cli.put_key)
main.add_command(caller_cli.get_key)
main.add_command(caller_cli.provision)
main.add_command(caller_cli.gateway)
main.add_command(legacy_cli.import_legacy)
main.add_command(legacy_cli.legacy_root_key)
main.add_command(demo)
main.add_command(chaos)
