"""``kmsq init``: the embedded token, the database, a default root key, the default pool's fleet keys, and the
fleet file ``$KMSQ_HOME/fleet.json`` that the caller commands read by default."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from kmsq.commands.common import write_fleet_file
from kmsq.output import console, one_line_errors, print_json

if TYPE_CHECKING:
    from worker.runtime import KeyService


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def init(as_json: bool) -> None:
    """Create the embedded token (if no HSM is configured), migrate the database, create a default root key
    and the default pool's fleet keys, and write the fleet file $KMSQ_HOME/fleet.json (every pool, as
    `kmsq fleet-key export` prints it).

    Safe to run again: it creates only what is missing, and rewrites the fleet file only when it changed.
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
    anchor = _anchor(service)
    fleet_path = settings.home / "fleet.json"
    fleet_written = write_fleet_file(fleet_path, service.fleet_document())
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
        "policy_anchor": anchor,
        "fleet_file": {"path": str(fleet_path), "written": fleet_written},
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
    console.print(f"policy anchor  {anchor}")
    console.print(f"fleet file     {fleet_path}" + (" (written)" if fleet_written else " (up to date)"))


def _unsealed(service: KeyService) -> list[str]:
    """Rows that workers would refuse (e.g. from before policy MACs): listed, never sealed automatically."""
    from worker import policy
    from worker.storage.db import transaction

    with transaction(service.sessions) as db:
        return [s.row for s in policy.review(service.hsm, db) if not s.verifies]


def _anchor(service: KeyService) -> str:
    """Whether the token anchors the policy rows (worker.policy_anchor); an upgraded deployment is told to run
    `kmsq policy seal`, never anchored automatically."""
    from worker import policy_anchor

    with service.sessions() as db:
        return policy_anchor.status(service.hsm, db).describe()
