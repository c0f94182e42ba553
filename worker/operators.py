"""Where an HSM host finds the operators: the pinned genesis operator set (``$KMSQ_HOME/operator-set.json`` or
``KMSQ_OPERATOR_SET``) and, for operator commands, the operators' keys they sign with (``KMSQ_OPERATOR_KEY``, or
the embedded default's 1-of-1 key in ``$KMSQ_HOME/operators/``). See docs/DUAL_CONTROL.md."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from schemas.quorum import OperatorIdentity, OperatorSet, QuorumError, asking_passphrase
from worker.approvals import LocalOperators
from worker.config import Settings
from worker.errors import ConfigError

PINNED_KIND = "kmsq-operator-set"
DEVELOPER = "admin"  # the embedded default's only operator


def read_pinned(path: Path) -> OperatorSet:
    """The genesis operator set pinned in ``path``. Raises ConfigError when it is missing or malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no pinned operator set at {path}: run `kmsq init` (a 1-of-1 set for one developer) or "
                          "install the deployment's operator-set.json (docs/DUAL_CONTROL.md)") from None  # fmt: skip
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the pinned operator set {path}: {type(e).__name__}") from None
    if not isinstance(data, dict) or data.get("kind") != PINNED_KIND or data.get("v") != 1:
        raise ConfigError(f"{path} is not a {PINNED_KIND} file")
    try:
        return OperatorSet.from_document(data["operator_set"])
    except (KeyError, QuorumError) as e:
        raise ConfigError(f"{path}: {e}") from None


def write_pinned(path: Path, operators: OperatorSet) -> None:
    """Writes ``operators`` as the pinned genesis set to ``path`` (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"kind": PINNED_KIND, "v": 1, "digest": operators.digest, "operator_set": operators.document()}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def ensure_developer_set(settings: Settings) -> tuple[OperatorSet, bool]:
    """The pinned set, creating the embedded default's when there is none: one operator, ``admin``, whose key
    ``kmsq init`` writes to ``$KMSQ_HOME/operators/`` (a 1-of-1 quorum, for a single developer). Returns the set
    and whether it was created."""
    path = settings.operator_set_file
    if path.exists():
        return read_pinned(path), False
    directory = settings.home / "operators"
    private = directory / f"{DEVELOPER}.operator.json"
    identity = OperatorIdentity.load(private) if private.exists() else None
    if identity is None:
        identity = OperatorIdentity.generate(DEVELOPER)
        identity.write(directory)
    operators = OperatorSet((identity.public,), 1)
    write_pinned(path, operators)
    return operators, True


def local_operators(
    settings: Settings, passphrase: Callable[[Path], bytes] = asking_passphrase
) -> LocalOperators | None:
    """The operator keys this command may sign with, for the pinned set (an encrypted key file's passphrase from
    ``passphrase``); None when this host pins no set or holds no key. Raises ConfigError for a key file that
    cannot be read or opened."""
    if not settings.operator_set_file.exists():
        return None
    genesis = read_pinned(settings.operator_set_file)
    identities = []
    for path in settings.operator_key_files:
        try:
            identities.append(OperatorIdentity.load(path, passphrase))
        except QuorumError as e:
            raise ConfigError(str(e)) from None
    return LocalOperators(identities, genesis) if identities else None


def authorize_process(settings: Settings) -> LocalOperators | None:
    """Makes the operator keys this host gives (:func:`local_operators`) approve every row this process seals (an
    operator tool: kmsq bench's and kmsq demo's set-up). Returns them, or None when there are none."""
    from worker.policy import set_process_authorizer

    local = local_operators(settings)
    if local is not None:
        set_process_authorizer(local)
    return local
