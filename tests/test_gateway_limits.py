"""What an HTTP client the gateway does not authenticate can make it hold: request heads (their bytes and header
fields), connections, requests in flight, request bodies, and time; and the warning for plain HTTP beyond
loopback. Against real ``kmsq gateway`` processes (in front of the real workers) over raw sockets."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from kmsq.gateway import BODIES_IN_FLIGHT, TlsFiles, plain_http_warning
from schemas.envelope import EncryptedDataKey, KeySpec, WrapAlgorithm
from schemas.limits import (
    MAX_HTTP_BODY_BYTES,
    MAX_HTTP_BODY_MEMORY,
    MAX_HTTP_HEAD_BYTES,
    MAX_HTTP_HEADERS,
    MAX_PUB_CHARS,
)
from tests.conftest import random_pub
from tests.gateway_fixtures import GATEWAY_OPS, Gateway, free_port, start_gateway
from tests.queue_fixtures import Deployment, kmsq_command
from tests.test_gateway import _certificate, _write_pair

MIB = 1024 * 1024
TIGHT_MIB = 8  # --body-memory-mib of the tight gateway
BUSY_CONNECTIONS = 4  # --max-connections of the busy gateway
BUSY_HEAD_SECONDS = 1.0  # its --header-timeout
BUSY_TIMEOUT = 3.0  # its --timeout: how long a request for a pool no worker serves stays in flight
HEAD_TOO_LARGE = f"request header fields exceed {MAX_HTTP_HEAD_BYTES} bytes"
EVERY_ADDRESS = "0.0.0.0"  # noqa: S104 - what the plain HTTP warning is about


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def message(self) -> str:
        """Asserts the gateway's error shape and returns its message."""
        assert self.headers.get("content-type") == "application/json", self.headers
        body = json.loads(self.body)
        assert set(body) == {"message"} and isinstance(body["message"], str) and body["message"]
        return str(body["message"])

    def json(self) -> dict[str, str]:
        assert self.status == 200, (self.status, self.body[:300])
        return dict(json.loads(self.body))


def connect(gateway: Gateway, timeout: float = 10) -> socket.socket:
    address = urlsplit(gateway.url)
    return socket.create_connection((address.hostname or "127.0.0.1", address.port or 80), timeout=timeout)


def read_answer(sock: socket.socket, started: float, timeout: float = 30) -> Answer:
    """Reads one answer (framed by Content-Length, as the gateway frames all of them)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the answer's body"
        body += chunk
    assert len(body) == length, "more than one answer"
    return Answer(int(lines[0].split(" ", 2)[1]), headers, body, time.monotonic() - started)


def closed_by_gateway(sock: socket.socket, within: float = 5) -> bool:
    """Whether the gateway closes the connection (without sending anything more) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def ask(sock: socket.socket, request: bytes, timeout: float = 30) -> Answer:
    started = time.monotonic()
    sock.sendall(request)
    return read_answer(sock, started, timeout)


def refused(gateway: Gateway, request: bytes) -> Answer:
    """Sends ``request`` on a connection of its own; returns the answer, after checking the gateway closed it."""
    with connect(gateway) as sock:
        answer = ask(sock, request)
        assert answer.headers.get("connection") == "close"
        assert closed_by_gateway(sock)
    return answer


