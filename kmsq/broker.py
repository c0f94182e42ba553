"""The embedded broker: a private redis-server on a Unix socket under ``KMSQ_HOME`` (no TCP port).

Used when ``KMSQ_BROKER_URL`` is not set, so that the main job needs no broker set up by hand. Its data
(append-only file) stays under ``$KMSQ_HOME/broker`` so that durable reply queues survive a restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from schemas.wire import EMBEDDED_BROKER_SOCKET
from worker.errors import ConfigError


def socket_path(home: Path) -> Path:
    """The embedded broker's socket."""
    return home / EMBEDDED_BROKER_SOCKET


def _pid_file(home: Path) -> Path:
    return home / "broker" / "redis.pid"


def running_pid(home: Path) -> int | None:
    """Returns the pid of the running embedded broker, or None."""
    try:
        pid = int(_pid_file(home).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid if socket_path(home).exists() else None


def start(home: Path, timeout: float = 10.0) -> bool:
    """Starts the embedded broker unless it is running. Returns True when it was started now.

    Raises ConfigError when redis-server is missing or does not come up.
    """
    if running_pid(home) is not None:
        return False
    server = shutil.which("redis-server")
    if server is None:
        raise ConfigError("redis-server not found (install the redis-server package, or set KMSQ_BROKER_URL)")
    data = home / "broker"
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    socket_path(home).unlink(missing_ok=True)
    subprocess.run(
        [
            server,
            "--port", "0",
            "--unixsocket", str(socket_path(home)),
            "--unixsocketperm", "700",
            "--dir", str(data),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", str(_pid_file(home)),
            "--logfile", str(data / "redis.log"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(home) is not None:
            return True
        time.sleep(0.05)
    raise ConfigError(f"the embedded broker did not start; see {data / 'redis.log'}")


def stop(home: Path, timeout: float = 10.0) -> bool:
    """Stops the embedded broker. Returns True when one was running."""
    pid = running_pid(home)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True
