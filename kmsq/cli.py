"""The ``kmsq`` command line (operator commands for now)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from kmsq.output import console, fingerprint, one_line_errors, print_json, print_table

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
    """Create the embedded token (if no HSM is configured), migrate the database, create a default root key.

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
    before = migrate(service.engine)
    keys = service.list_root_keys()
    created_key = None
    if not any(k.pool == settings.default_pool and k.state == "enabled" for k in keys):
        created_key = service.create_root_key("aes-256", settings.default_pool)
    report = {
        "home": str(settings.home),
        "hsm": "embedded SoftHSM2" if settings.embedded_hsm else settings.pkcs11_module,
        "token_label": settings.pkcs11_token_label,
        "token_created": token_created,
        "database": service.engine.url.render_as_string(hide_password=True),
        "database_migrated_from": before,
        "root_key_created": asdict(created_key) if created_key else None,
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
    key = _service().create_root_key(key_type, pool)
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


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def demo(as_json: bool) -> None:
    """Run the four key-provider operations once through the service; secrets are shown only as
    lengths and fingerprints."""
    import secrets

    from worker.errors import Conflict, NotFound

    service = _service()
    steps: list[dict[str, Any]] = []
    data_key = service.generate_data_key()
    steps.append(
        {
            "op": "generateDataKey",
            "encryptedKey_length": len(data_key.encrypted_key),
            "plaintextKey": fingerprint(data_key.plaintext_key or ""),
        }
    )
    again = service.decrypt_data_key(data_key.encrypted_key)
    steps.append(
        {"op": "decryptDataKey", "plaintextKey": fingerprint(again), "matches": again == data_key.plaintext_key}
    )
    pub = "xpub-demo-" + secrets.token_hex(8)
    prv = "xprv-demo-" + secrets.token_urlsafe(64)
    stored = service.store_private_key(pub, prv, "btc", "user", "independent")
    steps.append({"op": "POST /key", "pub": pub, "root_key": stored.root_key_id, "prv": fingerprint(prv)})
    record = service.get_private_key(pub, "user")
    steps.append({"op": "GET /key", "pub": record.pub, "prv": fingerprint(record.prv), "matches": record.prv == prv})
    try:
        service.store_private_key(pub, prv, "btc", "user", "independent")
        steps.append({"op": "POST /key again", "result": "stored twice (BUG)"})
    except Conflict as e:
        steps.append({"op": "POST /key again", "result": f"conflict: {e.message}"})
    try:
        service.get_private_key(pub, "backup")
        steps.append({"op": "GET /key?source=backup", "result": "found (BUG)"})
    except NotFound as e:
        steps.append({"op": "GET /key?source=backup", "result": f"not_found: {e.message}"})
    if as_json:
        print_json(steps)
        return
    for step in steps:
        details = ", ".join(f"{k}={v}" for k, v in step.items() if k != "op")
        console.print(f"[bold]{step['op']:<24}[/bold] {details}", highlight=False)
    ok = steps[1]["matches"] and steps[3]["matches"] and "conflict" in steps[4]["result"]
    if not ok:
        raise SystemExit(1)
