"""The audit log: one record per request outcome and per operator action, chained per pool so that someone
with database access cannot quietly rewrite it.

Each record holds who (the caller, or ``operator:<user>``), what (the operation or command), which root key
and version, the outcome (``ok`` or an error code), when, the request id and a short detail: identifiers and
codes only, never a secret or a ciphertext. Records of a pool form a hash chain: a record's ``hash`` is
SHA-256 over its fields and the previous record's hash, and its ``mac`` is an HMAC-SHA256 of that hash under
the token's policy key (``CKM_SHA256_HMAC`` inside the HSM, with a label of its own). A changed, deleted,
reordered or inserted record breaks the chain at that point, and nobody without the HSM can make the MACs
again (:func:`verify`). Actions that belong to no pool (callers, policy) go to the chain ``*``.

A record is appended in the transaction of what it records, so it commits or rolls back with it. Appends to
one chain are serialized by a row lock on its head (``audit_heads``), taken as the transaction's last step:
two workers never fork the chain, and the lock is held only until the commit.

Records older than the audit retention are pruned (:mod:`worker.retention`): the chain then starts after a
checkpoint, the last pruned record's sequence number, hash and time under an HMAC of its own label, so that
pruning leaves a chain that still verifies and nobody can move the start forward to hide recent deletions.

What the chain cannot show on its own: the newest records removed together with the head (the database
rolled back to an earlier state). ``kmsq audit verify --expect SEQ:HASH`` checks against a head noted
elsewhere (``kmsq status`` and ``kmsq audit tail`` print it).
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, bindparam, exc, insert, select, update
from sqlalchemy.orm import Session

from worker.keystore import KeyStore
from worker.storage.models import AuditCheckpoint, AuditHead, AuditRecord

GLOBAL_CHAIN = "*"  # actions that belong to no pool: callers, policy seals
GENESIS = "0" * 64  # the "previous hash" of a chain's first record
_HASH_LABEL = b"kmsq/audit/record/v1\x00"
_MAC_LABEL = b"kmsq/audit/mac/v1\x00"
_CHECKPOINT_LABEL = b"kmsq/audit/checkpoint/v1\x00"
MAX_DETAIL = 255


def operator() -> str:
    """The actor of an operator command: ``operator:<login name>``."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container): still an operator
        name = "?"
    return f"operator:{name}"[:64]


def utc(at: datetime) -> datetime:
    """Returns ``at`` in UTC (a naive value, as SQLite returns them, is taken as UTC)."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _encode(fields: tuple[tuple[str, str], ...], label: bytes) -> bytes:
    out = bytearray(label)
    for name, value in fields:
        n, v = name.encode("ascii"), value.encode("utf-8")
        out += struct.pack(">H", len(n)) + n + struct.pack(">I", len(v)) + v
    return bytes(out)


def record_hash(record: AuditRecord) -> str:
    """Returns the hex SHA-256 of a record's canonical encoding (every field but ``hash`` and ``mac``)."""
    fields = (
        ("pool", record.pool), ("seq", str(record.seq)), ("at", utc(record.at).isoformat(timespec="microseconds")),
        ("actor", record.actor), ("action", record.action), ("outcome", record.outcome),
        ("root_key_id", record.root_key_id or ""),
        ("root_key_version", "" if record.root_key_version is None else str(record.root_key_version)),
        ("request_id", record.request_id or ""), ("detail", record.detail), ("prev_hash", record.prev_hash),
    )  # fmt: skip
    return hashlib.sha256(_encode(fields, _HASH_LABEL)).hexdigest()


def record_mac(hsm: KeyStore, digest: str) -> str:
    """Returns the hex HMAC of a record hash under the token's policy key."""
    return hsm.policy_mac(_MAC_LABEL + bytes.fromhex(digest)).hex()


def checkpoint_mac(hsm: KeyStore, pool: str, seq: int, digest: str, at: datetime) -> str:
    """Returns the hex HMAC of a checkpoint (the last pruned record of ``pool``) under the policy key."""
    fields = (("pool", pool), ("seq", str(seq)), ("hash", digest), ("at", utc(at).isoformat(timespec="microseconds")))
    return hsm.policy_mac(_encode(fields, _CHECKPOINT_LABEL)).hex()


