"""A running ``kmsq gateway`` for the tests: a subprocess serving HTTP (or HTTPS) as a registered caller, in
front of the deployment's real workers."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.queue_fixtures import Deployment, kmsq_command

# What the gateway's caller needs: sign_hash too, since the key-provider API signs ETH-like coins' bare hashes.
GATEWAY_OPS = ("generate_data_key", "decrypt_data_key", "put_key", "get_key", "generate_signing_key", "sign",
               "sign_hash")  # fmt: skip


@dataclass
class Gateway:
    """A running ``kmsq gateway``."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_gateway(
    deployment: Deployment, name: str, fleet: dict[str, object], *options: str, label: str = ""
) -> Gateway:
    """Starts a gateway as the registered caller ``name`` and waits until it serves."""
    directory = deployment.directory / "callers"
    (directory / f"{name}.fleet.json").write_text(json.dumps(fleet))
    port = free_port()
    scheme = "https" if "--tls-cert" in options else "http"
    log = deployment.directory / f"gateway-{name}{label}.log"
    command = [*kmsq_command(), "gateway", "--listen", f"127.0.0.1:{port}", "--identity"]
    command += [str(directory / f"{name}.key.json"), "--fleet", str(directory / f"{name}.fleet.json"), *options]
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=deployment.env(), stdout=out, stderr=subprocess.STDOUT)
    gateway = Gateway(f"{scheme}://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        # uvicorn names the address it binds; processes on a socket bound for them (--processes) only start.
        ready = "Application startup complete" if "--processes" in options else "Uvicorn running on"
        if ready in log.read_text(errors="replace"):
            return gateway
        time.sleep(0.1)
    gateway.stop()
    raise AssertionError(f"gateway not up in 60 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def gateway(deployment: Deployment) -> Iterator[Gateway]:
    """A gateway whose caller may use the six operations, with plaintext, on every root key."""
    deployment.register("gateway", GATEWAY_OPS)
    running = start_gateway(deployment, "gateway", deployment.service.fleet_document(), "--timeout", "30")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        yield client


def message_of(response: httpx.Response, status: int) -> str:
    """Asserts the old API's error shape: ``status`` and exactly ``{"message": ...}``."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"message"} and isinstance(body["message"], str) and body["message"]
    return str(body["message"])
