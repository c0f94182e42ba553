"""Retention: what kmsq keeps, for how long, and the pruning that removes the rest.

- A **request record** (``requests``: the idempotency key and the sealed reply) is needed while a delivery of
  the request could still run, i.e. until ``expires_at`` + clock skew (after that every delivery is refused
  as ``expired`` before it does anything), and while ``get_result`` may still be asked for the reply: a
  *grace* period more (``KMSQ_REPLY_GRACE_SECONDS``). Then it is deleted; ``get_result`` answers
  ``not_found``. That time is MACed by the worker that wrote the record (:mod:`worker.record_stamps`): a
  database writer who edits ``expires_at``, or a ``kmsq prune`` with shorter settings, cannot make a record
  go early (and with it the protection against the request running twice).
- **Audit records** (the chain of :mod:`worker.audit_log`) and **rejection counts** are kept
  ``KMSQ_AUDIT_RETENTION_SECONDS`` (0: forever). A chain's pruned prefix is replaced by a checkpoint MACed in
  the HSM, so the chain stays verifiable (:func:`worker.audit_log.verify`). The pruner checks the records it
  removes first: it never prunes away a broken link, which stays for ``kmsq audit verify`` to report.

Pruning deletes in small batches, each its own short transaction (``FOR UPDATE SKIP LOCKED`` on Postgres, so
concurrent pruners split the work instead of waiting for each other). Workers run it by themselves
(:class:`Pruner`); ``kmsq prune`` runs it by hand.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, exc, func, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from schemas.wire import MAX_REQUEST_TTL_SECONDS
from worker import audit_log
from worker.config import DEFAULT_AUDIT_RETENTION_SECONDS, DEFAULT_PRUNE_BATCH, DEFAULT_REPLY_GRACE_SECONDS, Settings
from worker.errors import ConfigError, ServiceError
from worker.keystore import KeyStore
from worker.record_stamps import StampVerifier
from worker.storage.db import transaction
from worker.storage.models import AuditCheckpoint, AuditHead, AuditRecord, RejectionCount, RequestRecord

log = logging.getLogger("kmsq.retention")

MAX_BATCHES_PER_RUN = 200  # one run stops after this many batches; the next continues


@dataclass(frozen=True)
class RetentionPolicy:
    """How long records are kept."""

    clock_skew: timedelta
    reply_grace: timedelta = timedelta(seconds=DEFAULT_REPLY_GRACE_SECONDS)
    audit_retention: timedelta | None = timedelta(seconds=DEFAULT_AUDIT_RETENTION_SECONDS)  # None: forever

    def requests_cutoff(self, now: datetime) -> datetime:
        """Request records whose ``expires_at`` is before this may be deleted, once their signed pruning time
        (:mod:`worker.record_stamps`) has passed too: these settings can keep a record longer, never shorter."""
        return now - self.clock_skew - self.reply_grace

    def audit_cutoff(self, now: datetime) -> datetime | None:
        """Audit records, events and counts from before this are deleted (None: none are)."""
        return None if self.audit_retention is None else now - self.audit_retention


def policy_of(settings: Settings) -> RetentionPolicy:
    """Returns the retention configured in ``settings``."""
    audit = settings.audit_retention_seconds
    return RetentionPolicy(
        clock_skew=timedelta(seconds=settings.clock_skew_seconds),
        reply_grace=timedelta(seconds=settings.reply_grace_seconds),
        audit_retention=timedelta(seconds=audit) if audit > 0 else None,
    )


def record_expiry(expires_at: datetime, now: datetime, clock_skew: timedelta) -> datetime:
    """The ``expires_at`` a request record keeps: the request's own, bounded by the longest a valid request
    can live from ``now`` (a refused request may name any time; a valid one never exceeds the bound)."""
    return min(expires_at, now + timedelta(seconds=MAX_REQUEST_TTL_SECONDS) + clock_skew)


@dataclass
class PruneCounts:
    """What one pruning run removed (or, as a dry run, would remove)."""

    requests: int = 0
    audit_records: dict[str, int] = field(default_factory=dict)  # per chain
    rejection_counts: int = 0
    refused_chains: dict[str, str] = field(default_factory=dict)  # chain -> why it was not pruned
    requests_refused: int = 0  # kept: their retention stamp does not verify (the row was changed)
    requests_unchecked: int = 0  # kept: signed by a fleet key this HSM cannot check (another pool's)
    requests_signed_later: int = 0  # kept past this run's settings by their signed time (a longer skew + grace)

    @property
    def total(self) -> int:
        """Every row removed."""
        return self.requests + sum(self.audit_records.values()) + self.rejection_counts

    def add(self, other: PruneCounts) -> None:
        """Adds another run's counts to these."""
        self.requests += other.requests
        for chain, count in other.audit_records.items():
            self.audit_records[chain] = self.audit_records.get(chain, 0) + count
        self.rejection_counts += other.rejection_counts
        self.refused_chains.update(other.refused_chains)
        self.requests_refused = other.requests_refused  # a run's finding, not a sum over runs
        self.requests_unchecked = other.requests_unchecked
        self.requests_signed_later = other.requests_signed_later


