"""Counting refused messages: one row per minute, pool, caller, operation, code and reason, not one per message.

A message refused before it is authenticated costs its sender nothing to make, so it must cost the pool as
little as possible and leave bounded state: one upsert (``INSERT ... ON CONFLICT DO UPDATE count = count + 1``)
in a transaction of its own, and every unknown caller counts under ``?``. Refusals of authenticated requests are stored
with their request and audited one by one (worker.pipeline).
"""

from __future__ import annotations

import functools
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Insert, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from worker.errors import TransientError
from worker.runtime import transaction
from worker.storage.models import RejectionCount

log = logging.getLogger("kmsq.worker")
UNKNOWN_CALLER = "?"
_KEY = ("minute", "pool", "caller", "op", "code", "reason")


@functools.cache
def _upsert(dialect: str) -> Insert:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(RejectionCount)
    return stmt.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={"count": RejectionCount.count + stmt.excluded.count, "last_request_id": stmt.excluded.last_request_id},
    )


def printable(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters with control characters replaced (it may come from anyone)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def count_rejection(
    sessions: sessionmaker[Session],
    pool: str,
    caller: str,
    op: str,
    code: str,
    reason: str,
    request_id: uuid.UUID,
    now: datetime | None = None,
) -> None:
    """Adds one refusal to its minute's count. A database failure is logged, never raised (the pool goes on)."""
    minute = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    values: dict[str, Any] = {
        "minute": minute, "pool": pool, "caller": printable(caller), "op": printable(op), "code": code,
        "reason": printable(reason), "count": 1, "last_request_id": str(request_id),
    }  # fmt: skip
    try:
        with transaction(sessions) as db:
            db.execute(_upsert(db.get_bind().dialect.name), values)
    except (TransientError, exc.SQLAlchemyError):
        log.warning("could not count a rejection (%s, %s)", code, printable(reason))
