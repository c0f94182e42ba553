"""Sharing a pool, in process: the token buckets of worker.quotas on Postgres and SQLite (what passes, what waits,
how long, shared by concurrent takers), a caller's lane and quotas as policy fields (covered once set, restricted
by one operator, loosened only by the quorum), the ``rate_limited`` reply on the wire, and the client's lane."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from schemas.messages import ErrorBody, Reply
from schemas.wire import lane_of_queue, pool_queue
from tasks.backoff import CAREFUL_SECONDS, Backoff
from tests.test_approvals import ALICE, BOB, _adopted, _caller, _seal, _verifies
from worker import quotas
from worker.approvals import QuorumRequired
from worker.policy_rows import mac_input, policy_fields
from worker.storage.models import RateBucket, RequestRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_holds_one_second_and_refills(sessions: sessionmaker[Session]) -> None:
    clock, quota = Clock(), quotas.Quota(requests=5)
    taken = [quotas.take(sessions, "p", "c", quota, 1, clock) for _ in range(7)]
    assert taken[:5] == [None] * 5
    refused = taken[5]
    assert refused is not None and refused.what == "requests" and refused.retry_after == pytest.approx(0.2)
    clock.now += 0.2  # one token back
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is None
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is not None
    clock.now += 60  # never more than a full bucket
    assert [quotas.take(sessions, "p", "c", quota, 1, clock) is None for _ in range(6)] == [True] * 5 + [False]
    # another caller, and the same caller in another pool, have buckets of their own
    assert quotas.take(sessions, "p", "d", quota, 1, clock) is None
    assert quotas.take(sessions, "q", "c", quota, 1, clock) is None


def test_a_batch_larger_than_the_bucket_passes_full_and_leaves_a_debt(sessions: sessionmaker[Session]) -> None:
    clock, quota = Clock(), quotas.Quota(items=100)
    assert quotas.take(sessions, "p", "c", quota, 1000, clock) is None  # a full bucket takes it
    refused = quotas.take(sessions, "p", "c", quota, 1, clock)
    assert refused is not None and refused.what == "items" and refused.retry_after == pytest.approx(9.01)
    clock.now += 9.0
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is not None  # 0.99 of 1 item back
    clock.now += 0.02
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is None


def test_a_refused_take_takes_nothing_from_either_bucket(sessions: sessionmaker[Session]) -> None:
    clock, quota = Clock(), quotas.Quota(requests=10, items=10)
    assert quotas.take(sessions, "p", "c", quota, 10, clock) is None  # the items bucket is empty now
    for _ in range(5):
        refused = quotas.take(sessions, "p", "c", quota, 1, clock)
        assert refused is not None and refused.what == "items"
    with sessions() as db:
        bucket = db.scalars(select(RateBucket)).one()
        assert (bucket.requests, bucket.items) == (9.0, 0.0)  # one request taken, by the one that passed


def test_a_clock_behind_adds_nothing(sessions: sessionmaker[Session]) -> None:
    clock, quota = Clock(), quotas.Quota(requests=1)
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is None
    clock.now -= 30  # another worker's clock, behind
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is not None
    clock.now += 30.5
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is not None  # half a token since the bucket's time
    clock.now += 0.5
    assert quotas.take(sessions, "p", "c", quota, 1, clock) is None


def test_concurrent_takers_share_the_bucket(sessions: sessionmaker[Session]) -> None:
    """Eight threads (eight connections) take from one bucket at one moment: exactly its size passes."""
    clock, quota = Clock(), quotas.Quota(requests=20)
    passed: list[bool] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(10):
            ok = quotas.take(sessions, "p", "c", quota, 1, clock) is None
            with lock:
                passed.append(ok)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passed) == 80 and sum(passed) == 20


@pytest.fixture
def db(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        yield session


def test_lane_and_quotas_are_covered_once_set() -> None:
    row = _caller()
    before = mac_input(row)
    row.lane = "auto"
    assert mac_input(row) == before  # the rows sealed before quotas existed keep their MACs
    row.lane, row.rate_requests, row.rate_items = "bulk", 50.0, 2000.0
    fields = dict(policy_fields(row)[1])
    assert (fields["lane"], fields["rate_requests"], fields["rate_items"]) == ("bulk", "50.0", "2000.0")
    row.rate_items = 2001.0
    assert fields["rate_items"] != dict(policy_fields(row)[1])["rate_items"]


def test_one_operator_sets_and_lowers_quotas_only_the_quorum_raises_or_removes_them(db: Session) -> None:
    _adopted(db)
    row = _caller()
    _seal(db, row, ALICE, BOB)
    row.rate_requests = 100.0
    _seal(db, row, ALICE)  # a quota set: a restriction
    row.rate_requests, row.lane = 10.0, "bulk"
    _seal(db, row, BOB)  # lowered, and moved to the bulk lane
    row.rate_items = 500.0
    _seal(db, row, ALICE)
    assert _verifies(db, row)
    for loosen in ({"rate_requests": 11.0}, {"rate_requests": None}, {"rate_items": None}, {"lane": "auto"}):
        saved = {k: getattr(row, k) for k in loosen}
        for k, v in loosen.items():
            setattr(row, k, v)
        with pytest.raises(QuorumRequired):
            _seal(db, row, BOB)
        for k, v in saved.items():
            setattr(row, k, v)
    row.rate_requests, row.lane = None, "auto"
    _seal(db, row, ALICE, BOB)  # the quorum may
    assert _verifies(db, row)


def _reply(error: ErrorBody) -> dict[str, object]:
    reply = Reply(v=1, request_id=uuid.uuid4(), caller="c", op="sign", status="error", result={}, sealed={},
                  error=error, pool="p", worker_key_id="k", issued_at=datetime.now(UTC),
                  request_digest="d")  # fmt: skip
    return json.loads(json.dumps(reply.model_dump(mode="json")))  # type: ignore[no-any-return]


def test_only_rate_limited_replies_carry_a_wait() -> None:
    """Every other error reply is as before (an older caller's strict model takes it); rate_limited says how long."""
    plain = _reply(ErrorBody(code="forbidden", message="not allowed"))
    assert plain["error"] == {"code": "forbidden", "message": "not allowed"}
    limited = _reply(ErrorBody(code="rate_limited", message="over", retry_after=0.25))
    assert limited["error"] == {"code": "rate_limited", "message": "over", "retry_after": 0.25}
    assert Reply.model_validate_json(json.dumps(limited)).error == ErrorBody(
        code="rate_limited", message="over", retry_after=0.25
    )
    with pytest.raises(ValueError):
        ErrorBody(code="rate_limited", message="over", retry_after=-1)


def test_lanes_are_queues_of_the_pool() -> None:
    assert pool_queue("alpha") == "kms.alpha" and pool_queue("alpha", "bulk") == "kms.alpha.bulk"
    assert lane_of_queue("kms.alpha.bulk") == "bulk" and lane_of_queue("kms.alpha") == "interactive"
    with pytest.raises(ValueError):
        pool_queue("alpha", "fast")


def test_a_client_waits_then_tries_the_quota_one_request_at_a_time() -> None:
    clock = Clock()
    backoff = Backoff(clock)
    assert backoff.admit("p") == (None, False)  # nothing refused yet: everything goes
    backoff.refused("p", 0.25)
    wait, trying = backoff.admit("p")
    assert wait == pytest.approx(0.25) and not trying
    assert backoff.admit("q") == (None, False)  # another pool is not held back
    clock.now += 0.25
    assert backoff.admit("p") == (None, True)  # one request tries the quota...
    wait, trying = backoff.admit("p")
    assert wait == pytest.approx(0.25) and not trying  # ...the others wait for its answer
    backoff.tried("p")
    assert backoff.admit("p")[0] == pytest.approx(0.25)  # answered: the next one tries a refill later
    clock.now += 0.25
    assert backoff.admit("p") == (None, True)
    backoff.refused("p", 0.1)
    backoff.tried("p")
    assert backoff.admit("p")[0] == pytest.approx(0.1)  # refused again: wait again
    clock.now += 0.1 + CAREFUL_SECONDS
    assert backoff.admit("p") == (None, False)  # a careful second without a refusal: back to normal
    assert backoff.admit("p") == (None, False)


def test_a_stored_reply_is_found_by_the_take_that_refuses(sessions: sessionmaker[Session]) -> None:
    """A redelivered request over the quota: the refusal says it was answered (one statement, no second query)."""
    clock, quota = Clock(), quotas.Quota(requests=1)
    with sessions.begin() as db:
        db.add(RequestRecord(caller="c", request_id="r-1", request_hash="h", op="sign", status="ok", reply="{}",
                             expires_at=datetime.now(UTC)))  # fmt: skip
    assert quotas.take(sessions, "p", "c", quota, 1, clock, request_id="r-0") is None
    refused = quotas.take(sessions, "p", "c", quota, 1, clock, request_id="r-1")
    assert refused is not None and refused.answered
    again = quotas.take(sessions, "p", "c", quota, 1, clock, request_id="r-2")
    assert again is not None and not again.answered
    assert quotas.take(sessions, "p", "d", quota, 1, clock, request_id="r-1") is None  # another caller's id
