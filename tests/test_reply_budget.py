"""Issue 22, item 3: a batch of large get_key replies no longer fails for everyone in it. The worker answers the
items past the reply's budget (schemas.limits.MAX_REPLY_SECRET_BYTES, the one limit the worker seals and the
caller opens) ``too_large`` and refuses a (pub, source) asked twice; the coalescer asks equal reads once and
sends an item its batch could not answer again, alone. Observed before: a 1 MiB key asked 40 times in one
get_keys made the worker open and seal 40 MiB and answer ``internal``, and through the gateway 6 of 10
bystanders' GETs coalesced with those got 500."""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest

from schemas.limits import MAX_PRV_BYTES, MAX_REPLY_SECRET_BYTES
from schemas.operations import OPERATIONS
from tasks.client import KmsClient, KmsError, RequestFuture
from tasks.coalesce import CoalescePolicy, Coalescer
from tests.queue_fixtures import Deployment
from tests.unit_fixtures import Unit, answer
from worker import batch

GET_KEY = OPERATIONS["get_key"]


def _big_prv() -> str:
    return base64.b64encode(os.urandom(MAX_PRV_BYTES * 3 // 4)).decode()  # exactly 1 MiB of base64


def _store(unit: Unit, full: Any, pub: str, prv: str) -> None:
    request_id = uuid.uuid4()
    params, _ = full.put_key_params(pub, prv, "btc", "user", "tss", None, request_id)
    request, args = full.build_request(params, "alpha", request_id)
    answer(full, unit.handle_args(request, args))


@pytest.mark.unit
def test_a_get_keys_past_its_budget_answers_too_large_and_the_rest_succeed(
    unit: Unit, full: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's budget, made small (64 KiB; 8 MiB in service) so that keys of 10,000 characters fill it."""
    budget, size = 64 * 1024, 10_000
    monkeypatch.setattr(batch, "MAX_REPLY_SECRET_BYTES", budget)
    count = budget // size + 2
    prvs = {f"xpub-budget-{i}": "x" * (size - 10) + f"{i:010d}" for i in range(count)}
    for pub, prv in prvs.items():
        _store(unit, full, pub, prv)
    _store(unit, full, "xpub-small", "xprv-small")
    keys = [{"pub": pub, "source": "user"} for pub in [*prvs, "xpub-small"]]
    opened: list[int] = []
    real_open = unit.service.hsm.open

    def counted_open(*args: Any) -> Any:
        opened.append(1)
        return real_open(*args)

    monkeypatch.setattr(unit.service.hsm, "open", counted_open)
    items = answer(full, unit.deliver(full, {"op": "get_keys", "keys": keys}))["items"]
    fit = budget // (size + 3)  # each key's JSON: its characters, two quotes and a comma
    assert [i.get("prv") for i in items[:fit]] == list(prvs.values())[:fit]  # within the budget
    too_large = {
        "error": "too_large",
        "message": "this item's answer does not fit in the batch's reply: ask for it alone",
    }
    assert items[fit:count] == [too_large] * (count - fit)
    assert items[-1]["prv"] == "xprv-small"  # a small one after them still fits
    assert len(opened) == len(keys) - (count - fit)  # refused by its stored size, before it is opened
    alone = answer(full, unit.deliver(full, {"op": "get_key", "pub": list(prvs)[-1], "source": "user"}))
    assert alone["prv"] == list(prvs.values())[-1]  # asked alone it fits


@pytest.mark.unit
def test_the_budget_holds_seven_full_size_keys(unit: Unit, full: Any) -> None:
    """In service: 8 MiB hold seven private keys of the largest size (1 MiB of base64 each) and their JSON."""
    assert (MAX_REPLY_SECRET_BYTES - 2) // (MAX_PRV_BYTES + 3) == 7


@pytest.mark.unit
def test_a_get_keys_naming_a_key_twice_refuses_the_repeat(unit: Unit, full: Any) -> None:
    _store(unit, full, "xpub-twice", "xprv-twice")
    keys = [{"pub": "xpub-twice", "source": "user"}] * 40
    items = answer(full, unit.deliver(full, {"op": "get_keys", "keys": keys}))["items"]
    assert items[0]["prv"] == "xprv-twice"
    assert items[1:] == [{"error": "invalid", "message": "this pub and source are asked for more than once in "
                                                         "the batch"}] * 39  # fmt: skip


@pytest.mark.unit
def test_a_sealed_reply_field_past_the_limit_does_not_open() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from schemas.wire import WireError, open_reply_secret, seal_reply_secret

    key, request_id = X25519PrivateKey.generate(), uuid.uuid4()
    fits = seal_reply_secret(key.public_key(), request_id, "items", b"x" * MAX_REPLY_SECRET_BYTES)
    assert len(open_reply_secret(key, request_id, "items", fits)) == MAX_REPLY_SECRET_BYTES
    over = seal_reply_secret(key.public_key(), request_id, "items", b"x" * (MAX_REPLY_SECRET_BYTES + 1))
    with pytest.raises(WireError):
        open_reply_secret(key, request_id, "items", over)


class Sender:
    """Records each message; answers batches with ``answer`` (items by value) and single ones by value."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.sent: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def call(
        self, op: str, fields: dict[str, Any], pool: str | None = None, *, lane: str | None = None,
        backoff: bool = True,
    ) -> RequestFuture:  # fmt: skip
        with self.lock:
            self.sent.append((op, fields.get("keys")))
        future = RequestFuture(f"batch-{len(self.sent)}")
        outcome = self.answer(fields["keys"])
        (future.set_exception if isinstance(outcome, Exception) else future.set_result)(outcome)
        return future

    def alone(self, pub: str) -> RequestFuture:
        with self.lock:
            self.sent.append(("get_key", pub))
        future = RequestFuture(f"single-{pub}")
        future.set_result({"prv": f"prv-of-{pub}", "pub": pub, "coin": "btc", "source": "user", "type": "tss"})
        return future


def _coalesced(answer: Any, pubs: list[str]) -> tuple[Sender, list[RequestFuture]]:
    sender = Sender(answer)
    coalescer = Coalescer(cast(KmsClient, sender), CoalescePolicy(linger=0.05))
    blocker = RequestFuture("in-flight")
    coalescer.submit(GET_KEY, "alpha", {"op": "get_key", "pub": "first", "source": "user"}, lambda: blocker)
    futures = [
        coalescer.submit(GET_KEY, "alpha", {"op": "get_key", "pub": pub, "source": "user"},
                         lambda pub=pub: sender.alone(pub))  # type: ignore[misc]
        for pub in pubs
    ]  # fmt: skip
    deadline = time.monotonic() + 5
    while not all(f.done() for f in futures):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    blocker.set_result({})
    coalescer.close()
    return sender, futures


def _item(pub: str) -> dict[str, str]:
    return {"prv": f"prv-of-{pub}", "pub": pub, "coin": "btc", "source": "user", "type": "tss"}


@pytest.mark.unit
def test_the_coalescer_asks_equal_reads_once() -> None:
    sender, futures = _coalesced(lambda keys: {"items": [_item(k["pub"]) for k in keys]}, ["a", "b", "a", "a"])
    assert [op for op, _ in sender.sent] == ["get_keys"]
    assert sender.sent[0][1] == [{"pub": "a", "source": "user"}, {"pub": "b", "source": "user"}]
    assert [f.result()["pub"] for f in futures] == ["a", "b", "a", "a"]


@pytest.mark.unit
def test_an_item_too_large_for_its_batch_is_asked_again_alone() -> None:
    def answer(keys: list[dict[str, str]]) -> dict[str, Any]:
        return {"items": [_item(k["pub"]) if k["pub"] != "big" else {"error": "too_large", "message": "alone"}
                          for k in keys]}  # fmt: skip

    sender, futures = _coalesced(answer, ["big", "small"])
    assert [f.result()["prv"] for f in futures] == ["prv-of-big", "prv-of-small"]
    assert ("get_key", "big") in sender.sent and ("get_key", "small") not in sender.sent


@pytest.mark.unit
@pytest.mark.parametrize(("code", "again"), [("internal", True), ("invalid", True), ("unavailable", False),
                                             ("forbidden", False)])  # fmt: skip
def test_a_batch_refused_as_a_whole_is_asked_again_item_by_item_unless_its_items_share_the_refusal(
    code: str, again: bool
) -> None:
    sender, futures = _coalesced(lambda keys: KmsError(code, "the batch", "batch-1"), ["x", "y"])
    if again:
        assert [f.result()["pub"] for f in futures] == ["x", "y"]
        assert ("get_key", "x") in sender.sent and ("get_key", "y") in sender.sent
    else:
        for future in futures:
            with pytest.raises(KmsError, match=code):
                future.result()
        assert [op for op, _ in sender.sent] == ["get_keys"]


def test_40_gets_of_a_large_key_beside_bystanders_all_succeed_through_the_gateway(
    deployment: Deployment, http: httpx.Client
) -> None:
    """The issue's run: one 1 MiB key and 40 concurrent GETs of it, beside 10 GETs of small keys; every one 200."""
    big_pub, big = f"xpub-big-{uuid.uuid4().hex[:8]}", _big_prv()
    deployment.secrets.append(big[999:1095].encode())
    assert http.post("/key", json={"prv": big, "pub": big_pub, "coin": "hteth", "source": "user",
                                   "type": "tss"}).status_code == 200  # fmt: skip
    small = {f"xpub-small-{uuid.uuid4().hex[:8]}": f"xprv-{uuid.uuid4().hex}" for _ in range(10)}
    for pub, prv in small.items():
        deployment.secrets.append(prv.encode())
        assert http.post("/key", json={"prv": prv, "pub": pub, "coin": "btc", "source": "user",
                                       "type": "independent"}).status_code == 200  # fmt: skip
    asks = [big_pub] * 40 + list(small)

    def get(pub: str) -> httpx.Response:
        return http.get(f"/key/{quote(pub, safe='')}", params={"source": "user"})

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(get, asks))
    assert [a.status_code for a in answers] == [200] * len(asks), [
        a.text[:200] for a in answers if a.status_code != 200
    ]
    assert all(a.json()["prv"] == big for a in answers[:40])
    assert [a.json()["prv"] for a in answers[40:]] == list(small.values())
