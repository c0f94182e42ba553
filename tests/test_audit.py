"""Refusals are added up per minute and row in memory and written at most once a second (Postgres and
SQLite): a flood adds counts, not rows, and a database outage loses nothing the process still holds."""

from __future__ import annotations

import time
import uuid

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from worker.audit import RejectionCounter
from worker.storage.db import session_factory
from worker.storage.models import RejectionCount


def rows(sessions: sessionmaker[Session]) -> list[RejectionCount]:
    with sessions() as db:
        return list(db.scalars(select(RejectionCount).order_by(RejectionCount.reason, RejectionCount.minute)))


def test_a_flood_becomes_a_count_per_row(sessions: sessionmaker[Session]) -> None:
    counter = RejectionCounter(sessions, interval=0.2)
    last = uuid.uuid4()
    for i in range(1000):
        counter.add("alpha", "?", "put_key", "unauthenticated", "unknown caller", last if i == 999 else uuid.uuid4())
    counter.add("alpha", "full\x00", "put_key", "unauthenticated", "bad signature", last)
    deadline = time.monotonic() + 10
    while len(rows(sessions)) < 2 and time.monotonic() < deadline:  # the timer writes them
        time.sleep(0.05)
    written = rows(sessions)
    assert [(r.caller, r.reason, r.count) for r in written] == [
        ("full?", "bad signature", 1), ("?", "unknown caller", 1000)
    ]  # fmt: skip
    assert written[1].last_request_id == str(last)
    counter.add("alpha", "?", "put_key", "unauthenticated", "unknown caller", uuid.uuid4())
    counter.flush()
    # Added to the same row, or to the next minute's when the clock crossed a minute meanwhile (a CI run did).
    after = [(r.caller, r.count) for r in rows(sessions)]
    assert after in ([("full?", 1), ("?", 1001)], [("full?", 1), ("?", 1000), ("?", 1)]), after


def test_counts_wait_out_a_database_outage(sessions: sessionmaker[Session]) -> None:
    down = session_factory(create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none"))
    counter = RejectionCounter(down, interval=60)
    for _ in range(3):
        counter.add("alpha", "?", "get_key", "invalid", "oversized body", uuid.uuid4())
    counter.flush()  # fails: kept
    counter.sessions = sessions  # the database is back
    counter.flush()
    assert [(r.reason, r.count) for r in rows(sessions)] == [("oversized body", 3)]


def test_a_closed_counter_writes_once_and_leaves_no_timer(sessions: sessionmaker[Session]) -> None:
    """A context that is done closes its counter: the counts are written then, and nothing is retried later on
    another test's (or process's) time: a unit test's counter whose database was gone used to log a failed write
    every 5 s into the tests after it (a fresh-clone CI run of tests/test_rejection_cost.py)."""
    counter = RejectionCounter(sessions, interval=60)
    counter.add("alpha", "c", "generate_data_key", "unauthenticated", "unknown caller", uuid.uuid4())
    counter.close()
    assert [(r.reason, r.count) for r in rows(sessions)] == [("unknown caller", 1)]
    counter.add("alpha", "c", "generate_data_key", "unauthenticated", "unknown caller", uuid.uuid4())
    assert counter._timer is None  # nothing will write, or fail, later
