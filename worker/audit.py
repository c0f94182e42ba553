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


@dataclass
class _Pending:
    count: int
    last_request_id: str


class RejectionCounter:
    """Refusals of one process, added up in memory and written at most once per ``interval`` seconds (by a
    timer thread, or by the refusal that finds the interval over). Thread-safe."""

    def __init__(self, sessions: sessionmaker[Session], hsm: KeyStore | None = None, interval: float = 1.0) -> None:
        self.sessions = sessions
        self.hsm = hsm  # appends each written count to the pool's audit chain (worker.audit_log); None: not
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: dict[tuple[Any, ...], _Pending] = {}
        self._timer: threading.Timer | None = None

    def add(self, pool: str, caller: str, op: str, code: str, reason: str, request_id: uuid.UUID) -> None:
        """Counts one refusal in the current minute; written within ``interval`` seconds."""
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        key = (minute, pool, printable(caller), printable(op), code, printable(reason))
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                if len(self._pending) >= MAX_PENDING_ROWS:
                    log.warning("dropped a rejection count: %d rows are waiting for the database", MAX_PENDING_ROWS)
                    return
                entry = self._pending[key] = _Pending(0, "")
            entry.count += 1
            entry.last_request_id = str(request_id)
            if self._timer is None:
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
                if self._timer is None:
                    self._timer = threading.Timer(max(self.interval, 5.0), self.flush)
                    self._timer.daemon = True
                    self._timer.start()
            return
        log.debug("wrote %d rejection counts in %.3f s", len(rows), time.monotonic() - started)
