"""The gateway's mapping of kmsq outcomes to HTTP answers, in process, with a stand-in for the kmsq client
(the real path is tests/test_gateway.py). Each case is an outcome the real client can produce."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from fastapi.testclient import TestClient
from kombu.exceptions import OperationalError

from kmsq.gateway import GatewaySettings, create_app
from schemas.limits import MAX_HTTP_BODY_BYTES
from tasks.client import KmsError

BODY = {"prv": "xprv-unit", "pub": "xpub-unit", "coin": "btc", "source": "user", "type": "tss"}


class StandIn:
    """Answers every operation with what ``outcome`` produces: a finished future, a pending one, or a raise."""

    timeout = 0.3

    def __init__(self) -> None:
        self.outcome: Callable[[], Future[dict[str, Any]]] = self.pending
        self.calls = 0

    @staticmethod
    def pending() -> Future[dict[str, Any]]:
        return Future()

    def pool_for(self, root_key_id: str | None) -> str:
        return "default"

    def call(self, op: str, fields: dict[str, Any], pool: str | None = None) -> Future[dict[str, Any]]:
        self.calls += 1
        return self.outcome()


def failing(error: Exception) -> Callable[[], Future[dict[str, Any]]]:
    def outcome() -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        future.set_exception(error)
        return future

    return outcome


@pytest.fixture
def kms() -> StandIn:
    return StandIn()


@pytest.fixture
def http(kms: StandIn) -> Iterator[TestClient]:
    app = create_app(kms, GatewaySettings(timeout=0.3))  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def answer(response: Any, status: int) -> str:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"message"}
    return str(response.json()["message"])


@pytest.mark.parametrize(
    ("code", "status"),
    [("invalid", 400), ("not_found", 404), ("conflict", 409), ("unavailable", 503), ("forbidden", 500),
     ("unauthenticated", 500), ("expired", 500), ("replayed", 500), ("internal", 500)],
)  # fmt: skip
def test_reply_codes(kms: StandIn, http: TestClient, code: str, status: int) -> None:
    kms.outcome = failing(KmsError(code, f"the worker said {code}", "r-1"))
    message = answer(http.post("/key", json=BODY), status)
    assert message == (f"the worker said {code}" if status != 500 else "internal error")


def test_rate_limited_is_429_with_retry_after(kms: StandIn, http: TestClient) -> None:
    kms.outcome = failing(KmsError("rate_limited", "over the caller's requests per second quota", "r-1", 2.2))
    response = http.post("/key", json=BODY)
    assert answer(response, 429) == "rate limited: retry later"
    assert response.headers["Retry-After"] == "3"  # whole seconds, rounded up
    kms.outcome = failing(KmsError("rate_limited", "over", "r-2", 0.01))
    assert http.post("/key", json=BODY).headers["Retry-After"] == "1"


def test_no_answer_in_time_is_503(kms: StandIn, http: TestClient) -> None:
    assert answer(http.post("/generateDataKey", json={}), 503) == "no worker answered in time"


def test_broker_down_is_503(kms: StandIn, http: TestClient) -> None:
    def down() -> Future[dict[str, Any]]:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    kms.outcome = down
    assert answer(http.post("/decryptDataKey", json={"encryptedKey": "kmsq:v1:AAAA"}), 503) == "broker unavailable"


def test_bodies_over_the_limit_never_reach_kmsq(kms: StandIn, http: TestClient) -> None:
    big = b'{"prv": "' + b"x" * MAX_HTTP_BODY_BYTES + b'"}'
    assert answer(http.post("/key", content=big), 400) == "request body exceeds 8388608 bytes"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield big

    assert answer(http.post("/key", content=chunked()), 400) == "request body exceeds 8388608 bytes"
    assert answer(http.post("/key", content=b"{}", headers={"content-length": "x"}), 400)
    assert kms.calls == 0
