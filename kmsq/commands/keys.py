"""The caller's key operations through the queue: ``kmsq generate-data-key``, ``decrypt-data-key``,
``rewrap-data-key``, ``put-key``, ``get-key``, ``generate-key`` and ``sign``. They print JSON with the
key-provider API's field names and need only the caller install (no HSM or database code).

Each command is one operation of ``schemas.operations``: its options and arguments are that operation's request
fields (their names, choices, flags and whether they are required come from the request model), so a field added
to an operation is a new option here; :data:`COMMANDS` says only what differs from the plain mapping (a field
given as an argument, an option's old name, a secret read from a file or standard input).
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from pydantic.fields import FieldInfo

from kmsq.commands.common import caller_options, open_client
from kmsq.output import one_line_errors, print_json
from schemas.limits import MAX_SIGNABLE_PAYLOAD_CHARS
from schemas.operations import OPERATIONS

_NOT_ASKED = frozenset({"op"})


@dataclass(frozen=True)
class CallerCommand:
    """A command for one operation, and how its request fields are asked for."""

    name: str
    op: str
    help: str
    arguments: tuple[str, ...] = ()  # fields taken as positional arguments, in this order
    renamed: Mapping[str, str] = field(default_factory=dict)  # field -> its option, where not --field-name
    defaults: Mapping[str, Any] = field(default_factory=dict)  # fields made optional, with this default
    from_file: Mapping[str, str] = field(default_factory=dict)  # secret field -> the option naming its file
    from_stdin: tuple[str, ...] = ()  # arguments that read standard input when given as "-"
    switch: tuple[str, str, str] | None = None  # (flag, its help, the operation it selects instead)
    pool_option: bool = False  # a --pool option (an operation whose pool no field picks)
    help_of: Mapping[str, str] = field(default_factory=dict)


COMMANDS = (
    CallerCommand(
        "generate-data-key", "generate_data_key", "Generate a data key: prints {plaintextKey, encryptedKey}.",
        renamed={"root_key_id": "--root-key"},
        switch=("--without-plaintext", "Return only the encryptedKey.", "generate_data_key_without_plaintext"),
        help_of={"root_key_id": "Root key id (default: the pool's default root key)."},
    ),
    CallerCommand("decrypt-data-key", "decrypt_data_key", "Decrypt an encryptedKey: prints {plaintextKey}.",
                  arguments=("encrypted_key",)),
    CallerCommand(
        "rewrap-data-key", "rewrap_data_key",
        "Wrap an encryptedKey again under its root key's current version: prints {encryptedKey}. The plaintext stays "
        "in the HSM; needs the rewrap_data_key permission, not decrypt.",
        arguments=("encrypted_key",),
    ),
    CallerCommand(
        "put-key", "put_key",
        "Store a private key (read from a file, sealed before it leaves): prints {pub, coin, source, type}.",
        renamed={"root_key_id": "--root-key"}, from_file={"prv": "--prv-file"},
        help_of={"root_key_id": "Root key id (default: the pool's default root key)."},
    ),
    CallerCommand("get-key", "get_key", "Read a stored private key: prints {prv, pub, coin, source, type}.",
                  arguments=("pub",), pool_option=True),
    CallerCommand(
        "generate-key", "generate_signing_key",
        "Generate a signing key kept inside kmsq (never exported): prints {pub (its xpub), coin, source, type}.",
        renamed={"root_key_id": "--root-key"}, defaults={"type": "independent"},
        help_of={"coin": "The coin (UTXO or ETH-like, as BitGo names them: btc, tbtc, hteth...).",
                 "root_key_id": "Root key id (default: the pool's default root key).",
                 "in_hsm": "ETH-like coins: keep a secp256k1 key in the token (CKM_ECDSA)."},
    ),
    CallerCommand(
        "sign", "sign",
        "Sign PAYLOAD with a generated key: 0x and a 32-byte hash for ETH-like coins, the hex of a wallet PSBT for "
        "UTXO coins (- reads it from standard input: a PSBT may not fit on a command line). Prints {signature}.",
        arguments=("pub", "payload"), from_stdin=("payload",), defaults={"algorithm": "ecdsa"}, pool_option=True,
    ),
    CallerCommand(
        "sign-operation", "sign_operation",
        "Sign a BitGo multisig wallet operation (sendMultiSig) with a generated ETH-like key: kmsq computes its hash "
        "from the fields, so its signing rules judge them. Prints {operation_hash, signature}.",
        arguments=("pub",), pool_option=True,
        help_of={"to": "Destination address (0x and 40 hex digits).", "value": "Value in wei (decimal).",
                 "data": "Call data (0x hex; default none).", "expire_time": "Expire time (Unix seconds).",
                 "sequence_id": "The wallet contract's sequence id."},
    ),
)  # fmt: skip


def _choices(annotation: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` field (inside ``Annotated`` or ``| None``), or None."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _choices(inner[0]) if len(inner) == 1 else None
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(value) for value in typing.get_args(annotation))
    return None


def _parameter(spec: CallerCommand, name: str, info: FieldInfo) -> click.Parameter:
    """The click argument or option that asks for request field ``name``."""
    choices = _choices(info.annotation)
    kind: Any = click.Choice(choices) if choices else None
    if name in spec.arguments:
        return click.Argument([name], type=kind)
    required = info.is_required() and name not in spec.defaults
    default = spec.defaults.get(name, None if info.is_required() else info.default)
    text = spec.help_of.get(name)
    if name in spec.from_file:
        option = spec.from_file[name]
        path = click.Path(exists=True, dir_okay=False, path_type=Path)
        return click.Option([option, f"{name}_file"], type=path, required=required, help=text)
    flag = spec.renamed.get(name, "--" + name.replace("_", "-"))
    if info.annotation is bool:
        return click.Option([flag, name], is_flag=True, default=bool(default), help=text)
    if info.annotation is int:
        kind = int
    return click.Option([flag, name], type=kind, required=required, default=default, show_default=default is not None,
                        help=text)  # fmt: skip


def _fields(spec: CallerCommand, given: dict[str, Any]) -> dict[str, Any]:
    """The request fields from the command's parameters: files read, standard input read for ``-``."""
    fields: dict[str, Any] = {}
    for name in OPERATIONS[spec.op].request.model_fields:
        if name in _NOT_ASKED:
            continue
        if name in spec.from_file:
            fields[name] = Path(given.pop(f"{name}_file")).read_text(encoding="utf-8").strip()
            continue
        value = given.pop(name)
        if name in spec.from_stdin and value == "-":
            value = sys.stdin.read(MAX_SIGNABLE_PAYLOAD_CHARS + 2).strip()
        fields[name] = value
    return fields


