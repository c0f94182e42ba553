"""``kmsq operator keygen``: an operator's own identity, for approving changes (dual control, docs/DUAL_CONTROL.md).

It needs no HSM or database code: operators run it on their own machines, never on the HSM hosts.
"""

from __future__ import annotations

from pathlib import Path

import click

from kmsq.output import console, one_line_errors, print_json


@click.group("operator")
def operator_group() -> None:
    """Operator identities (keygen) and approvals made off the HSM hosts (sign)."""


@operator_group.command("keygen")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True)
@click.option("--passphrase-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Encrypt the private key under this file's passphrase.")  # fmt: skip
@click.option("--no-passphrase", is_flag=True, help="Leave the private key unencrypted (its file is all it takes).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def operator_keygen(name: str, directory: Path, passphrase_file: Path | None, no_passphrase: bool,
                    as_json: bool) -> None:  # fmt: skip
    """Write a new operator identity: NAME.operator.json (0600, private: keep it off the HSM hosts) and
    NAME.operator.pub.json (for the operator set). The private key is encrypted under a passphrase (asked twice,
    or --passphrase-file) unless --no-passphrase; the commands that sign with it ask for it (or read
    KMSQ_OPERATOR_PASSPHRASE_FILE)."""
    from schemas.quorum import OperatorIdentity

    identity = OperatorIdentity.generate(name)
    if no_passphrase:
        passphrase = None
    elif passphrase_file is not None:
        passphrase = passphrase_file.read_text(encoding="utf-8").strip().encode()
    else:
        passphrase = str(click.prompt("passphrase", hide_input=True, confirmation_prompt=True)).encode()
    private_path, public_path = identity.write(directory, passphrase or None)
    key_id = identity.public.key_id
    if as_json:
        print_json({"operator": name, "key_id": key_id, "identity": str(private_path), "public": str(public_path),
                    "encrypted": bool(passphrase)})  # fmt: skip
        return
    console.print(f"wrote {private_path} (private, 0600: keep it off the HSM hosts) and {public_path}")
    console.print(f"key id {key_id}")


@operator_group.command("sign")
@click.argument("document", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--operator-key",
    "operator_key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Your NAME.operator.json.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the approval here (default: stdout).",
)
@one_line_errors
def operator_sign(document: Path, operator_key: Path, out: Path | None) -> None:
    """Approve a change document (from `kmsq proposals show ID --document FILE`) on your own machine: prints the
    approval for `kmsq approve ID --approval FILE`. Read the document first: you sign exactly it."""
    import json

    from schemas.quorum import OperatorIdentity, QuorumError, approve, asking_passphrase, change_digest

    identity = OperatorIdentity.load(operator_key, asking_passphrase)
    try:
        data = json.loads(document.read_text(encoding="utf-8"))
    except ValueError:
        raise QuorumError(f"{document} is not JSON") from None
    if not isinstance(data, dict) or data.get("kind") != "kmsq-change":
        raise QuorumError(f"{document} is not a kmsq change document")
    text = json.dumps(approve(identity, change_digest(data)).document(), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}: {identity.name}'s approval of {data.get('action')} {data.get('id')}")