def checkpoint_verifies(hsm: KeyStore, checkpoint: AuditCheckpoint) -> bool:
    """True when the checkpoint's MAC is the HSM's over its fields."""
    expected = checkpoint_mac(hsm, checkpoint.pool, checkpoint.seq, checkpoint.hash, checkpoint.at)
    return hmac.compare_digest(expected, checkpoint.mac)


# Every audited request appends a record, so its statements are built once, with bound parameters, and run on the
# session's connection: building and compiling them through the ORM for each request was a third of a single
# request's CPU in a worker (py-spy, docs/PERFORMANCE.md figure Q).
_HEADS = cast(Table, AuditHead.__table__)
_RECORDS = cast(Table, AuditRecord.__table__)
_LOCK_HEAD = select(_HEADS.c.seq, _HEADS.c.hash).where(_HEADS.c.pool == bindparam("chain")).with_for_update()
_MOVE_HEAD = (
    update(_HEADS)
    .where(_HEADS.c.pool == bindparam("chain"))
    .values(seq=bindparam("head_seq"), hash=bindparam("head_hash"), updated_at=bindparam("head_at"))
)
_INSERT_RECORD = insert(_RECORDS)
# Postgres: the insert and the head's update in one statement, one database round trip less per audited request.
_APPEND_ONE_STATEMENT = _MOVE_HEAD.add_cte(
    insert(_RECORDS).values({column.key: bindparam(f"record_{column.key}") for column in _RECORDS.columns})
    .cte("appended")
)  # fmt: skip


def _locked_head(db: Session, pool: str) -> tuple[int, str]:
    """The chain's head ``(seq, hash)``, its row locked until the transaction ends (created on the chain's
    first append)."""
    connection = db.connection()
    head = connection.execute(_LOCK_HEAD, {"chain": pool}).first()
    if head is not None:
        return head.seq, head.hash
    try:
        with db.begin_nested():
            db.execute(insert(AuditHead).values(pool=pool, seq=0, hash=GENESIS, updated_at=datetime.now(UTC)))
    except exc.IntegrityError:  # another transaction created it first
        pass
    head = connection.execute(_LOCK_HEAD, {"chain": pool}).first()
    assert head is not None
    return head.seq, head.hash


def append(
    hsm: KeyStore,
    db: Session,
    pool: str,
    *,
    actor: str,
    action: str,
    outcome: str,
    root_key_id: str | None = None,
    root_key_version: int | None = None,
    request_id: str | None = None,
    detail: str = "",
) -> AuditRecord:
    """Appends a record to ``pool``'s chain in the open transaction ``db``; call it as the transaction's last
    step (it locks the chain's head until the commit). Returns the record (not attached to ``db``). Raises
    HsmUnavailable or DatabaseUnavailable (transient), like the work it records."""
    db.flush()  # the transaction's pending changes first (their row locks), the head's lock last
    seq, prev_hash = _locked_head(db, pool)
    record = AuditRecord(
        pool=pool,
        seq=seq + 1,
        at=datetime.now(UTC),
        actor=actor[:64],
        action=action[:64],
        outcome=outcome[:32],
        root_key_id=root_key_id,
        root_key_version=root_key_version,
        request_id=request_id,
        detail="".join(c if c.isprintable() else "?" for c in detail[:MAX_DETAIL]),
        prev_hash=prev_hash,
    )
    record.hash = record_hash(record)
    record.mac = record_mac(hsm, record.hash)
    row = {column.key: getattr(record, column.key) for column in _RECORDS.columns}
    head = {"chain": pool, "head_seq": record.seq, "head_hash": record.hash, "head_at": record.at}
    connection = db.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(_APPEND_ONE_STATEMENT, head | {f"record_{key}": value for key, value in row.items()})
    else:
        connection.execute(_INSERT_RECORD, row)
        connection.execute(_MOVE_HEAD, head)
    return record