def request(method: str, target: str, *fields: tuple[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway", *(f"{name}: {value}" for name, value in fields)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def superagent(method: str, target: str, document: dict[str, str] | None = None, connection: str = "close") -> bytes:
    """A request as the wallet manager's KeyProviderClient (superagent, Node 20) sends it: these five fields in
    this order, ``Connection: close`` (captured from the client itself); ``keep-alive`` as a client on a
    keep-alive agent sends it."""
    body = b"" if document is None else json.dumps(document).encode()
    fields = [("Accept-Encoding", "gzip, deflate")]
    if document is not None:
        fields += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return request(method, target, *fields, ("Connection", connection), body=body)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class RssSampler:
    """The highest resident size of a process, sampled every 10 ms while in use."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.done = pid, rss_bytes(pid), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


@pytest.fixture(scope="module")
def limited(deployment: Deployment) -> Iterator[Gateway]:
    """A gateway with the default limits."""
    deployment.register("gateway-limits", GATEWAY_OPS)
    running = start_gateway(deployment, "gateway-limits", deployment.service.fleet_document(), "--timeout", "30")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def busy(deployment: Deployment) -> Iterator[Gateway]:
    """A gateway with low limits, and a pool no worker serves (its requests stay in flight ``BUSY_TIMEOUT``)."""
    deployment.register("gateway-busy", GATEWAY_OPS)
    fleet = deployment.service.fleet_document()
    fleet["pools"]["ghost"] = dict(fleet["pools"]["beta"], root_keys=["ghost-root"])
    running = start_gateway(deployment, "gateway-busy", fleet, "--timeout", str(BUSY_TIMEOUT),
                            "--max-connections", str(BUSY_CONNECTIONS),
                            "--header-timeout", str(BUSY_HEAD_SECONDS))  # fmt: skip
    yield running
    running.stop()


def test_a_200_kb_header_is_answered_431_at_once(limited: Gateway) -> None:
    answer = refused(limited, request("GET", "/nothing/here", ("X-Big", "a" * 200_000)))
    assert answer.status == 431 and answer.seconds < 2
    assert answer.message() == HEAD_TOO_LARGE


def test_5000_header_fields_are_answered_431(limited: Gateway) -> None:
    answer = refused(limited, request("GET", "/nothing/here", *((f"X-Field-{i}", "v") for i in range(5000))))
    assert answer.status == 431 and answer.seconds < 2
    assert answer.message() == f"more than {MAX_HTTP_HEADERS} request header fields"


def test_a_200_kb_request_target_is_answered_414(limited: Gateway) -> None:
    answer = refused(limited, request("GET", "/key/" + "a" * 200_000 + "?source=user"))
    assert answer.status == 414 and answer.message() == f"request target exceeds {MAX_HTTP_HEAD_BYTES} bytes"


@pytest.fixture(scope="module")
def tight(deployment: Deployment) -> Iterator[Gateway]:
    """A gateway holding at most TIGHT_MIB of request bodies at once."""
    deployment.register("gateway-tight", GATEWAY_OPS)
    running = start_gateway(deployment, "gateway-tight", deployment.service.fleet_document(),
                            "--body-memory-mib", str(TIGHT_MIB))  # fmt: skip
    yield running
    running.stop()


def _post_head(target: str, length: int | None) -> bytes:
    """The head of a POST whose body follows (framed by Content-Length, or chunked when ``length`` is None)."""
    framing = ("Transfer-Encoding", "chunked") if length is None else ("Content-Length", str(length))
    return request("POST", target, ("Content-Type", "application/json"), framing)


def _answered_at_once(sock: socket.socket, within: float = 0.5) -> bool:
    return bool(select.select([sock], [], [], within)[0])


def test_bodies_beyond_the_body_memory_are_answered_503_and_others_go_on(
    deployment: Deployment, tight: Gateway
) -> None:
    """One slow 6 MiB body holds 6 of the gateway's 8 MiB: a declared 4 MiB body is answered 503 before it is
    sent, and a chunked one once it passes the budget; requests without or with small bodies are served
    meanwhile; once the slow one ends, the 4 MiB body is read (and found not to be JSON)."""
    slow = connect(tight)
    try:
        slow.sendall(_post_head("/key", 6 * MIB) + b"{" + b" " * MIB)  # and the rest never comes
        time.sleep(0.3)
        with connect(tight) as sock:  # the whole body written before the answer is read, as most clients do
            answer = ask(sock, _post_head("/key", 4 * MIB) + b" " * (4 * MIB))
            assert answer.status == 503 and answer.message() == BODIES_IN_FLIGHT
            assert answer.headers.get("retry-after") == "1"
            assert ask(sock, request("GET", "/nothing/here")).status == 404  # the body was dropped, not kept
        with connect(tight) as sock:
            started = time.monotonic()
            sock.sendall(_post_head("/key", None))
            chunk = b" " * (512 * 1024)
            try:
                for _ in range(8):  # 4 MiB, 512 KiB a chunk
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    if _answered_at_once(sock, 0.05):
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            chunked = read_answer(sock, started)
        assert chunked.status == 503 and chunked.message() == BODIES_IN_FLIGHT
        with connect(tight) as sock:
            assert ask(sock, request("GET", "/nothing/here")).status == 404
            made = ask(sock, superagent("POST", "/generateDataKey", {"keyType": "AES-256"})).json()
            deployment.secrets.append(made["plaintextKey"].encode())
    finally:
        slow.close()
    time.sleep(0.3)  # the slow request ends: its 6 MiB are given back
    with connect(tight) as sock:
        answer = ask(sock, _post_head("/key", 4 * MIB) + b"x" * (4 * MIB))
        assert answer.status == 400 and answer.message() == "request body is not valid JSON"


def test_a_body_over_the_limit_written_whole_gets_its_400(limited: Gateway) -> None:
    """The wallet manager's client writes a whole body before it reads: a 9 MiB one gets the 400, not a reset
    connection (the gateway drops the rest instead of closing with unread bytes, which sends RST)."""
    with connect(limited) as sock:
        answer = ask(sock, _post_head("/key", 9 * MIB) + b"x" * (9 * MIB))
        assert answer.status == 400 and answer.message() == f"request body exceeds {MAX_HTTP_BODY_BYTES} bytes"
        assert ask(sock, request("GET", "/nothing/here")).status == 404


def test_32_slow_full_size_bodies_hold_at_most_the_body_memory(limited: Gateway) -> None:
    """The attack of issue 22: 32 connections each send all but the last byte of an 8 MiB body. With the default
    64 MiB budget 8 are read and 24 answered 503 at once, and the process grows by about the 64 MiB it holds
    (it grew by 257 MiB without the budget)."""
    before = rss_bytes(limited.process.pid)
    socks, refusals = [], 0
    with RssSampler(limited.process.pid) as rss:
        try:
            for _ in range(32):
                sock = connect(limited)
                socks.append(sock)
                sock.sendall(_post_head("/key", MAX_HTTP_BODY_BYTES))
                if _answered_at_once(sock, 0.3):
                    answer = read_answer(sock, time.monotonic())
                    assert answer.status == 503 and answer.message() == BODIES_IN_FLIGHT
                    refusals += 1
                    continue
                sock.sendall(b"{" + b" " * (MAX_HTTP_BODY_BYTES - 2))
            time.sleep(1.0)
        finally:
            for sock in socks:
                sock.close()
    assert refusals == 32 - MAX_HTTP_BODY_MEMORY // MAX_HTTP_BODY_BYTES
    assert rss.peak - before < MAX_HTTP_BODY_MEMORY + 48 * MIB, (before, rss.peak)


def test_a_64_mib_header_is_cut_off_early_and_memory_stays_bounded(limited: Gateway) -> None:
    """Streamed 64 KiB at a time: the gateway answers 431 and closes before it has read more than its limit and a
    read or two (the client gets a few MiB into the kernel's buffers first); its resident size does not grow.
    Without the limit it read all 64 MiB (404 after 6-10 s) and grew by 127 MiB at the peak."""
    before = rss_bytes(limited.process.pid)
    with RssSampler(limited.process.pid) as rss, connect(limited) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        started = time.monotonic()
        sock.sendall(b"GET /nothing/here HTTP/1.1\r\nHost: gateway\r\nX-Big: ")
        sent, chunk = 0, b"a" * 65536
        try:
            while sent < 64 * MIB and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway closed while the client was still sending: its answer is already here
        answer = read_answer(sock, started)
    assert answer.status == 431 and answer.message() == HEAD_TOO_LARGE
    assert sent < 16 * MIB and answer.seconds < 5, (sent, answer.seconds)
    assert rss.peak - before < 16 * MIB, (before, rss.peak)


def test_heads_at_the_limits_are_served(limited: Gateway) -> None:
    """The longest request target kmsq answers (a 1024-character pub of 4-byte characters, percent-encoded) and
    the most header fields, in one head under MAX_HTTP_HEAD_BYTES; one field more is refused."""
    pub = "\U0001f511" * MAX_PUB_CHARS
    target = f"/key/{quote(pub, safe='')}?source=user"
    assert len(target) > 12_288
    value = (MAX_HTTP_HEAD_BYTES - len(target) - 1024) // (MAX_HTTP_HEADERS - 1) - len("X-Field-00: \r\n")
    fields = [(f"X-Field-{i:02}", "v" * value) for i in range(MAX_HTTP_HEADERS - 1)]  # and Host
    at_limit = request("GET", target, *fields)
    assert MAX_HTTP_HEAD_BYTES - 1200 < len(at_limit) < MAX_HTTP_HEAD_BYTES
    with connect(limited) as sock:
        answer = ask(sock, at_limit)
        assert answer.status == 404 and answer.message()  # asked of the workers: no such key
    assert refused(limited, request("GET", target, *fields, ("X-One-More", "v"))).status == 431
    assert refused(limited, request("GET", target, *fields[:-10], ("X-Long", "v" * 3000))).status == 431


def _wallet_manager_calls(deployment: Deployment, answer: Callable[[bytes], Answer]) -> None:
    """What KeyProviderClient sends (five header fields; a 330,000-character MPCv2 key share as a body), each
    answered as before."""
    share = base64.b64encode(os.urandom(247_500)).decode()
    deployment.secrets.append(share[999:1095].encode())
    pub = random_pub()
    made = answer(superagent("POST", "/generateDataKey", {"keyType": "AES-256"})).json()
    deployment.secrets.append(made["plaintextKey"].encode())
    back = answer(superagent("POST", "/decryptDataKey", {"encryptedKey": made["encryptedKey"]})).json()
    assert back == {"plaintextKey": made["plaintextKey"]}
    document = {"prv": share, "pub": pub, "coin": "hteth", "source": "user", "type": "tss"}
    assert answer(superagent("POST", "/key", document)).json()["pub"] == pub
    assert answer(superagent("GET", f"/key/{pub}?source=user")).json()["prv"] == share
    missing = answer(superagent("GET", f"/key/{random_pub()}?source=user"))
    assert missing.status == 404 and missing.message()


def test_wallet_manager_requests_each_on_a_connection_it_asks_to_close(
    deployment: Deployment, limited: Gateway
) -> None:
    """As the client sends them (Connection: close): answered, then closed by the gateway; and a 9 MiB body
    written whole still gets its 400 (the gateway lingers: closing with the body unread would reset the
    connection, and the client saw ``write ECONNRESET``)."""

    def on_its_own_connection(message: bytes) -> Answer:
        with connect(limited) as sock:
            answer = ask(sock, message)
            assert closed_by_gateway(sock)
        return answer

    _wallet_manager_calls(deployment, on_its_own_connection)
    head = request("POST", "/key", ("Content-Type", "application/json"), ("Content-Length", str(9 * MIB)),
                   ("Connection", "close"))  # fmt: skip
    answer = on_its_own_connection(head + b"x" * (9 * MIB))
    assert answer.status == 400 and answer.message() == f"request body exceeds {MAX_HTTP_BODY_BYTES} bytes"


def test_wallet_manager_requests_on_one_keep_alive_connection(deployment: Deployment, limited: Gateway) -> None:
    """The same requests from a client on a keep-alive agent, on one connection the gateway keeps open."""
    with connect(limited) as sock:

        def kept_alive(message: bytes) -> Answer:
            return ask(sock, message.replace(b"Connection: close", b"Connection: keep-alive"))

        _wallet_manager_calls(deployment, kept_alive)
        assert not closed_by_gateway(sock, within=0.5)


def test_connections_beyond_the_limit_are_answered_503(busy: Gateway) -> None:
    """A request on a connection over --max-connections is answered 503 and its connection closed; once a
    connection ends, a new one is served. Connections kept alive between requests count."""
    kept = [connect(busy) for _ in range(BUSY_CONNECTIONS)]
    try:
        for sock in kept:
            assert ask(sock, request("GET", "/nothing/here")).status == 404
        time.sleep(BUSY_HEAD_SECONDS + 0.5)  # idle between requests: kept alive (the head timeout is not idle)
        assert ask(kept[0], request("GET", "/nothing/here")).status == 404
        answer = refused(busy, request("GET", "/nothing/here"))
        assert answer.status == 503 and answer.message() == "too many connections"
        assert answer.headers.get("retry-after") == "1"
        kept.pop().close()
        time.sleep(0.2)
        with connect(busy) as sock:
            assert ask(sock, request("GET", "/nothing/here")).status == 404
    finally:
        for sock in kept:
            sock.close()
    assert f"over the connection limit ({BUSY_CONNECTIONS}; now" in busy.log.read_text()


def test_requests_in_flight_beyond_the_limit_are_answered_503(busy: Gateway) -> None:
    """Requests whose clients went away stay in flight until their worker answers (here: none, --timeout);
    as many as --max-connections make further requests 503 until they end."""
    ghost = EncryptedDataKey(KeySpec.AES_256, WrapAlgorithm.AES_KWP, "ghost-root", 1, b"\0" * 40).to_text()
    clients = [connect(busy) for _ in range(BUSY_CONNECTIONS)]
    for sock in clients:
        sock.sendall(superagent("POST", "/decryptDataKey", {"encryptedKey": ghost}))
    time.sleep(0.5)  # read, and waiting for a worker, before the clients leave
    for sock in clients:
        sock.close()
    started = time.monotonic()
    answer = refused(busy, request("GET", "/nothing/here"))
    assert answer.status == 503 and answer.message() == "too many connections"
    assert time.monotonic() - started < BUSY_TIMEOUT - 1
    time.sleep(BUSY_TIMEOUT + 0.5)
    with connect(busy) as sock:
        assert ask(sock, request("GET", "/nothing/here")).status == 404


def test_a_slow_head_is_answered_408_and_a_silent_connection_closed(busy: Gateway) -> None:
    with connect(busy) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /nothing/here HTTP/1.1\r\nHost: gateway\r\n")  # and never the end of the head
        answer = read_answer(sock, started)
        assert answer.status == 408 and answer.message() == f"request head not received within {BUSY_HEAD_SECONDS:g} s"
        assert BUSY_HEAD_SECONDS - 0.2 < answer.seconds < BUSY_HEAD_SECONDS + 2
        assert closed_by_gateway(sock)
    with connect(busy) as sock:
        started = time.monotonic()
        assert closed_by_gateway(sock, within=BUSY_HEAD_SECONDS + 2)  # nothing sent: closed without an answer
        assert time.monotonic() - started > BUSY_HEAD_SECONDS - 0.2


def test_a_large_header_over_tls_is_answered_431(deployment: Deployment, limited: Gateway, tmp_path: Path) -> None:
    """Under TLS too (no client CA: anyone may send a head), the whole 200 KB written before the answer is read."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    _write_pair(tmp_path, "ca", _certificate("kmsq test CA", ca_key, None, server=False), ca_key)
    server = _certificate("gateway", server_key, ("kmsq test CA", ca_key), True)
    _write_pair(tmp_path, "server", server, server_key)
    secure = start_gateway(deployment, "gateway-limits", deployment.service.fleet_document(),
                           "--tls-cert", str(tmp_path / "server.crt"), "--tls-key", str(tmp_path / "server.key"),
                           label="-tls")  # fmt: skip
    try:
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        with trust.wrap_socket(connect(secure), server_hostname="127.0.0.1") as sock:
            answer = ask(sock, request("GET", "/nothing/here", ("X-Big", "a" * 200_000)))
            assert answer.status == 431 and answer.message() == HEAD_TOO_LARGE
            assert answer.headers.get("connection") == "close" and answer.seconds < 2
            assert closed_by_gateway(sock)
    finally:
        secure.stop()


def test_malformed_http_is_answered_400_as_json(limited: Gateway) -> None:
    answer = refused(limited, b"GET /nothing/here HTTP/1.1\r\nHost: gateway\r\nBad Name: x\r\n\r\n")
    assert answer.status == 400 and answer.message() == "invalid HTTP request"


@pytest.mark.parametrize(
    ("host", "tls", "warned"),
    [
        (EVERY_ADDRESS, False, True),
        ("::", False, True),
        ("192.0.2.10", False, True),
        (EVERY_ADDRESS, True, False),
        ("127.0.0.1", False, False),
        ("127.0.0.53", False, False),
        ("::1", False, False),
        ("localhost", False, False),
    ],
)
def test_plain_http_beyond_loopback_is_warned(host: str, tls: bool, warned: bool) -> None:
    files = TlsFiles(Path("server.crt"), Path("server.key")) if tls else None
    warning = plain_http_warning(host, 8080, files)
    assert (warning is not None) == warned
    if warning is not None:
        assert f"plain HTTP on {host}:8080" in warning and "\n" not in warning


def test_the_gateway_warns_once_at_start_when_it_listens_beyond_loopback(
    deployment: Deployment, limited: Gateway, tmp_path: Path
) -> None:
    """One line on stderr, in the gateway's log, even with two processes; none on 127.0.0.1 (``limited``)."""
    callers = deployment.directory / "callers"
    port = free_port()
    command = [*kmsq_command(), "gateway", "--listen", f"{EVERY_ADDRESS}:{port}", "--processes", "2",
               "--identity", str(callers / "gateway-limits.key.json"),
               "--fleet", str(callers / "gateway-limits.fleet.json")]  # fmt: skip
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, env=deployment.env(), stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while stderr.read_text().count("Application startup complete") < 2:
            assert process.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(timeout=30)
    warnings = [line for line in stderr.read_text().splitlines() if "plain HTTP" in line]
    assert warnings == [f"WARNING:     kmsq.gateway: {plain_http_warning(EVERY_ADDRESS, port, None)}"]
    assert "plain HTTP" not in stdout.read_text() and "plain HTTP" not in limited.log.read_text()
