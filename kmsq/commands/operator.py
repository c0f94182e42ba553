"""``kmsq operator keygen``: an operator's own identity, for approving changes (dual control, docs/DUAL_CONTROL.md).

It needs no HSM or database code: operators run it on their own machines, never on the HSM hosts.
"""

from __future__ import annotations

from pathlib import Path

import click

from kmsq.output import console, one_line_errors, print_json


@click.group("operator")
def operator_group() -> None:
    """Operator identities (keygen)."""


@operator_group.command("keygen")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def operator_keygen(name: str, directory: Path, as_json: bool) -> None:
    """Write a new operator identity: NAME.operator.json (0600, private: keep it off the HSM hosts) and
    NAME.operator.pub.json (for the operator set)."""
    from schemas.quorum import OperatorIdentity

    identity = OperatorIdentity.generate(name)
    private_path, public_path = identity.write(directory)
    key_id = identity.public.key_id
    if as_json:
        print_json({"operator": name, "key_id": key_id, "identity": str(private_path), "public": str(public_path)})
        return
    console.print(f"wrote {private_path} (private, 0600: keep it off the HSM hosts) and {public_path}")
    console.print(f"key id {key_id}")
