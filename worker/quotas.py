"""Quotas per caller (docs/OPERATIONS.md, "Sharing a pool"): a caller's requests and items per second, as two token
buckets in the database that every worker of a pool takes from.

A bucket holds at most one second of its rate (at least one token) and refills continuously. A request passes when
each bucket holds its cost, or a full bucket's worth when its cost is larger (a batch of 1,000 items against 100
items per second passes when the bucket is full, and leaves it 900 in debt: the caller's next requests wait
until it has refilled, so the rate holds over time). A request that does not pass takes nothing from either
bucket. One statement takes from both, atomically (an ``UPDATE … RETURNING`` whose values are computed from the
row's old ones), in a transaction of its own: a worker never holds a caller's bucket while it serves the request.
The clock is each worker's own (``time.time()``); a bucket's time never goes back, so a worker whose clock is
behind adds nothing.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, Engine, Float, Table, and_, bindparam, case, exists, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import Insert, ReturningUpdate

from schemas.limits import MAX_RETRY_AFTER_SECONDS
from worker.storage.db import autocommit, transaction
from worker.storage.models import Caller, RateBucket, RequestRecord

BURST_SECONDS = 1.0  # a bucket holds this many seconds of its rate
EPSILON = 1e-6  # tokens: a refill of rate * elapsed falls short of a whole token by rounding


@dataclass(frozen=True)
class Quota:
    """A caller's rates per second; None: no quota of that kind."""

    requests: float | None = None
    items: float | None = None

    @classmethod
    def of(cls, caller: Caller) -> Quota | None:
        """The caller's quota, or None when it has none (nothing to take)."""
        if caller.rate_requests is None and caller.rate_items is None:
            return None
        return cls(caller.rate_requests, caller.rate_items)


@dataclass(frozen=True)
class Refusal:
    """A take that did not pass: the seconds until it would, which quota refused it, and whether the request was
    answered already (its record exists: a redelivery, which gets its stored reply instead)."""

    retry_after: float
    what: str  # "requests" or "items"
    answered: bool = False


def capacity(rate: float) -> float:
    """A bucket's size for ``rate`` per second: BURST_SECONDS of it, at least one token."""
    return max(rate * BURST_SECONDS, 1.0)


def take(
    sessions: sessionmaker[Session],
    pool: str,
    caller: str,
    quota: Quota,
    items: int,
    clock: Callable[[], float] = time.time,
    *,
    request_id: str = "",
    open_transaction: Session | None = None,
) -> Refusal | None:
    """Takes one request and ``items`` items from ``caller``'s buckets in ``pool``: one statement in a
    transaction of its own (on SQLite, in ``open_transaction`` when given: SQLite has one writer at a time, and a
    second transaction would wait for the one the worker holds). Returns None when they were taken, else the
    :class:`Refusal` (nothing was taken; it says whether ``caller`` has a record of ``request_id``). Raises what the
    database raises (TransientError when it is down)."""
    rates = (quota.requests or 0.0, quota.items or 0.0)
    costs = (1.0 if quota.requests else 0.0, float(items) if quota.items else 0.0)
    caps = tuple(capacity(r) if r else 0.0 for r in rates)
    nonce = secrets.token_hex(8)
    needs = (min(costs[0], caps[0]), min(costs[1], caps[1]))
    values: dict[str, Any] = {"b_pool": pool, "b_caller": caller, "b_request": request_id, "now": clock(),
              "nonce": nonce,
              "rate_r": rates[0], "rate_i": rates[1], "cost_r": costs[0], "cost_i": costs[1],
              "cap_r": caps[0], "cap_i": caps[1],
              "need_r": needs[0] - EPSILON, "need_i": needs[1] - EPSILON}  # fmt: skip
    created = {"pool": pool, "caller": caller, "requests": caps[0], "items": caps[1], "now": values["now"]}
    bind = sessions.kw.get("bind")
    if isinstance(bind, Engine) and bind.dialect.name == "sqlite":  # (its BEGIN IMMEDIATE has no autocommit)
        if open_transaction is not None:
            requests, items_left, taken, answered = _take(open_transaction, values, created)
        else:
            with transaction(sessions) as db:
                requests, items_left, taken, answered = _take(db, values, created)
    else:
        with autocommit(sessions) as connection:
            requests, items_left, taken, answered = _take(connection, values, created)
    if taken == nonce:
        return None
    waits = [
        ((needs[0] - requests) / rates[0], "requests") if rates[0] and requests < needs[0] - EPSILON else None,
        ((needs[1] - items_left) / rates[1], "items") if rates[1] and items_left < needs[1] - EPSILON else None,
    ]
    wait, what = max((w for w in waits if w is not None), default=(0.001, "requests"))
    return Refusal(min(max(wait, 0.001), MAX_RETRY_AFTER_SECONDS), what, answered)


def _take(db: Session | Connection, values: dict[str, Any], created: dict[str, Any]) -> tuple[float, float, str, bool]:
    row = db.execute(_take_statement(), values).first()
    if row is None:  # the caller's first request in this pool: full buckets
        dialect = (db.get_bind() if isinstance(db, Session) else db.engine).dialect.name
        db.execute(_create_statement(dialect), created)
        row = db.execute(_take_statement(), values).first()
    assert row is not None  # the row exists now
    return float(row[0]), float(row[1]), str(row[2]), bool(row[3])


def _least(a: ColumnElement[Any], b: ColumnElement[Any]) -> ColumnElement[Any]:
    return case((a < b, a), else_=b)


@functools.cache
def _take_statement() -> ReturningUpdate[float, float, str, bool]:
    """The take, built once: both buckets refilled for the time since ``at`` and, if each holds what it needs,
    their costs taken and the nonce written; the tokens after, the nonce of the last take that passed, and
    whether the caller has a record of the request (so that a refusal needs no second round trip)."""
    t = cast(Table, RateBucket.__table__).c
    now = bindparam("now", type_=Float())
    elapsed = case((t.at < now, now - t.at), else_=0.0)
    fill_r = _least(bindparam("cap_r"), t.requests + bindparam("rate_r") * elapsed)
    fill_i = _least(bindparam("cap_i"), t["items"] + bindparam("rate_i") * elapsed)
    passes = and_(fill_r >= bindparam("need_r"), fill_i >= bindparam("need_i"))
    answered = exists().where(RequestRecord.caller == bindparam("b_caller"),
                              RequestRecord.request_id == bindparam("b_request"))  # fmt: skip
    return (
        update(RateBucket)
        .where(RateBucket.pool == bindparam("b_pool"), RateBucket.caller == bindparam("b_caller"))
        .values(
            requests=case((passes, fill_r - bindparam("cost_r")), else_=fill_r),
            items=case((passes, fill_i - bindparam("cost_i")), else_=fill_i),
            at=case((t.at < now, now), else_=t.at),
            taken=case((passes, bindparam("nonce")), else_=t.taken),
        )
        .returning(RateBucket.requests, RateBucket.items, RateBucket.taken, answered)
    )


@functools.cache
def _create_statement(dialect: str) -> Insert:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = cast(Table, RateBucket.__table__)
    return (
        insert(table)
        .values(
            pool=bindparam("pool"),
            caller=bindparam("caller"),
            requests=bindparam("requests"),
            items=bindparam("items"),
            at=bindparam("now"),
            taken="",
        )
        .on_conflict_do_nothing(index_elements=["pool", "caller"])
    )
