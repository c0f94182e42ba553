"""The HTTP load of ``kmsq bench``'s G: N concurrent clients, each on its own keep-alive connection, each sending
its next request as soon as the answer to the last one arrived (a closed loop, like N wallet-manager calls).

Written on asyncio streams rather than an HTTP client library: the load runs on the same two cores as what it
measures, and a full client (httpx) spends several times the CPU per request of this one, which would crowd
out the gateway and the workers and be measured as their slowness. It speaks only what the gateway answers:
HTTP/1.1 with Content-Length.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    """Latencies (seconds) of the answered requests, the statuses that were not 200, and the wall time."""

    latencies: list[float] = field(default_factory=list)
    failures: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0


def http_request(method: str, path: str, host: str, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request, as bytes (JSON body when there is one)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode("ascii") + b"\r\n" + body


async def _read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def _closed_loop(host: str, port: int, total: int, clients: int, request: Callable[[int], bytes]) -> LoadResult:
    result = LoadResult()
    counter = iter(range(total))

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for index in counter:
                started = time.perf_counter()
                writer.write(request(index))
                status = await _read_answer(reader)
                if status == 200:
                    result.latencies.append(time.perf_counter() - started)
                else:
                    result.failures[status] = result.failures.get(status, 0) + 1
        finally:
            writer.close()

    begin = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.elapsed = time.perf_counter() - begin
    return result


def closed_loop(host: str, port: int, total: int, clients: int, request: Callable[[int], bytes]) -> LoadResult:
    """Sends ``total`` requests (``request(i)`` gives the i-th) over ``clients`` connections in a closed loop.
    Returns what was measured."""
    return asyncio.run(_closed_loop(host, port, total, clients, request))