# -- request records ---------------------------------------------------------------------------------


@dataclass
class _RequestScan:
    """Where a run's scan of request records is (records it keeps are passed over, not read again)."""

    after: tuple[datetime, str, str] | None = None
    refused: int = 0
    unchecked: int = 0


def prune_requests(
    db: Session,
    verifier: StampVerifier,
    policy: RetentionPolicy,
    now: datetime,
    limit: int,
    scan: _RequestScan | None = None,
) -> tuple[int, int]:
    """Deletes, of the next ``limit`` request records that look expired (by ``expires_at``, and by
    ``keep_until`` where they have one), those whose signed pruning time (:mod:`worker.record_stamps`) has
    passed; rows another pruner holds are skipped. A record whose stamp does not verify is kept and counted
    in ``scan.refused``; one signed by a key this HSM cannot check, in ``scan.unchecked``.

    Returns (deleted, looked at): fewer looked at than ``limit`` means there are no more.
    """
    scan = scan if scan is not None else _RequestScan()
    order = (RequestRecord.expires_at, RequestRecord.caller, RequestRecord.request_id)
    query = (
        select(RequestRecord)
        .where(RequestRecord.expires_at < policy.requests_cutoff(now))
        .where((RequestRecord.keep_until.is_(None)) | (RequestRecord.keep_until < now))
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if scan.after is not None:
        query = query.where(tuple_(*order) > tuple_(*scan.after))
    candidates = db.scalars(query).all()
    victims = []
    for record in candidates:
        verdict = verifier.prunable_after(db, record, policy)
        if isinstance(verdict, datetime):
            if verdict < now:
                victims.append((record.caller, record.request_id))
        elif verdict == "refused":
            scan.refused += 1
        else:
            scan.unchecked += 1
    if candidates:
        last = candidates[-1]
        scan.after = (last.expires_at, last.caller, last.request_id)
    key = tuple_(RequestRecord.caller, RequestRecord.request_id)
    deleted = _rowcount(db.execute(delete(RequestRecord).where(key.in_(victims)))) if victims else 0
    return deleted, len(candidates)


def _prune_requests(
    sessions: sessionmaker[Session], verifier: StampVerifier, policy: RetentionPolicy, now: datetime, batch: int,
    counts: PruneCounts,
) -> None:  # fmt: skip
    scan = _RequestScan()
    for _ in range(MAX_BATCHES_PER_RUN):
        with transaction(sessions) as db:
            deleted, looked_at = prune_requests(db, verifier, policy, now, batch, scan)
        counts.requests += deleted
        if looked_at < batch:
            break
    counts.requests_refused, counts.requests_unchecked = scan.refused, scan.unchecked
    with sessions() as db:  # what these settings alone would have removed (unverified: a count to report)
        counts.requests_signed_later = db.scalar(
            select(func.count()).select_from(RequestRecord)
            .where(RequestRecord.expires_at < policy.requests_cutoff(now), RequestRecord.keep_until >= now)
        ) or 0  # fmt: skip
    if scan.refused:
        log.error(
            "%d request records not pruned: their signed retention time does not verify (the database row was "
            "changed); they are kept", scan.refused,
        )  # fmt: skip


def _rowcount(result: object) -> int:
    count = getattr(result, "rowcount", 0)
    return count if isinstance(count, int) and count > 0 else 0


# -- audit --------------------------------------------------------------------------------------------


def prune_audit_chain(hsm: KeyStore, db: Session, pool: str, cutoff: datetime, limit: int) -> int:
    """Deletes up to ``limit`` of ``pool``'s oldest audit records from before ``cutoff`` and moves the chain's
    checkpoint to the last one deleted, in the open transaction ``db``.

    The records deleted are checked first (each follows the one before, its hash and its MAC): a chain that
    does not verify there is not pruned. Returns how many were deleted. Raises ChainBroken when it does not
    verify, HsmUnavailable or DatabaseUnavailable (transient).
    """
    checkpoint = db.scalars(select(AuditCheckpoint).where(AuditCheckpoint.pool == pool).with_for_update()).one_or_none()
    start_seq, start_hash = (checkpoint.seq, checkpoint.hash) if checkpoint is not None else (0, audit_log.GENESIS)
    if checkpoint is not None and not audit_log.checkpoint_verifies(hsm, checkpoint):
        raise ChainBroken(pool, f"the checkpoint at record {checkpoint.seq} does not verify")
    head = db.get(AuditHead, pool)
    if head is None or head.seq <= start_seq:
        return 0
    candidates = db.scalars(
        select(AuditRecord).where(AuditRecord.pool == pool, AuditRecord.seq > start_seq)
        .order_by(AuditRecord.seq).limit(limit)
    ).all()  # fmt: skip
    prefix: list[AuditRecord] = []
    for record in candidates:  # only a contiguous run from the chain's start, and only old enough records
        if audit_log.utc(record.at) >= cutoff:
            break
        prefix.append(record)
    if not prefix:
        return 0
    problem = audit_log.first_problem(hsm, prefix, start_seq, start_hash)
    if problem is not None:
        raise ChainBroken(pool, problem)
    last = prefix[-1]
    db.execute(delete(AuditRecord).where(AuditRecord.pool == pool, AuditRecord.seq <= last.seq))
    now = datetime.now(UTC)
    if checkpoint is None:
        checkpoint = AuditCheckpoint(pool=pool)
        db.add(checkpoint)
    checkpoint.seq, checkpoint.hash, checkpoint.at, checkpoint.pruned_at = last.seq, last.hash, last.at, now
    checkpoint.mac = audit_log.checkpoint_mac(hsm, pool, last.seq, last.hash, audit_log.utc(last.at))
    db.flush()
    return len(prefix)


class ChainBroken(ServiceError):
    """An audit chain does not verify where pruning would remove records: it is left as it is."""

    code = "internal"

    def __init__(self, pool: str, problem: str) -> None:
        super().__init__(f"audit chain {pool!r} not pruned: {problem}")
        self.pool = pool
        self.problem = problem


def prune_rejection_counts(db: Session, cutoff: datetime) -> int:
    """Deletes the per-minute rejection counts from before ``cutoff``. Returns how many."""
    return _rowcount(db.execute(delete(RejectionCount).where(RejectionCount.minute < cutoff)))


# -- runs -----------------------------------------------------------------------------------------------


def _batches(sessions: sessionmaker[Session], step: Callable[[Session], int], limit: int) -> int:
    """Runs ``step`` (one batch, its own transaction) until it removes fewer than ``limit`` rows."""
    total = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        with transaction(sessions) as db:
            removed = step(db)
        total += removed
        if removed < limit:
            break
    return total


def vacuum(sessions: sessionmaker[Session], counts: PruneCounts) -> list[str]:
    """On Postgres, runs a plain ``VACUUM`` (no exclusive lock: reads and writes go on) of the tables ``counts``
    removed rows from, so that their space, TOAST included, is reused by new rows even where autovacuum is off
    or slow (measured: with autovacuum off, a soak's ``requests`` table grew by 10 MB a minute while holding 500
    rows). A table another session is vacuuming is skipped. Returns the tables vacuumed."""
    engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":  # SQLite reuses the pages of deleted rows by itself
        return []
    tables = [
        name for name, removed in (
            ("requests", counts.requests), ("audit_log", sum(counts.audit_records.values())),
            ("rejection_counts", counts.rejection_counts),
        ) if removed
    ]  # fmt: skip
    done = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("SET lock_timeout = '1s'")
        for table in tables:
            try:
                connection.exec_driver_sql(f"VACUUM {table}")  # a fixed name from the list above
                done.append(table)
            except exc.OperationalError:  # another pruner is vacuuming it
                continue
    return done


def prune(
    hsm: KeyStore | None,
    sessions: sessionmaker[Session],
    policy: RetentionPolicy,
    *,
    chains: Iterable[str] = (),
    batch: int = DEFAULT_PRUNE_BATCH,
    now: datetime | None = None,
    verifier: StampVerifier | None = None,
) -> PruneCounts:
    """Removes what retention no longer keeps: request records whose signed pruning time has passed (checked
    by ``verifier``, by default one that opens fleet keys in ``hsm``; ``policy`` can only keep them longer),
    the audit records of ``chains`` (which need ``hsm``) and rejection counts, ``batch`` rows per
    transaction. Does not vacuum (see :func:`vacuum`).

    Returns the counts; a chain that does not verify is skipped and named in ``refused_chains``, request
    records that do not are kept and counted. Raises DatabaseUnavailable or HsmUnavailable (transient).
    """
    now = now or datetime.now(UTC)
    counts = PruneCounts()
    verifier = verifier if verifier is not None else StampVerifier(hsm)
    verifier.new_run()
    _prune_requests(sessions, verifier, policy, now, batch, counts)
    audit_cutoff = policy.audit_cutoff(now)
    if audit_cutoff is None:
        return counts
    for chain in chains:
        if hsm is None:
            raise ConfigError("pruning an audit chain needs the HSM")
        try:
            removed = _batches(sessions, _chain_step(hsm, chain, audit_cutoff, batch), batch)
        except ChainBroken as e:
            log.error("%s", e.message)
            counts.refused_chains[chain] = e.problem
            continue
        except exc.IntegrityError:  # another pruner made the chain's first checkpoint meanwhile: next run
            continue
        if removed:
            counts.audit_records[chain] = removed
    with transaction(sessions) as db:
        counts.rejection_counts = prune_rejection_counts(db, audit_cutoff)
    return counts


def _chain_step(hsm: KeyStore, chain: str, cutoff: datetime, batch: int) -> Callable[[Session], int]:
    return lambda db: prune_audit_chain(hsm, db, chain, cutoff, batch)


def prunable(db: Session, policy: RetentionPolicy, now: datetime | None = None) -> PruneCounts:
    """What :func:`prune` would remove now, counted without removing anything (request records by their recorded
    times: a run also checks each one's signature, and keeps those that do not verify; audit records per chain: the
    old-enough records after each checkpoint; a broken chain would still be refused then)."""
    now = now or datetime.now(UTC)
    counts = PruneCounts()
    count = func.count()
    counts.requests = db.scalar(
        select(count).select_from(RequestRecord)
        .where(RequestRecord.expires_at < policy.requests_cutoff(now))
        .where((RequestRecord.keep_until.is_(None)) | (RequestRecord.keep_until < now))
    ) or 0  # fmt: skip
    audit_cutoff = policy.audit_cutoff(now)
    if audit_cutoff is None:
        return counts
    for chain, n in db.execute(
        select(AuditRecord.pool, count).where(AuditRecord.at < audit_cutoff).group_by(AuditRecord.pool)
    ).all():
        counts.audit_records[chain] = n
    counts.rejection_counts = db.scalar(
        select(count).select_from(RejectionCount).where(RejectionCount.minute < audit_cutoff)
    ) or 0  # fmt: skip
    return counts


VACUUM_SECONDS = 60  # a Pruner vacuums what it pruned at most this often


class Pruner(threading.Thread):
    """Prunes every ``interval`` seconds (with jitter) in the background of a worker process, until
    :meth:`stop`, and vacuums what it pruned at most every VACUUM_SECONDS. A failed run is logged and retried
    at the next interval."""

    def __init__(
        self,
        run: Callable[[], PruneCounts],
        interval: float,
        vacuum: Callable[[PruneCounts], list[str]] | None = None,
    ) -> None:
        super().__init__(name="kmsq-pruner", daemon=True)
        self._run_once = run
        self._vacuum = vacuum
        self._interval = interval
        self._stopped = threading.Event()
        self.runs = 0
        self.removed = PruneCounts()
        self._unvacuumed = PruneCounts()
        self._vacuumed_at = time.monotonic()

    def run(self) -> None:
        while not self._stopped.wait(self._interval * random.uniform(0.5, 1.5)):  # noqa: S311 - jitter only
            try:
                counts = self._run_once()
            except ServiceError as e:
                log.warning("pruning failed: %s", e.message)
                continue
            except Exception as e:  # never let the thread die: the next run tries again
                log.warning("pruning failed (%s)", type(e).__name__)
                continue
            self.runs += 1
            self.removed.add(counts)
            self._unvacuumed.add(counts)
            if (
                self._vacuum is not None
                and self._unvacuumed.total
                and (time.monotonic() - self._vacuumed_at >= VACUUM_SECONDS)
            ):
                try:
                    self._vacuum(self._unvacuumed)
                except Exception as e:  # the next interval tries again
                    log.warning("vacuuming failed (%s)", type(e).__name__)
                self._unvacuumed, self._vacuumed_at = PruneCounts(), time.monotonic()
            if counts.total:
                log.info(
                    "pruned %d request records, %d audit records, %d rejection counts",
                    counts.requests, sum(counts.audit_records.values()), counts.rejection_counts,
                )  # fmt: skip

    def stop(self) -> None:
        """Stops after the current run."""
        self._stopped.set()
