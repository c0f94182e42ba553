"""G of ``kmsq bench``: the HTTP gateway under many concurrent clients, coalescing off and on.

A ``kmsq gateway`` process serves the bench caller; :mod:`kmsq.bench_http` keeps N clients in a closed loop
on each endpoint (generateDataKey, decryptDataKey, POST /key, GET /key). Each cell reports throughput, p50
and p99, and the CPU per request of every process group (the load, the gateway, the worker, Redis, Postgres).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from kmsq.bench_common import CpuMeter, stop_worker, summarize
from kmsq.bench_http import closed_loop, http_request

ENDPOINTS = ("generateDataKey", "decryptDataKey", "putKey", "getKey", "signEth")
# generateDataKey at more levels, for the plot of throughput against concurrent clients; signEth (POST /sign of an
# ETH-like key's operation hash, as BitGo's client sends it) at one client and at 256 (issue 26: >= 8x).
CLIENTS = {"generateDataKey": (1, 16, 64, 256), "decryptDataKey": (64, 256), "putKey": (64, 256), "getKey": (64, 256),
           "signEth": (1, 256)}  # fmt: skip
MODES = ("off", "on")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(
    coalesce: bool, identity: Path, fleet: Path, root_key: str, env: dict[str, str], log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Starts ``kmsq gateway`` on a free port and waits until it answers. Returns the process and port.
    Raises RuntimeError."""
    port = _free_port()
    args = [sys.executable, "-m", "kmsq", "gateway", "--listen", f"127.0.0.1:{port}", "--identity", str(identity),
            "--fleet", str(fleet), "--root-key", root_key, "--timeout", "120",
            *([] if coalesce else ["--no-coalesce"])]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the bench gateway exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=1) as answer:
                if answer.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.1)
    stop_worker(process)
    raise RuntimeError(f"the bench gateway did not start; see {log}")


class Material:
    """What the endpoints need: data keys to decrypt and stored keys to read (made through the SDK)."""

    def __init__(self, client: Any, root_key: str, count: int) -> None:
        self.encrypted: list[str] = []
        while len(self.encrypted) < count:
            n = min(1000, count - len(self.encrypted))
            items = client.generate_data_keys(n, root_key, with_plaintext=False)["items"]
            self.encrypted += [i["encryptedKey"] for i in items]
        self.prefix = f"benchg{secrets.token_hex(4)}"
        self.stored = [f"{self.prefix}s{i}" for i in range(count)]
        for start in range(0, count, 500):
            client.put_keys([{"pub": pub, "prv": "xprv" + secrets.token_hex(50), "coin": "btc", "source": "user",
                              "type": "independent"} for pub in self.stored[start:start + 500]], root_key)  # fmt: skip
        # The gateway's own caller signs: the key must be its own (a generated key signs for the caller that made it).
        self.eth_pub: str | None = None

    def request(self, endpoint: str, host: str, cell: str) -> Callable[[int], bytes]:
        """The i-th request of a cell (``cell`` keeps POST /key's pubs unique across cells)."""
        if endpoint == "generateDataKey":
            body = b'{"keyType":"AES-256"}'
            return lambda i: http_request("POST", "/generateDataKey", host, body)
        if endpoint == "decryptDataKey":
            bodies = [json.dumps({"encryptedKey": k}).encode() for k in self.encrypted]
            return lambda i: http_request("POST", "/decryptDataKey", host, bodies[i % len(bodies)])
        if endpoint == "putKey":

            def put(i: int) -> bytes:
                body = {"pub": f"{self.prefix}{cell}p{i}", "prv": "xprv" + secrets.token_hex(50), "coin": "btc",
                        "source": "user", "type": "independent"}  # fmt: skip
                return http_request("POST", "/key", host, json.dumps(body).encode())

            return put
        if endpoint == "signEth":
            assert self.eth_pub is not None
            pub = self.eth_pub

            def sign(i: int) -> bytes:
                body = {"pub": pub, "source": "user", "signablePayload": "0x" + secrets.token_hex(32),
                        "algorithm": "ecdsa"}  # fmt: skip
                return http_request("POST", "/sign", host, json.dumps(body).encode())

            return sign
        return lambda i: http_request("GET", f"/key/{self.stored[i % len(self.stored)]}?source=user", host)

    def eth_key(self, host: str) -> None:
        """Generates the ETH-like key signEth signs with, through the gateway (so that it is the gateway's own)."""
        if self.eth_pub is None:
            asked = urllib.request.Request(
                f"http://{host}/key/generate", data=b'{"coin":"hteth","source":"user","type":"independent"}',
                headers={"Content-Type": "application/json"}, method="POST",
            )  # fmt: skip
            with urllib.request.urlopen(asked, timeout=60) as answer:  # noqa: S310 (http://127.0.0.1 only)
                self.eth_pub = str(json.loads(answer.read())["pub"])


class Load:
    """One cell of G: ``clients`` closed-loop clients on one endpoint of the gateway at ``port``."""

    def __init__(self, port: int, clients: int, endpoint: str, material: Material, cell: str) -> None:
        self.port, self.clients, self.endpoint, self.material, self.cell = port, clients, endpoint, material, cell

    def run(self, total: int, warm_up: bool = False) -> dict[str, Any]:
        """Sends ``total`` requests. Returns their figures. Raises RuntimeError for answers other than 200."""
        host = f"127.0.0.1:{self.port}"
        request = self.material.request(self.endpoint, host, self.cell + ("w" if warm_up else ""))
        loaded = closed_loop("127.0.0.1", self.port, total, self.clients, request)
        if loaded.failures:
            raise RuntimeError(f"G {self.endpoint}: answers other than 200: {loaded.failures}")
        return summarize(total, loaded.elapsed, loaded.latencies)


def measure_gateway(
    client: Any,
    root_key: str,
    worker: subprocess.Popen[bytes],
    broker_url: str,
    files: tuple[Path, Path],
    env: dict[str, str],
    out_dir: Path,
    requests: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """G: every endpoint at each client count of CLIENTS, with the gateway's coalescing off and on.
    Returns ``{mode: {endpoint: {clients: figures}}}``. Raises RuntimeError when requests fail."""
    identity, fleet = files
    material = Material(client, root_key, min(requests, 2000))
    out: dict[str, Any] = {}
    for mode in MODES:
        process, port = start_gateway(mode == "on", identity, fleet, root_key, env, out_dir / "bench-gateway.log")
        meter = CpuMeter(worker, broker_url, {"gateway": [process.pid]})
        try:
            out[mode] = {}
            material.eth_key(f"127.0.0.1:{port}")
            for endpoint in ENDPOINTS:
                out[mode][endpoint] = {}
                for clients in CLIENTS[endpoint]:
                    log(f"G {endpoint}, {clients} clients, coalescing {mode}")
                    total = requests if clients > 1 else max(10, requests // 10)
                    load = Load(port, clients, endpoint, material, f"{mode}{clients}")
                    load.run(min(total, 2 * clients), warm_up=True)
                    out[mode][endpoint][str(clients)] = meter.measure(total, partial(load.run, total))
        finally:
            stop_worker(process)
    return out
