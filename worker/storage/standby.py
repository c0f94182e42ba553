"""How the database is replicated, as the primary reports it (``kmsq status``, ``kmsq worker`` at start).

A commit is safe from the loss of the primary only when a synchronous standby confirmed it before the primary
answered: ``synchronous_standby_names`` names the standbys, ``synchronous_commit`` is ``on``, ``remote_write`` or
``remote_apply``, and ``pg_stat_replication`` shows a standby streaming as ``sync`` (or ``quorum``). With an
asynchronous standby, a primary killed after a commit the standby did not yet receive, then a promoted standby,
loses that commit although the caller was told it was done (docs/RELIABILITY.md, "Postgres failover").
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

SAFE_COMMIT_LEVELS = ("on", "remote_write", "remote_apply")


@dataclass(frozen=True)
class DatabaseReplication:
    """The database's replication as its primary reports it.

    ``mode`` is ``sync`` (a commit waits for a synchronous standby that is streaming), ``async`` (standbys stream,
    none synchronously), ``none`` (no standby), ``waiting`` (standbys are named synchronous but none streams: a
    commit waits until one does), ``sqlite`` (a file: no replication) or ``unknown`` (the primary did not say:
    reading ``pg_stat_replication`` needs the ``pg_monitor`` role or a superuser)."""

    mode: str
    standbys: tuple[str, ...] = ()  # application_name:sync_state of each standby streaming now
    synchronous_commit: str = ""
    detail: str = ""

    def line(self) -> str:
        """One line for a person: the mode and what it means."""
        meaning = {
            "sync": "a commit is confirmed by a synchronous standby before the caller is answered",
            "async": "a primary lost right after a commit can take that commit with it",
            "none": "no standby: losing the primary's disk loses the database",
            "waiting": "synchronous standbys are named but none streams: commits wait until one does",
            "sqlite": "a file on this host: no replication",
            "unknown": "the primary did not say",
        }[self.mode]
        extra = f" ({', '.join(self.standbys)})" if self.standbys else ""
        note = f"; {self.detail}" if self.detail else ""
        return f"database replication: {self.mode}{extra}: {meaning}{note}"


def replication_of(engine: Engine) -> DatabaseReplication:
    """Asks the primary behind ``engine`` how it is replicated. Returns ``unknown`` (with the reason in
    ``detail``) when it cannot tell; raises SQLAlchemy's OperationalError when the database cannot be reached."""
    if engine.dialect.name == "sqlite":
        return DatabaseReplication("sqlite")
    if engine.dialect.name != "postgresql":
        return DatabaseReplication("unknown", detail=f"a {engine.dialect.name} database")
    with engine.connect() as conn:
        names = str(conn.execute(text("SHOW synchronous_standby_names")).scalar() or "").strip()
        level = str(conn.execute(text("SHOW synchronous_commit")).scalar() or "")
        try:
            rows = conn.execute(text(
                "SELECT application_name, state, sync_state FROM pg_stat_replication"
            )).all()  # fmt: skip
        except SQLAlchemyError as e:
            return DatabaseReplication("unknown", synchronous_commit=level, detail=type(e).__name__)
    if any(row.state is None for row in rows):  # rows without their columns: the role may not read them
        return DatabaseReplication("unknown", synchronous_commit=level,
                                   detail="pg_stat_replication needs the pg_monitor role")  # fmt: skip
    streaming = [row for row in rows if row.state == "streaming"]
    standbys = tuple(f"{row.application_name}:{row.sync_state}" for row in streaming)
    synchronous = [row for row in streaming if row.sync_state in ("sync", "quorum")]
    waits = bool(names) and level in SAFE_COMMIT_LEVELS
    if waits and synchronous:
        return DatabaseReplication("sync", standbys, level)
    if waits:
        return DatabaseReplication("waiting", standbys, level)
    if streaming:
        detail = f"synchronous_commit is {level}" if names else "synchronous_standby_names is empty"
        return DatabaseReplication("async", standbys, level, detail)
    return DatabaseReplication("none", (), level)
