"""The coalescer's grouping, on a stand-in for the client's sending methods (what goes out, when, in which
messages). What the worker answers is tested through real workers in tests/test_queue_coalesce.py."""

from __future__ import annotations

import threading
import time
from typing import Any, cast

import pytest

from schemas.operations import OPERATIONS
from tasks.client import KmsClient, KmsError, RequestFuture
from tasks.coalesce import CoalescePolicy, Coalescer

pytestmark = pytest.mark.unit
DECRYPT = OPERATIONS["decrypt_data_key"]
KEY = ("decrypt_data_key", "alpha", ())  # the operation, the pool, and the fields its batch shares (none)


class Sender:
    """Records each message; its reply is given by the test with :meth:`answer`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, RequestFuture]] = []
        self.lock = threading.Lock()

    def call(
        self, op: str, fields: dict[str, Any], pool: str | None = None, *, lane: str | None = None,
        backoff: bool = True,
    ) -> RequestFuture:  # fmt: skip
        assert pool == "alpha"
        # coalesced single requests are interactive work, each admitted by the client's back-off already
        assert lane == "interactive" and backoff is False
        future = RequestFuture(f"batch-{len(self.sent)}")
        with self.lock:
            self.sent.append((op, fields.get("encrypted_keys"), future))
        return future

    def alone(self, key: str) -> RequestFuture:
        future = RequestFuture(f"single-{key}")
        with self.lock:
            self.sent.append(("decrypt_data_key", key, future))
        return future

    def answer(self, index: int, fields: dict[str, Any] | Exception) -> None:
        future = self.sent[index][2]
        if isinstance(fields, Exception):
            future.set_exception(fields)
        else:
            future.set_result(fields)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.sent) < count:
            assert time.monotonic() < deadline, f"{len(self.sent)} messages, expected {count}"
            time.sleep(0.001)


def coalescer(sender: Sender, **policy: Any) -> Coalescer:
    return Coalescer(cast(KmsClient, sender), CoalescePolicy(**policy))


def params(key: str) -> dict[str, Any]:
    return {"op": "decrypt_data_key", "encrypted_key": key}


def submit(c: Coalescer, sender: Sender, key: str) -> RequestFuture:
    return c.submit(DECRYPT, "alpha", params(key), lambda: sender.alone(key))


def test_a_lone_request_goes_at_once_and_the_next_ones_wait_for_the_batch() -> None:
    sender = Sender()
    c = coalescer(sender, linger=0.05)
    first = submit(c, sender, "k0")
    assert [s[:2] for s in sender.sent] == [("decrypt_data_key", "k0")]  # sent before submit returned
    assert first is sender.sent[0][2]  # its own future, as without coalescing
    later = [submit(c, sender, f"k{i}") for i in (1, 2, 3)]
    assert len(c._groups[KEY].items) == 3  # they wait for company
    sender.wait_for(2)
    assert sender.sent[1][:2] == ("decrypt_data_keys", ["k1", "k2", "k3"])
    sender.answer(
        1, {"items": [{"plaintextKey": "p1"}, {"error": "invalid", "message": "bad"}, {"plaintextKey": "p3"}]}
    )
    assert later[0].result(1) == {"plaintextKey": "p1"} and later[2].result(1) == {"plaintextKey": "p3"}
    with pytest.raises(KmsError) as refused:
        later[1].result(1)
    assert (refused.value.code, refused.value.message, refused.value.request_id) == ("invalid", "bad", "batch-1")
    assert all(f.request_id == "batch-1" for f in later)
    sender.answer(0, {"plaintextKey": "p0"})
    assert first.result(1) == {"plaintextKey": "p0"}
    submit(c, sender, "k4")  # nothing in flight any more: alone, at once
    assert sender.sent[2][:2] == ("decrypt_data_key", "k4")
    c.close()


def test_groups_are_cut_at_max_items_and_max_bytes() -> None:
    sender = Sender()
    c = coalescer(sender, linger=0.5, max_items=3, max_bytes=2048)
    submit(c, sender, "first")
    [submit(c, sender, f"k{i}") for i in range(7)]
    sender.wait_for(3)
    assert [s[1] for s in sender.sent[1:]] == [["k0", "k1", "k2"], ["k3", "k4", "k5"]]  # full: sent at once
    big = "b" * 1000
    [submit(c, sender, big + str(i)) for i in range(3)]  # each ~1 KB: a second one would pass 2 KB
    sender.wait_for(5)
    assert [s[1] for s in sender.sent[3:]] == [["k6", big + "0"], big + "1"]  # a group of one goes alone
    huge = "h" * 4096  # larger than a message of the policy: alone, at once
    submit(c, sender, huge)
    sender.wait_for(6)
    assert sender.sent[-1][:2] == ("decrypt_data_key", huge)
    c.close()


def test_a_group_of_one_goes_as_the_single_operation_and_whole_batch_errors_reach_every_item() -> None:
    sender = Sender()
    c = coalescer(sender, linger=0.01)
    submit(c, sender, "first")
    lone = submit(c, sender, "second")
    sender.wait_for(2)
    assert sender.sent[1][:2] == ("decrypt_data_key", "second")
    sender.answer(1, {"plaintextKey": "p"})
    assert lone.result(1) == {"plaintextKey": "p"}
    pair = [submit(c, sender, "a"), submit(c, sender, "b")]
    sender.wait_for(3)
    sender.answer(2, KmsError("forbidden", "operation decrypt_data_key is not allowed for this caller", "batch-2"))
    for future in pair:
        with pytest.raises(KmsError, match="forbidden: operation decrypt_data_key is not allowed"):
            future.result(1)
    c.close()


def test_a_broker_failure_reaches_each_caller_of_a_batch_through_its_future() -> None:
    def down() -> RequestFuture:
        raise ConnectionError("redis://user:secret@broker:6379 refused")  # its text stays in this process

    sender = Sender()
    c = coalescer(sender, linger=0.01)
    submit(c, sender, "first")  # in flight: the next one waits for a batch, sent by the sender thread
    future = c.submit(DECRYPT, "alpha", params("k"), down)
    with pytest.raises(KmsError) as refused:
        future.result(5)
    assert (refused.value.code, refused.value.message) == ("unavailable", "broker unavailable")
    with pytest.raises(ConnectionError):  # alone, on the caller's thread: raised as without coalescing
        coalescer(Sender()).submit(DECRYPT, "alpha", params("k"), down)
    c.close()


def test_closing_fails_what_waits_and_refuses_more() -> None:
    sender = Sender()
    c = coalescer(sender, linger=1)
    submit(c, sender, "first")
    waiting = submit(c, sender, "second")
    c.close()
    with pytest.raises(KmsError, match="no reply"):
        waiting.result(1)
    with pytest.raises(KmsError, match="closed"):
        submit(c, sender, "third")


def test_policy_bounds() -> None:
    with pytest.raises(ValueError, match="coalescing needs"):
        CoalescePolicy(max_items=0)
    with pytest.raises(ValueError, match="coalescing needs"):
        CoalescePolicy(linger=-1)
    with pytest.raises(ValueError, match="max_items <= 1000"):  # a batch message's own limit
        CoalescePolicy(max_items=1001)
    with pytest.raises(ValueError, match="max_bytes <= "):
        CoalescePolicy(max_bytes=8 * 1024 * 1024)
    with pytest.raises(ValueError, match="max_in_flight"):
        CoalescePolicy(max_in_flight=0)
    with pytest.raises(ValueError, match="max_wait <= 10 s"):
        CoalescePolicy(max_wait=11)


def test_while_a_batch_is_out_the_next_group_waits_for_it_to_land_not_just_its_linger() -> None:
    sender = Sender()
    c = coalescer(sender, linger=0.01, max_in_flight=1, max_wait=5)
    submit(c, sender, "first")  # alone, in flight
    submit(c, sender, "k0")
    submit(c, sender, "k1")
    sender.wait_for(2)  # no batch out: after its linger, as a batch
    assert sender.sent[1][:2] == ("decrypt_data_keys", ["k0", "k1"])
    submit(c, sender, "k2")
    time.sleep(0.2)  # twenty lingers: still waiting for the batch, and gathering
    submit(c, sender, "k3")
    assert len(sender.sent) == 2 and len(c._groups[KEY].items) == 2
    sender.answer(1, {"items": [{"plaintextKey": "p0"}, {"plaintextKey": "p1"}]})  # it lands: the group goes
    sender.wait_for(3)
    assert sender.sent[2][:2] == ("decrypt_data_keys", ["k2", "k3"])
    c.close()


def test_single_messages_hold_nothing_back() -> None:
    """Two or three concurrent callers go in parallel as before: only batch messages make a group wait."""
    sender = Sender()
    c = coalescer(sender, linger=0.01, max_in_flight=1, max_wait=5)
    submit(c, sender, "first")  # alone, never answered
    began = time.monotonic()
    submit(c, sender, "second")
    sender.wait_for(2)
    assert sender.sent[1][:2] == ("decrypt_data_key", "second") and time.monotonic() - began < 2
    submit(c, sender, "third")  # two singles out: still no batch
    sender.wait_for(3)
    assert sender.sent[2][:2] == ("decrypt_data_key", "third")
    c.close()


def test_a_group_goes_at_max_wait_when_nothing_lands_and_at_once_when_full() -> None:
    sender = Sender()
    c = coalescer(sender, linger=0.001, max_in_flight=1, max_wait=0.3, max_items=3)
    submit(c, sender, "first")
    submit(c, sender, "k0")
    submit(c, sender, "k1")
    sender.wait_for(2)  # a batch, never answered: a stuck worker
    began = time.monotonic()
    submit(c, sender, "k2")
    sender.wait_for(3)
    waited = time.monotonic() - began
    assert sender.sent[2][:2] == ("decrypt_data_key", "k2") and waited >= 0.25  # alone, at its last call
    [submit(c, sender, f"k{i}") for i in (3, 4, 5)]
    sender.wait_for(4)  # full: at once, busy or not
    assert sender.sent[3][:2] == ("decrypt_data_keys", ["k3", "k4", "k5"])
    c.close()


def test_max_in_flight_batches_go_out_before_a_group_waits() -> None:
    sender = Sender()
    c = coalescer(sender, linger=0.01, max_in_flight=2, max_wait=5)
    submit(c, sender, "first")
    for pair in (("k0", "k1"), ("k2", "k3")):  # two batches out, one after the other
        for key in pair:
            submit(c, sender, key)
        sender.wait_for(len(sender.sent) + 1)
    submit(c, sender, "k4")
    time.sleep(0.2)
    assert len(sender.sent) == 3  # two batches out: it waits
    sender.answer(1, {"items": [{"plaintextKey": "p0"}, {"plaintextKey": "p1"}]})
    sender.wait_for(4)
    assert sender.sent[3][:2] == ("decrypt_data_key", "k4")
    c.close()