def operator_action(
    hsm: KeyStore,
    db: Session,
    pool: str,
    action: str,
    *,
    root_key_id: str | None = None,
    root_key_version: int | None = None,
    detail: str = "",
    actor: str | None = None,
) -> AuditRecord:
    """Appends an operator command's record (actor ``operator:<user>`` unless ``actor`` names another, such as
    the workers' schedule; outcome ``ok``): see :func:`append`."""
    return append(
        hsm, db, pool, actor=actor or operator(), action=action, outcome="ok", root_key_id=root_key_id,
        root_key_version=root_key_version, detail=detail,
    )  # fmt: skip


# -- reading and verifying ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainReport:
    """What :func:`verify` found for one chain."""

    pool: str
    records: int  # checked
    first_seq: int | None
    last_seq: int | None
    head_seq: int
    head_hash: str
    ok: bool
    bad_seq: int | None = None  # the first record that does not verify
    problem: str = ""
    pruned_through: int | None = None  # records up to this one were pruned (retention); None: none were


@dataclass(frozen=True)
class AuditEntry:
    """A record as operators read it."""

    pool: str
    seq: int
    at: datetime
    actor: str
    action: str
    outcome: str
    root_key_id: str | None
    root_key_version: int | None
    request_id: str | None
    detail: str
    hash: str


def entry(record: AuditRecord) -> AuditEntry:
    """Returns the operators' view of a record."""
    return AuditEntry(
        record.pool, record.seq, utc(record.at), record.actor, record.action, record.outcome, record.root_key_id,
        record.root_key_version, record.request_id, record.detail, record.hash,
    )  # fmt: skip


def tail(db: Session, pool: str | None, count: int) -> list[AuditEntry]:
    """Returns the newest ``count`` records (of one chain, or of all), oldest first."""
    stmt = select(AuditRecord).order_by(AuditRecord.at.desc(), AuditRecord.seq.desc()).limit(count)
    if pool is not None:
        stmt = select(AuditRecord).where(AuditRecord.pool == pool).order_by(AuditRecord.seq.desc()).limit(count)
    return [entry(r) for r in reversed(list(db.scalars(stmt)))]


def chains(db: Session) -> list[str]:
    """Returns the names of every chain, sorted."""
    return sorted(db.scalars(select(AuditHead.pool)))


def records(db: Session, pool: str | None = None, since: datetime | None = None) -> Iterator[AuditRecord]:
    """Yields records in chain order (by pool, then sequence), from ``since`` on, 1000 per query."""
    stmt = select(AuditRecord).order_by(AuditRecord.pool, AuditRecord.seq)
    if pool is not None:
        stmt = stmt.where(AuditRecord.pool == pool)
    if since is not None:
        stmt = stmt.where(AuditRecord.at >= since)
    yield from db.scalars(stmt.execution_options(yield_per=1000))


def _record_problem(
    hsm: KeyStore | None, record: AuditRecord, prev: AuditRecord | None, start: tuple[int, str] | None
) -> tuple[int, str] | None:
    """Why ``record`` does not continue the chain after ``prev`` (None: it does). The first record checked
    (``prev`` None) must follow ``start`` (the chain's genesis or checkpoint); with no ``start`` (``--since``)
    it is trusted as far as its own MAC goes. With no ``hsm`` the MAC is not checked."""
    if prev is None:
        if start is not None and record.seq <= start[0]:
            return record.seq, f"record {record.seq} is before the chain's start at {start[0] + 1} (inserted?)"
        if start is not None and record.seq != start[0] + 1:
            return start[0] + 1, f"records {start[0] + 1}-{record.seq - 1} are missing (deleted?)"
        trusted = GENESIS if record.seq == 1 else record.prev_hash  # --since: the record's own MAC vouches
        expected_prev = start[1] if start is not None else trusted
    else:
        if record.seq != prev.seq + 1:
            return prev.seq + 1, f"record {prev.seq + 1} is missing, the next is {record.seq} (deleted?)"
        expected_prev = prev.hash
    if record.prev_hash != expected_prev:
        return (
            record.seq,
            f"record {record.seq} does not follow record {record.seq - 1} (inserted, deleted or reordered)",
        )
    if record_hash(record) != record.hash:
        return record.seq, f"record {record.seq} was altered (its fields do not match its hash)"
    if hsm is not None and not hmac.compare_digest(record_mac(hsm, record.hash), record.mac):
        return record.seq, f"record {record.seq} was altered or forged (its MAC does not verify)"
    return None


