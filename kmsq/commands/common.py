"""What the commands share: the settings, the key service (operator commands on an HSM host) and the caller's
client options (caller commands, which need no HSM or database code).

The worker modules are imported inside the functions: ``kmsq caller keygen`` and the caller commands run
without the worker extra.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from collections.abc import Callable

    from tasks.client import KmsClient
    from worker.config import Settings
    from worker.hsm import Hsm
    from worker.runtime import KeyService


def settings() -> Settings:
    """Returns the settings from the environment (``KMSQ_*``). Raises ConfigError for a bad value."""
    from worker.config import load_settings  # stdlib-only: works without the worker extra

    return load_settings()


def service() -> KeyService:
    """Returns the key service of the configured HSM and database. Raises ConfigError or HsmUnavailable.

    When this host pins an operator set and the command holds operator keys (worker.operators), the rows the
    command seals get their evidence of approval from those keys, or the command says the change needs the
    quorum (docs/DUAL_CONTROL.md)."""
    from worker.operators import local_operators
    from worker.policy import AUTHORIZER
    from worker.runtime import KeyService

    config = settings()
    keys = KeyService.from_settings(config)
    operators = local_operators(config)
    if operators is not None:
        keys.sessions.configure(info={AUTHORIZER: operators})
    return keys


def caller_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--identity``, ``--fleet`` and ``--timeout``."""
    func = click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait.")(func)
    func = click.option("--fleet", type=click.Path(dir_okay=False, path_type=Path), help="Fleet file.")(func)
    return click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), help="NAME.key.json.")(func)


def fleet_file_text(document: dict[str, Any]) -> str:
    """The fleet file's text, as ``kmsq fleet-key export`` writes it."""
    return json.dumps(document, indent=2) + "\n"


def write_fleet_file(path: Path, document: dict[str, Any]) -> bool:
    """Writes the fleet document to ``path`` unless the file holds exactly it already (atomically: a caller
    never reads half a file). Returns True when it wrote. Raises ConfigError when it cannot."""
    from worker.errors import ConfigError

    text = fleet_file_text(document)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {e.strerror or type(e).__name__}") from None
    return True


# How long a caller command waits for the broker to answer before it says what to do: the embedded broker is
# local (its socket is there or it is not running), another broker may be failing over or starting.
EMBEDDED_BROKER_WAIT_SECONDS = 3.0
BROKER_WAIT_SECONDS = 30.0


def check_broker(config: Settings, timeout: float) -> None:
    """Waits up to ``timeout`` (at most EMBEDDED_BROKER_WAIT_SECONDS for the embedded broker, else
    BROKER_WAIT_SECONDS) until the broker accepts a connection. Raises KmsError (``unavailable``) saying what
    to start when it does not, ConfigError for a broker URL kmsq cannot use (load_settings refuses one
    already)."""
    from kombu.exceptions import OperationalError

    from schemas.wire import EMBEDDED_BROKER_SOCKET
    from tasks.app import broker_connection
    from tasks.client import KmsError
    from worker.config import redact_url
    from worker.errors import ConfigError

    limit = EMBEDDED_BROKER_WAIT_SECONDS if config.embedded_broker else BROKER_WAIT_SECONDS
    deadline = time.monotonic() + max(0.0, min(timeout, limit))
    while True:
        try:
            connection = broker_connection(config.effective_broker_url, config.namespace)
        except ValueError as e:
            raise ConfigError(f"KMSQ_BROKER_URL: {e}") from None
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=max(1.0, min(timeout, 5.0)))
            return
        except (OperationalError, OSError) as e:
            error = e
        finally:
            connection.release()
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if config.embedded_broker:
        raise KmsError(
            "unavailable",
            f"the embedded broker is not running (nothing answers on {Path(config.home) / EMBEDDED_BROKER_SOCKET}; "
            "`kmsq demo` stops the one it started): start a worker with `kmsq worker` (same KMSQ_HOME; it starts "
            "the embedded broker first), then run this again",
        )
    raise KmsError(
        "unavailable",
        f"cannot connect to the broker {redact_url(config.effective_broker_url)} ({error}): is that Redis running "
        "and reachable, and is KMSQ_BROKER_URL the broker the workers use?",
    )


def open_client(identity: Path | None, fleet: Path | None, timeout: float, **options: Any) -> KmsClient:
    """Returns a connected KmsClient (broker and namespace from the settings; the identity from ``--identity``
    or ``KMSQ_IDENTITY``; the fleet file from ``--fleet``, ``KMSQ_FLEET`` or ``$KMSQ_HOME/fleet.json``).
    Raises IdentityError when a file is missing, KmsError (``unavailable``) when the broker does not answer;
    each message says what to run."""
    from tasks.client import KmsClient
    from tasks.identity import IdentityError

    identity = identity or (Path(os.environ["KMSQ_IDENTITY"]) if os.environ.get("KMSQ_IDENTITY") else None)
    if identity is None:
        raise IdentityError("no caller identity: pass --identity NAME.key.json or set KMSQ_IDENTITY")
    if not identity.exists():
        raise IdentityError(
            f"no caller identity at {identity}: make one with `kmsq caller keygen NAME` and have the operator "
            "register its NAME.pub.json (`kmsq caller add NAME --public-key NAME.pub.json ...`)"
        )
    config = settings()
    fleet = fleet or Path(os.environ.get("KMSQ_FLEET") or Path(config.home) / "fleet.json")
    if not fleet.exists():
        raise IdentityError(
            f"no fleet file at {fleet}: run `kmsq fleet-key export --out {fleet}` on an HSM host (`kmsq init` "
            "writes $KMSQ_HOME/fleet.json), or pass --fleet FILE or set KMSQ_FLEET"
        )
    check_broker(config, timeout)
    return KmsClient.from_files(
        config.effective_broker_url, identity, fleet, timeout=timeout, namespace=config.namespace, **options
    )


def token_of(svc: KeyService) -> Hsm:
    """The service's PKCS#11 token. Raises ConfigError when it has none (the commands that need the security officer
    or the token's own keys)."""
    from worker.errors import ConfigError
    from worker.hsm import Hsm

    if not isinstance(svc.hsm, Hsm):
        raise ConfigError("this command needs a PKCS#11 token")
    return svc.hsm


def so_pin(pin_file: Path | None) -> str:
    """The token's security officer PIN: from ``pin_file``, the embedded token's, or asked on the terminal."""
    if pin_file is not None:
        return pin_file.read_text().strip()
    config = settings()
    embedded = config.home / "hsm-so.pin"
    if config.embedded_hsm and embedded.exists():
        return embedded.read_text().strip()
    return str(click.prompt("security officer PIN of this token", hide_input=True))
