"""``kmsq broker start|stop``: the embedded broker (a private redis-server on a Unix socket)."""

from __future__ import annotations

import click

from kmsq.commands.common import settings
from kmsq.output import console, one_line_errors


@click.group("broker")
def broker_group() -> None:
    """The embedded broker (a private redis-server on a Unix socket under KMSQ_HOME)."""


@broker_group.command("start")
@one_line_errors
def broker_start() -> None:
    """Start the embedded broker unless it is running."""
    from kmsq import broker

    home = settings().home
    started = broker.start(home)
    console.print(f"broker {'started' if started else 'already running'} on {broker.socket_path(home)}")


@broker_group.command("stop")
@one_line_errors
def broker_stop() -> None:
    """Stop the embedded broker."""
    from kmsq import broker

    console.print("broker stopped" if broker.stop(settings().home) else "broker was not running")
