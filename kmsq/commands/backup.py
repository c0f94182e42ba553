"""``kmsq backup custodian-key | init | trust | create | restore``: backups of the token's keys, held M-of-N by
custodians (worker.backup; docs/OPERATIONS.md, "Backups and the restore drill").

``custodian-key`` is the custodian's (it needs no HSM or database code); the others run on an HSM host.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from kmsq.commands.common import service, settings, so_pin, token_of
from kmsq.commands.quorum import GATE_OPTIONS, backup_arguments, close_gate, operation_gate
from kmsq.output import console, one_line_errors, print_json

if TYPE_CHECKING:
    from schemas.custodian import CustodianKey
    from worker.backup import BackupKey

_PATH = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("backup")
def backup_group() -> None:
    """Backups of the token's keys, restored only by M of N custodians."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_new(path: Path, data: bytes) -> None:
    """Writes a new file, 0600 (never over an existing one). Raises ConfigError when it exists."""
    from worker.errors import ConfigError

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; kmsq does not write over it") from None
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _config_errors(error: ValueError) -> Exception:
    from worker.errors import ConfigError

    return ConfigError(str(error))


@backup_group.command("custodian-key")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True)
@click.option("--passphrase-file", type=_PATH, help="Encrypt the private key under this file's passphrase.")
@click.option("--no-passphrase", is_flag=True, help="Leave the private key unencrypted (its file is all it takes).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def custodian_key(name: str, directory: Path, passphrase_file: Path | None, no_passphrase: bool, as_json: bool) -> None:
    """As a custodian, on a machine of your own: write NAME.custodian-key.json (0600: keep it) and
    NAME.custodian.json (give it to the operator). The private key is encrypted under a passphrase (asked twice,
    or --passphrase-file) unless --no-passphrase."""
    from schemas.custodian import CustodianKeyError, new_custodian_key

    if no_passphrase:
        passphrase = None
    elif passphrase_file is not None:
        passphrase = passphrase_file.read_text().strip().encode()
    else:
        passphrase = str(click.prompt("passphrase", hide_input=True, confirmation_prompt=True)).encode()
    try:
        private, public = new_custodian_key(name, passphrase)
    except CustodianKeyError as e:
        raise _config_errors(e) from None
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.custodian-key.json", directory / f"{name}.custodian.json"
    _write_new(private_path, private.encode())
    public_path.write_text(public)
    if as_json:
        print_json({"custodian": name, "private": str(private_path), "public": str(public_path),
                    "encrypted": passphrase is not None})  # fmt: skip
    else:
        console.print(f"wrote {private_path} (private, 0600: keep it, offline) and {public_path} (give this one to "
                      "the operator)")  # fmt: skip


def _load_backup_key(path: Path) -> BackupKey:
    import json

    from worker.backup import BackupKey, BackupRefused

    try:
        return BackupKey.from_document(json.loads(path.read_text()))
    except ValueError:
        raise BackupRefused(f"{path} is not a backup key file (JSON)") from None


@backup_group.command("init")
@click.option("--custodian", "custodians", type=_PATH, multiple=True, required=True,
              help="A custodian's NAME.custodian.json (repeat, once per custodian).")  # fmt: skip
@click.option("--threshold", type=int, required=True, help="How many custodians a restore needs (M of N).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The backup key file.")
@click.option("--so-pin-file", type=_PATH, help="This token's security officer PIN (default: the embedded "
              "token's, else asked).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def backup_init(custodians: tuple[Path, ...], threshold: int, out: Path, so_pin_file: Path | None,
                as_json: bool) -> None:  # fmt: skip
    """Make a backup key held by the custodians (THRESHOLD of them restore) and, as this token's security officer,
    trust it: this token then wraps its keys for it (kmsq backup create). Writes the backup key file, which opens
    nothing without the custodians; the custodians note the fingerprint it shows."""
    import json

    from schemas.custodian import Custodian, CustodianKeyError
    from worker import backup, hsm_custody

    try:
        found = [Custodian.from_document(json.loads(path.read_text())) for path in custodians]
    except (CustodianKeyError, ValueError) as e:
        raise _config_errors(e) from None
    token = token_of(service())
    key = backup.new_backup_key(token, found, threshold, _now())
    hsm_custody.trust_transport_key(token, backup.target_name(key.key_id), key.public_der(), so_pin(so_pin_file),
                                    backup=True)  # fmt: skip
    _write_new(out, (json.dumps(key.document(), indent=2) + "\n").encode())
    if as_json:
        print_json({"id": key.key_id, "fingerprint": key.fingerprint, "threshold": threshold,
                    "custodians": [c.name for c in found], "file": str(out)})  # fmt: skip
        return
    console.print(f"backup key   {key.key_id}, {threshold} of {len(found)} custodians: "
                  + ", ".join(c.name for c in found))  # fmt: skip
    console.print(f"fingerprint  {key.fingerprint}")
    console.print(f"wrote {out}; trusted by this token. Custodians: note the fingerprint, a restore asks for it. "
                  "Other tokens: kmsq backup trust on their hosts.")  # fmt: skip


@backup_group.command("trust")
@click.argument("key_file", type=_PATH)
@click.option("--fingerprint", required=True, help="The fingerprint kmsq backup init showed.")
@click.option("--so-pin-file", type=_PATH, help="This token's security officer PIN.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def backup_trust(key_file: Path, fingerprint: str, so_pin_file: Path | None, as_json: bool) -> None:
    """As this token's security officer, trust the backup key in KEY_FILE (made by another token of this
    deployment), so that backups can be made here too. Nothing is trusted when the fingerprint differs."""
    from worker import backup, hsm_custody

    key = _load_backup_key(key_file)
    token = token_of(service())
    backup.check_for_this_deployment(token, key, fingerprint)
    made = hsm_custody.trust_transport_key(token, backup.target_name(key.key_id), key.public_der(),
                                           so_pin(so_pin_file), backup=True)  # fmt: skip
    if as_json:
        print_json({"id": key.key_id, "trusted": True, "made": made})
    else:
        console.print(f"backup key {key.key_id} trusted" + ("" if made else " (already)"))


@backup_group.command("create")
@click.option("--key", "key_file", type=_PATH, required=True, help="The backup key file (kmsq backup init).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The backup file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def backup_create(key_file: Path, out: Path, as_json: bool) -> None:
    """Write a backup of every key of this token, wrapped (inside the token) for the backup key, with the policy
    anchor; the file is MACed under the policy key. It needs no custodian: run it after every change of keys."""
    import hashlib

    from worker import backup, policy_anchor, replication
    from worker.storage.db import transaction

    key = _load_backup_key(key_file)
    svc = service()
    token = token_of(svc)
    with transaction(svc.sessions) as db:
        scope = policy_anchor.deployment_id(db)
    document, made = backup.create(token, key, scope=scope, anchor=replication.anchor_value(token, scope),
                                   created_at=_now())  # fmt: skip
    data = backup.file_text(document)
    made.digest = hashlib.sha256(data).hexdigest()
    _write_new(out, data)
    if as_json:
        print_json({**asdict(made), "file": str(out)})
        return
    console.print(f"wrote {out}: {made.keys} keys for backup key {key.key_id}, sha256 {made.digest}")
    for label in made.left_out:
        console.print(f"[yellow]not in the backup[/yellow] {label}: made before key custody, it cannot leave its token")


def _custodian_keys(paths: tuple[Path, ...]) -> list[CustodianKey]:
    from schemas.custodian import CustodianKeyError, key_is_encrypted, load_custodian_key

    keys = []
    for path in paths:
        text = path.read_text()
        try:
            passphrase = (str(click.prompt(f"passphrase of {path.name}", hide_input=True)).encode()
                          if key_is_encrypted(text) else None)  # fmt: skip
            keys.append(load_custodian_key(text, passphrase))
        except CustodianKeyError as e:
            raise _config_errors(e) from None
    return keys


@backup_group.command("restore")
@click.argument("backup_file", type=_PATH)
@click.option("--fingerprint", required=True, help="The backup key's fingerprint, as kmsq backup init showed it.")
@click.option("--custodian-key", "custodian_keys", type=_PATH, multiple=True, required=True,
              help="A custodian's NAME.custodian-key.json (repeat: at least the backup's threshold).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@GATE_OPTIONS[0]
@GATE_OPTIONS[1]
@one_line_errors
def backup_restore(backup_file: Path, fingerprint: str, custodian_keys: tuple[Path, ...], as_json: bool,
                   proposal_id: str | None, operator_key: Path | None) -> None:  # fmt: skip
    """Restore BACKUP_FILE into this host's token (a new one: a token holding other keys under the backup's labels
    is refused). Needs the keys of at least M custodians, and a quorum of operators (an approved `kmsq propose
    backup restore` of this very file, or this command's operator keys); nothing is written to the token unless
    every check passes. Exits 7 when the backup or a share does not verify or too few custodians opened it, 9
    without the operators' approval."""
    from worker import backup
    from worker.softhsm import ensure_embedded_token

    config = settings()
    if config.embedded_hsm:
        ensure_embedded_token(config)
    keys = _custodian_keys(custodian_keys)
    svc, proposal = operation_gate("backup.restore", backup_arguments(backup_file, fingerprint), proposal_id,
                                   operator_key)  # fmt: skip
    done = backup.restore(token_of(svc), backup_file.read_bytes(), fingerprint, keys)
    close_gate(svc, proposal, f"{len(done.restored)} keys restored from backup key {done.key_id}")
    if as_json:
        print_json(asdict(done))
        return
    console.print(f"restored {len(done.restored)} keys from backup key {done.key_id} (made {done.created_at} on "
                  f"token {done.source_token})" + (f"; {len(done.already_here)} were here already"
                                                   if done.already_here else ""))  # fmt: skip
    console.print("the policy anchor of the backup taken" if done.anchor_adopted else "the policy anchor: kept this "
                  "token's (as new or newer)")  # fmt: skip
    console.print("next: kmsq policy check (a policy change after the backup needs kmsq policy seal), kmsq hsm enroll "
                  "to replicate to a new token, then start the workers")  # fmt: skip
