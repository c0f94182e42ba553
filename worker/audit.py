"""Counting refused messages: one row per minute, pool, caller, operation, code and reason, not one per message.

A message refused before it is authenticated costs its sender nothing to make, so it must cost the pool as
little as possible and leave bounded state. A worker process adds refusals up in memory and writes them at
most once a second, one upsert (``INSERT ... ON CONFLICT DO UPDATE count = count + n``) per distinct row, and
every unknown caller counts under ``?``. Written per refusal, the upsert took 60% of a pool process's time in
a flood of bad signatures (py-spy). The price: a process killed with -9 loses at most its last second of
counts. Refusals of authenticated requests are stored with their request and audited one by one
(worker.pipeline).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Insert, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from worker import audit_log
from worker.errors import TransientError
from worker.keystore import KeyStore
from worker.storage.db import transaction
from worker.storage.models import RejectionCount

log = logging.getLogger("kmsq.worker")
UNKNOWN_CALLER = "?"
_KEY = ("minute", "pool", "caller", "op", "code", "reason")
MAX_PENDING_ROWS = 10_000  # distinct rows kept while the database cannot take them; more are dropped, logged


@functools.cache
def _upsert(dialect: str) -> Insert:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(RejectionCount)
    return stmt.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={"count": RejectionCount.count + stmt.excluded.count, "last_request_id": stmt.excluded.last_request_id},
    )


def _chain(hsm: KeyStore, db: Session, rows: list[dict[str, Any]]) -> None:
    """One audit record per count written: the refusals of a minute, by caller, operation and reason."""
    for row in sorted(rows, key=lambda r: r["pool"]):
        detail = f"{row['count']} refused in {row['minute']:%H:%M}: {row['reason']}"
        audit_log.append(
            hsm, db, row["pool"], actor=row["caller"], action=row["op"], outcome=f"rejected:{row['code']}",
            request_id=row["last_request_id"], detail=detail,
        )  # fmt: skip


def printable(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters with control characters replaced (it may come from anyone)."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


# A refusal's caller, operation and reason are few distinct texts (every unknown caller counts as ``?``; Celery
# drops a task name that is not kmsq's): each is made printable once, not once per refused message.
_printable = functools.lru_cache(maxsize=4096)(printable)


@dataclass
class _Pending:
    count: int
    last_request_id: str


class RejectionCounter:
    """Refusals of one process, added up in memory and written at most once per ``interval`` seconds (by a
    timer thread). Each write logs one line of what it wrote: the log says no more than once per interval
    what a flood was made of, and never a line per refused message. Thread-safe."""

    def __init__(self, sessions: sessionmaker[Session], hsm: KeyStore | None = None, interval: float = 1.0) -> None:
        self.sessions = sessions
        self.hsm = hsm  # appends each written count to the pool's audit chain (worker.audit_log); None: not
        self.interval = interval
        self.total = 0  # refusals counted by this process
        self._lock = threading.Lock()
        self._pending: dict[tuple[Any, ...], _Pending] = {}
        self._timer: threading.Timer | None = None
        self._closed = False
        self._minute: tuple[int, datetime] = (-1, datetime.min.replace(tzinfo=UTC))

    def close(self) -> None:
        """Writes what is pending, once, and starts no timer after (a context that is done: its database may go
        away, and a timer left behind would try it forever)."""
        with self._lock:
            timer, self._timer, self._closed = self._timer, None, True
        if timer is not None:
            timer.cancel()
        self.flush()

    def _current_minute(self) -> datetime:
        number = int(time.time() // 60)
        if number != self._minute[0]:
            self._minute = (number, datetime.fromtimestamp(number * 60, UTC))
        return self._minute[1]

    def add(self, pool: str, caller: str, op: str, code: str, reason: str, request_id: uuid.UUID) -> None:
        """Counts one refusal in the current minute; written within ``interval`` seconds."""
        key = (self._current_minute(), pool, _printable(caller), _printable(op), code, _printable(reason))
        with self._lock:
            self.total += 1
            entry = self._pending.get(key)
            if entry is None:
                if len(self._pending) >= MAX_PENDING_ROWS:
                    log.warning("dropped a rejection count: %d rows are waiting for the database", MAX_PENDING_ROWS)
                    return
                entry = self._pending[key] = _Pending(0, "")
            entry.count += 1
            entry.last_request_id = str(request_id)
            if self._timer is None and not self._closed:
                self._timer = threading.Timer(self.interval, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Writes the pending counts (one upsert per row). A database failure keeps them for the next flush."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._timer = None
        if not pending:
            return
        rows = [
            dict(zip(_KEY, key, strict=True), count=p.count, last_request_id=p.last_request_id)
            for key, p in pending.items()
        ]
        started = time.monotonic()
        try:
            with transaction(self.sessions) as db:
                db.execute(_upsert(db.get_bind().dialect.name), rows)
                if self.hsm is not None:
                    _chain(self.hsm, db, rows)
        except (TransientError, exc.SQLAlchemyError):
            log.warning("could not write %d rejection counts; keeping them for the next try", len(rows))
            with self._lock:
                for key, p in pending.items():
                    entry = self._pending.setdefault(key, _Pending(0, p.last_request_id))
                    entry.count += p.count
                if self._timer is None and not self._closed:
                    self._timer = threading.Timer(max(self.interval, 5.0), self.flush)
                    self._timer.daemon = True
                    self._timer.start()
            return
        _log_written(rows, self.total, time.monotonic() - started)


def _log_written(rows: list[dict[str, Any]], total: int, seconds: float) -> None:
    """One line for one write of the counts: how many refusals, the most frequent reasons, a request id of the
    latest (``rows`` quote what is already printable and cut)."""
    reasons: dict[tuple[str, str], int] = {}
    for row in rows:
        reasons[(row["code"], row["reason"])] = reasons.get((row["code"], row["reason"]), 0) + row["count"]
    common = sorted(reasons.items(), key=lambda item: -item[1])
    summary = ", ".join(f"{count} {reason} ({code})" for (code, reason), count in common[:4])
    if len(common) > 4:
        summary += f", {sum(count for _, count in common[4:])} for {len(common) - 4} other reasons"
    last = rows[-1]
    log.warning(
        "refused %d messages in pool %s: %s; e.g. %s %s from %s (%d refused by this process; counts written in "
        "%.3f s)", sum(r["count"] for r in rows), last["pool"], summary, last["op"], last["last_request_id"],
        last["caller"], total, seconds,
    )  # fmt: skip
