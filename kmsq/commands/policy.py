"""``kmsq policy check|seal``: the HSM-held MACs over callers, root keys, their versions and pools, and the
token-held anchor of their current state (worker.policy_anchor)."""

from __future__ import annotations

import sys

import click

from kmsq.commands.common import service
from kmsq.output import EXIT_INVALID, console, one_line_errors, print_json


@click.group("policy")
def policy_group() -> None:
    """The HSM-held MACs over the policy rows, and the token's anchor of their state, which workers check."""


def _review(seal: bool, as_json: bool) -> None:
    from worker import policy, policy_anchor
    from worker.storage.db import transaction

    keys = service()
    with transaction(keys.sessions) as db:
        statuses = policy.review(keys.hsm, db, seal_failing=seal)
    with keys.sessions() as db:
        anchor = policy_anchor.status(keys.hsm, db)
    failing = [s.row for s in statuses if not s.verifies]
    anchored = anchor.present and anchor.matches and not anchor.pending
    if as_json:
        print_json({"rows": len(statuses), "failing": failing, "sealed": failing if seal else [],
                    "anchor": {"epoch": anchor.epoch, "present": anchor.present, "matches": anchor.matches,
                               "pending": anchor.pending}})  # fmt: skip
    else:
        for row in failing:
            console.print(f"{'sealed' if seal else 'FAILS '} {row}")
        console.print(f"{len(statuses)} rows, {len(failing)} " + ("sealed" if seal else "failing the check"))
        console.print(f"anchor: {anchor.describe()}")
    if (failing and not seal) or not anchored:
        sys.exit(EXIT_INVALID)


@policy_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def policy_check(as_json: bool) -> None:
    """List the policy rows whose MAC is missing or wrong (workers refuse them) and whether the token anchors
    the rows as they are (workers refuse every row otherwise); exit 7 if a row fails or the anchor does not match."""
    _review(seal=False, as_json=as_json)


@policy_group.command("seal")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def policy_seal(as_json: bool) -> None:
    """Approve every policy row as it stands now: seal the ones that fail the check, create each pool's missing
    row, and anchor the result in the token.

    Run it after upgrading to a kmsq with policy MACs or the policy anchor, and after `kmsq policy check` found
    rows changed outside the operator commands, once you have reviewed `kmsq caller list`, `kmsq root-key list`
    and `kmsq pool list`: whatever the database holds then becomes trusted."""
    _review(seal=True, as_json=as_json)
