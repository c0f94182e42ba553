"""A private three-node RabbitMQ cluster for a chaos run (``kmsq chaos --broker rabbitmq``), on this machine: its
own node names (``kmsqchaos<run>-<n>@localhost``), AMQP and distribution ports on 127.0.0.1 and data directories,
started with ``rabbitmq-server -detached`` and joined with ``rabbitmqctl join_cluster``. Faults are done to these
nodes only; a RabbitMQ already running here (``rabbit@localhost``) is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from kmsq.chaos.hsm_faults import ChaosError
from kmsq.procfs import alive

# rabbitmqctl's own distribution ports are NODE_PORT + 30000 .. + 30010 of the node it talks to (35672-35682 for
# a default node): an AMQP port there fails with eaddrinuse while a rabbitmqctl runs.
_CLI_PORTS = range(35600, 35800)


def _port() -> int:
    """A TCP port nobody listens on now, outside rabbitmqctl's own."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port not in _CLI_PORTS:
            return port


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/rabbitmq/bin")
    if found is None:
        raise ChaosError(f"kmsq chaos --broker rabbitmq needs {name} (install rabbitmq-server)")
    return found


class RabbitCluster:
    """Three RabbitMQ nodes in one cluster, and the run's vhost (``VHOST``) on it."""

    VHOST = "kmsq-chaos"

    def __init__(self, size: int = 3) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="kmsq-chaos-mq-"))
        if os.geteuid() == 0:
            shutil.chown(self.directory, "rabbitmq", "rabbitmq")
        os.chmod(self.directory, 0o700)
        run = uuid.uuid4().hex[:6]
        self.names = [f"kmsqchaos{run}-{n}@localhost" for n in range(size)]
        self.ports = [_port() for _ in range(size)]
        self.dist_ports = [_port() for _ in range(size)]

    @property
    def url(self) -> str:
        """The broker URL of every node (kombu's failover list), guest on the run's vhost."""
        return ";".join(f"amqp://guest:guest@127.0.0.1:{port}/{self.VHOST}" for port in self.ports)

    def _env(self, node: int) -> dict[str, str]:
        base = self.directory / f"node{node}"
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "RABBITMQ_NODENAME": self.names[node],
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.ports[node]),
            "RABBITMQ_DIST_PORT": str(self.dist_ports[node]),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),  # none: no other listener
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        }

    def ctl(self, node: int, *args: str, timeout: float = 120) -> str:
        """Runs ``rabbitmqctl -n NODE ARGS`` and returns its output. Raises ChaosError when it fails."""
        result = subprocess.run([_tool("rabbitmqctl"), "-q", "-n", self.names[node], *args], capture_output=True,
                                text=True, timeout=timeout, env=self._env(node), check=False)  # fmt: skip
        if result.returncode != 0:
            raise ChaosError(f"rabbitmqctl {args[0]} on node {node} failed: {(result.stderr or result.stdout)[-400:]}")
        return result.stdout

    def start_node(self, node: int) -> None:
        """Starts node ``node`` (its data kept from before: a restarted node rejoins) and waits until it runs."""
        self._launch(node)
        self._wait(node)

    def _launch(self, node: int) -> None:
        base = self.directory / f"node{node}"
        base.mkdir(exist_ok=True)
        (base / "rabbitmq.conf").touch()
        if os.geteuid() == 0:
            shutil.chown(base, "rabbitmq", "rabbitmq")
        subprocess.run([_tool("rabbitmq-server"), "-detached"], env=self._env(node), capture_output=True, timeout=60,
                       check=False)  # fmt: skip

    def _wait(self, node: int) -> None:
        self.ctl(node, "wait", str(self.directory / f"node{node}" / "pid"), "--timeout", "120", timeout=150)

    def create(self) -> None:
        """Starts the nodes (at once), joins them into one cluster and makes the vhost. Raises ChaosError when a
        step fails."""
        for node in range(len(self.names)):
            self._launch(node)
        for node in range(len(self.names)):
            self._wait(node)
        for node in range(1, len(self.names)):
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", self.names[0])
            self.ctl(node, "start_app")
        self.ctl(0, "add_vhost", self.VHOST)
        self.ctl(0, "set_permissions", "-p", self.VHOST, "guest", ".*", ".*", ".*")

    def pid(self, node: int) -> int | None:
        """The node's Erlang VM process id, or None when it is not running."""
        try:
            pid = int((self.directory / f"node{node}" / "pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def kill(self, node: int) -> None:
        """SIGKILL to the node's VM (a crash: what it had not written is gone)."""
        pid = self.pid(node)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)

    def leader_of(self, queue: str) -> int:
        """The index of the node that leads the quorum queue ``queue``. Raises ChaosError when none is known."""
        for node in range(len(self.names)):
            if self.pid(node) is None:
                continue
            rows = json.loads(self.ctl(node, "list_queues", "-p", self.VHOST, "name", "leader", "--formatter", "json"))
            for row in rows:
                if row.get("name") == queue and row.get("leader") in self.names:
                    return self.names.index(row["leader"])
        raise ChaosError(f"no leader known for queue {queue}")

    def depth(self, queue: str) -> int:
        """Messages ready in ``queue``, not yet delivered to a consumer (0 when it does not exist)."""
        for node in range(len(self.names)):
            if self.pid(node) is None:
                continue
            rows = json.loads(self.ctl(node, "list_queues", "-p", self.VHOST, "name", "messages_ready",
                                       "--formatter", "json"))  # fmt: skip
            return sum(int(row.get("messages_ready") or 0) for row in rows if row.get("name") == queue)
        return 0

    def close(self) -> None:
        """Stops every node and deletes the cluster's directory."""
        for node in range(len(self.names)):
            if self.pid(node) is not None:
                with contextlib.suppress(ChaosError, subprocess.TimeoutExpired):
                    self.ctl(node, "stop", timeout=60)
                self.kill(node)
        shutil.rmtree(self.directory, ignore_errors=True)