def _command(spec: CallerCommand) -> click.Command:
    """The click command of ``spec``."""
    model = OPERATIONS[spec.op].request
    params = [_parameter(spec, name, info) for name, info in model.model_fields.items() if name not in _NOT_ASKED]
    if spec.switch is not None:
        params.append(click.Option([spec.switch[0], "switch"], is_flag=True, help=spec.switch[1]))
    if spec.pool_option:
        text = "Pool holding the key (default: the fleet file's default pool)."
        params.append(click.Option(["--pool"], default=None, help=text))

    def run(identity: Path | None, fleet: Path | None, timeout: float, **given: Any) -> None:
        op = spec.switch[2] if spec.switch is not None and given.pop("switch") else spec.op
        pool = given.pop("pool", None)
        fields = _fields(spec, given)
        fields = {k: v for k, v in fields.items() if k in OPERATIONS[op].request.model_fields}
        with open_client(identity, fleet, timeout) as client:
            print_json(client.wait(client.call(op, fields, pool)))

    callback: Callable[..., None] = one_line_errors(caller_options(run))
    command = click.command(spec.name, help=spec.help)(callback)
    command.params[:0] = params  # the operation's fields first, then --identity, --fleet, --timeout
    return command


CALLER_COMMANDS = tuple(_command(spec) for spec in COMMANDS)
