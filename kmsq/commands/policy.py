"""``kmsq policy check|seal``: the HSM-held MACs over callers and root keys."""

from __future__ import annotations

import sys

import click

from kmsq.commands.common import service
from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json


@click.group("policy")
def policy_group() -> None:
    """The HSM-held MACs over callers and root keys, which workers check on every load."""


def _review(seal: bool, as_json: bool) -> None:
    from worker import policy
    from worker.storage.db import transaction

    keys = service()
    with transaction(keys.sessions) as db:
        statuses = policy.review(keys.hsm, db, seal_failing=seal)
    failing = [s.row for s in statuses if not s.verifies]
    if as_json:
        print_json({"rows": len(statuses), "failing": failing, "sealed": failing if seal else []})
    else:
        for row in failing:
            console.print(f"{'sealed' if seal else 'FAILS '} {row}")
        console.print(f"{len(statuses)} rows, {len(failing)} " + ("sealed" if seal else "failing the check"))
    if failing and not seal:
        sys.exit(EXIT_INVALID)


@policy_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def policy_check(as_json: bool) -> None:
    """List the caller and root key rows whose MAC is missing or wrong (workers refuse them); exit 7 if any."""
    _review(seal=False, as_json=as_json)


@policy_group.command("seal")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def policy_seal(as_json: bool) -> None:
    """Approve every caller and root key row as it stands now: seal the ones that fail the check.

    Run it once after upgrading to a kmsq with policy MACs, after reviewing `kmsq caller list` and
    `kmsq root-key list`: whatever the database holds then becomes trusted."""
    _review(seal=True, as_json=as_json)
