"""``kmsq gateway``: the key-provider HTTP API (kmsq.gateway) served as one caller."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import click

from kmsq.commands.common import caller_options, open_client
from kmsq.output import one_line_errors
from schemas.limits import HTTP_HEAD_SECONDS, MAX_HTTP_BODY_MEMORY, MAX_HTTP_CONNECTIONS

GATEWAY_EXTRA_MODULES = ("fastapi", "starlette", "uvicorn", "httptools")  # what `pip install 'kmsq[gateway]'` adds


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--listen")
    return host.strip("[]"), int(port)


@click.command("gateway")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve on.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Server certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Its private key.")
@click.option("--client-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Require client certificates issued by this CA (mTLS).")  # fmt: skip
@click.option("--root-key", default=None, help="Root key for new keys (default: the pool's default root key).")
@click.option("--reply-queue", default=None, help="Suffix of the gateway's durable reply queue (default: random).")
@click.option("--coalesce/--no-coalesce", default=True, show_default=True,
              help="Send concurrent calls of one kind as one batch message (a lone call goes at once).")  # fmt: skip
@click.option("--linger-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True,
              help="How long a call may wait for others while one of its kind is in flight.")  # fmt: skip
@click.option("--max-batch", type=click.IntRange(1, 1000), default=256, show_default=True,
              help="Most calls in one coalesced message.")  # fmt: skip
@click.option("--max-in-flight", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Batch messages of one kind out at once before the next waits for one to land.")  # fmt: skip
@click.option("--max-wait-ms", type=click.FloatRange(0, 10_000), default=100.0, show_default=True,
              help="Longest a call waits for a message of its kind to land.")  # fmt: skip
@click.option(
    "--eth-keys-in-hsm",
    is_flag=True,
    help="POST /key/generate keeps ETH-like keys in the token (secp256k1, CKM_ECDSA), not as sealed xprvs.",
)
@click.option("--processes", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Processes sharing the listening socket, each with its own client and reply queue.")  # fmt: skip
@click.option("--max-connections", type=click.IntRange(1, 100_000), default=MAX_HTTP_CONNECTIONS, show_default=True,
              help="Connections (and requests in flight) a process serves; beyond, requests get 503.")  # fmt: skip
@click.option("--body-memory-mib", type=click.IntRange(8, 1 << 20), default=MAX_HTTP_BODY_MEMORY >> 20,
              show_default=True, help="MiB of request bodies a process holds at once (beyond: 503).")  # fmt: skip
@click.option("--header-timeout", type=click.FloatRange(0.1, 300), default=HTTP_HEAD_SECONDS, show_default=True,
              help="Seconds a request head may take to arrive (408 and the connection closed).")  # fmt: skip
@caller_options
@one_line_errors
def gateway(
    listen: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    client_ca: Path | None,
    root_key: str | None,
    reply_queue: str | None,
    coalesce: bool,
    linger_ms: float,
    max_batch: int,
    max_in_flight: int,
    max_wait_ms: float,
    eth_keys_in_hsm: bool,
    processes: int,
    max_connections: int,
    body_memory_mib: int,
    header_timeout: float,
    identity: Path | None,
    fleet: Path | None,
    timeout: float,
) -> None:
    """Serve the key-provider HTTP API (POST /key, GET /key/{pub}, POST /key/generate, POST /sign,
    POST /generateDataKey, POST /decryptDataKey) as this caller. --timeout is how long a request waits for a
    worker before answering 503. Concurrent calls are coalesced into batch messages unless --no-coalesce
    (docs/PROTOCOL.md, Coalescing). Request heads are bounded (431), and so are connections and the request
    bodies held at once (503); plain HTTP beyond loopback is warned about at start."""
    from kmsq.output import EXIT_CONFIG, fail

    try:
        import uvicorn  # noqa: F401 - imported by serve(); checked here, before anything starts

        from kmsq.gateway import (
            GatewaySettings,
            HttpLimits,
            TlsFiles,
            create_app,
            listening_socket,
            serve,
            warn_if_exposed,
        )
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in GATEWAY_EXTRA_MODULES:
            raise
        fail(f"kmsq gateway needs the gateway extra (no module {e.name}): pip install 'kmsq[gateway]'", EXIT_CONFIG)

    host, port = _host_port(listen)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise click.UsageError("--client-ca needs --tls-cert and --tls-key")
    tls = TlsFiles(tls_cert, tls_key, client_ca) if tls_cert is not None and tls_key is not None else None
    from tasks.coalesce import CoalescePolicy

    policy = (
        CoalescePolicy(linger=linger_ms / 1000, max_items=max_batch, max_in_flight=max_in_flight,
                       max_wait=max_wait_ms / 1000)
        if coalesce else False
    )  # fmt: skip
    limits = HttpLimits(max_connections=max_connections, body_memory=body_memory_mib << 20, head_seconds=header_timeout)
    warn_if_exposed(host, port, tls)  # once, before any process starts

    def run(suffix: str | None, sock: socket.socket | None = None) -> None:
        with open_client(identity, fleet, timeout, reply_queue=suffix, coalesce=policy) as client:
            settings = GatewaySettings(root_key_id=root_key, timeout=timeout, eth_keys_in_hsm=eth_keys_in_hsm)
            app = create_app(client, settings, limits.body_memory)
            serve(app, host, port, tls, sock, limits)

    if processes == 1:
        run(reply_queue)
        return
    sock = listening_socket(host, port)
    suffixes = [f"{reply_queue}-{i}" if reply_queue else None for i in range(processes)]
    sys.exit(supervise([partial(run, suffix, sock) for suffix in suffixes]))


def supervise(children: list[Callable[[], None]]) -> int:
    """Forks a process for each of ``children`` (threads do not survive a fork: each opens its own client)
    and waits for them. SIGTERM and SIGINT are passed on; when one process ends, the others are stopped.
    Returns 0 when every process exited 0 or was stopped by SIGTERM/SIGINT, else 1."""
    pids = []
    for child in children:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child()
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    while pids:
        pid, status = os.wait()
        if pid in pids:
            pids.remove(pid)
            codes.append(os.waitstatus_to_exitcode(status))
            forward(signal.SIGTERM, None)  # one ended: stop the others, and let a supervisor restart the whole
    # uvicorn ends a process stopped by a signal with that signal again, after its graceful shutdown.
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)
    return 0 if all(code in stopped for code in codes) else 1