def first_problem(hsm: KeyStore, chain: list[AuditRecord], start_seq: int, start_hash: str) -> str | None:
    """Why consecutive records ``chain`` do not continue a chain from ``(start_seq, start_hash)`` (None: they
    do). Raises HsmUnavailable (transient).

    Every link and hash is checked, but only the last record's MAC: the hashes chain every earlier record's
    fields into the last one's hash, which only the HSM could have MACed, so a change anywhere in ``chain``
    fails there (one HSM call instead of one per record; ``verify`` checks every MAC to name the first
    changed record)."""
    prev = None
    for i, record in enumerate(chain):
        problem = _record_problem(hsm if i == len(chain) - 1 else None, record, prev, (start_seq, start_hash))
        if problem is not None:
            return problem[1]
        prev = record
    return None


def _ending_problem(
    db: Session, pool: str, last: AuditRecord | None, head: tuple[int, str], start: tuple[int, str] | None,
    expect: tuple[int, str] | None,
) -> tuple[int, str] | None:  # fmt: skip
    """Why the chain's end does not match its head, or the head noted elsewhere (None: it does)."""
    if last is not None and head != (last.seq, last.hash):
        return (
            last.seq + 1,
            f"the head says record {head[0]}, the chain ends at {last.seq} (records deleted at the end?)",
        )
    if last is None and start is not None and head != start:
        return start[0] + 1, f"the head says record {head[0]}, the chain is empty (deleted?)"
    pruned_through = start[0] if start is not None else 0
    if expect is not None and expect[0] > pruned_through:  # a noted record pruned since is past checking
        noted = db.get(AuditRecord, (pool, expect[0]))
        if noted is None:
            return expect[0], f"record {expect[0]}, noted earlier, is missing (truncated?)"
        if noted.hash != expect[1]:
            return expect[0], f"record {expect[0]} is not the one noted"
    return None


def verify(
    hsm: KeyStore, db: Session, pool: str, since: datetime | None = None, expect: tuple[int, str] | None = None
) -> ChainReport:
    """Checks one chain: contiguous sequence numbers from its start (record 1, or after the checkpoint that
    pruning left, whose own MAC must verify), each record following the one before (``prev_hash``), each
    hash over the record's fields, each MAC under the HSM's key, and the head at the last record (and at
    ``expect``, a head noted elsewhere, when given and not pruned since). From ``since`` on, the first record
    checked is trusted as far as its own MAC goes.

    Returns the report, naming the first record that fails and how. Raises HsmUnavailable (transient).
    """
    row = db.get(AuditHead, pool)
    head = (row.seq, row.hash) if row is not None else (0, GENESIS)
    checkpoint = db.get(AuditCheckpoint, pool)
    pruned_through = checkpoint.seq if checkpoint is not None else None
    start: tuple[int, str] | None = (checkpoint.seq, checkpoint.hash) if checkpoint is not None else (0, GENESIS)
    count, first, prev = 0, None, None
    problem = None
    if checkpoint is not None and not checkpoint_verifies(hsm, checkpoint):
        problem = checkpoint.seq, f"the checkpoint at record {checkpoint.seq} was altered or forged (its MAC)"
    if since is not None:
        start = None
    for record in records(db, pool, since) if problem is None else ():
        problem = _record_problem(hsm, record, prev, start)
        if problem is not None:
            break
        count += 1
        first = record.seq if first is None else first
        prev = record
    problem = problem or _ending_problem(db, pool, prev, head, start, expect)
    last = prev.seq if prev is not None else None
    if problem is not None:
        return ChainReport(pool, count, first, last, head[0], head[1], False, problem[0], problem[1], pruned_through)
    return ChainReport(pool, count, first, last, head[0], head[1], True, pruned_through=pruned_through)
