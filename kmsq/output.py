"""Output helpers: human-readable tables by default, JSON for scripts, one-line errors on stderr."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import Any, NoReturn, ParamSpec, TypeVar

from rich.console import Console
from rich.table import Table

P = ParamSpec("P")
R = TypeVar("R")

# Not a terminal (a pipe, a log file): do not fold lines at 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)

# Exit codes by error class; documented in docs/COMMANDS.md.
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6
EXIT_INVALID = 7
EXIT_UNAUTHENTICATED = 8
EXIT_FORBIDDEN = 9
EXIT_EXPIRED = 10
EXIT_REPLAYED = 11
EXIT_NOT_EXPORTABLE = 12
EXIT_POLICY_DENIED = 13
# A queue reply's error code -> exit code (the caller commands).
CODE_EXIT = {
    "unavailable": EXIT_UNAVAILABLE,
    "not_found": EXIT_NOT_FOUND,
    "conflict": EXIT_CONFLICT,
    "invalid": EXIT_INVALID,
    "unauthenticated": EXIT_UNAUTHENTICATED,
    "forbidden": EXIT_FORBIDDEN,
    "expired": EXIT_EXPIRED,
    "replayed": EXIT_REPLAYED,
    "not_exportable": EXIT_NOT_EXPORTABLE,
    "policy_denied": EXIT_POLICY_DENIED,
    "internal": EXIT_INTERNAL,
}


# What a caller can do when no reply came (docs/COMMANDS.md, Callers; an unauthenticated request gets none).
NO_REPLY_HINT = (
    "is a worker running for the request's pool? start one on an HSM host with `kmsq worker` (`--pool NAME` for "
    "a pool other than the default; `kmsq status` lists the workers that answer); a request the worker cannot "
    "authenticate (an unregistered or disabled caller, a key other than the registered one) gets no reply either "
    "(`kmsq caller list`); the request may still complete"
)


def fingerprint(secret: str) -> str:
    """Returns a short, non-reversible tag of a high-entropy secret, for showing that two secrets match."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def print_json(data: Any) -> None:
    """Prints ``data`` as one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, default=_default, indent=2) + "\n")


def print_result(result: Any, as_json: bool, text: str) -> None:
    """Prints a command's result: the dataclass ``result`` as JSON with ``--json``, else the line ``text``."""
    if as_json:
        print_json(result)
    else:
        console.print(text)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints a table with rich."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def _exit_code(error: Exception) -> int:
    from worker.errors import (
        ConfigError,
        Conflict,
        Forbidden,
        IntegrityError,
        InvalidRequest,
        NotFound,
        TransientError,
    )

    for cls, code in (
        (ConfigError, EXIT_CONFIG),
        (TransientError, EXIT_UNAVAILABLE),
        (NotFound, EXIT_NOT_FOUND),
        (Conflict, EXIT_CONFLICT),
        (InvalidRequest, EXIT_INVALID),
        (IntegrityError, EXIT_INVALID),
        (Forbidden, EXIT_FORBIDDEN),
    ):
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


def _describe(error: Exception) -> tuple[str, int]:
    """The one-line message and exit code for an error escaping a command."""
    # Imported here: only a failing command pays for them.
    from schemas.quorum import QuorumError
    from tasks.client import KmsError, KmsTimeout
    from tasks.identity import IdentityError
    from worker.errors import ServiceError

    if isinstance(error, ServiceError):
        return error.message, _exit_code(error)
    if isinstance(error, KmsTimeout):  # the broker took the request; nothing answered it
        return f"{error.code}: {error.message} (request {error.request_id}): {NO_REPLY_HINT}", EXIT_UNAVAILABLE
    if isinstance(error, KmsError):  # a reply's error
        return f"{error.code}: {error.message}", CODE_EXIT.get(error.code, EXIT_INTERNAL)
    if isinstance(error, IdentityError | QuorumError | FileNotFoundError):
        return str(error), EXIT_CONFIG
    return f"internal error ({type(error).__name__}); set KMSQ_DEBUG=1 for details", EXIT_INTERNAL


def fail(message: str, code: int) -> NoReturn:
    """Prints ``kmsq: error: message`` on stderr and exits with ``code``."""
    sys.stderr.write(f"kmsq: error: {' '.join(message.split())}\n")
    sys.exit(code)


def one_line_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turns kmsq errors into one line on stderr and an exit code per class; no traceback unless
    ``KMSQ_DEBUG`` is set. Click's own errors (a usage error: exit 2) are left to click."""
    import click

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:
            if os.environ.get("KMSQ_DEBUG"):
                raise
            message, code = _describe(e)
            fail(message, code)
        raise AssertionError("unreachable")

    return wrapper
