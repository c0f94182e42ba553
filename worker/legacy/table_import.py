"""Importing the replaced key provider's ``private_keys`` table.

Each old row holds a private key SJCL-encrypted under a data-key *string*, itself SJCL-encrypted with the
row's ``rootKey`` value as the password. An import recovers the private key, stores it as kmsq stores any
private key (AES-256-GCM under a data key wrapped in the HSM by a root key, with the row's fields as
associated data), reads it back through the HSM to verify, and records the old row id in
``legacy_imports``. Rows are read by id in pages; each page commits in one transaction with a savepoint per
row, so a failing row is reported and skipped, and an interrupted import leaves no half-written row.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Engine, column, func, inspect, literal_column, select, table
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.expression import TableClause

from worker import audit_log
from worker.errors import ConfigError, DatabaseUnavailable, IntegrityError, InvalidRequest, ServiceError
from worker.keystore import KeyStore
from worker.legacy import sjcl
from worker.legacy.root_key_names import add_legacy_root_key
from worker.service import get_private_key, sealed_private_key_row, validate_private_key, wrapping_version
from worker.storage.models import LegacyImport, RootKeyVersion
from worker.storage.repo import PrivateKeyRepository

LEGACY_COLUMNS = (
    "id", "pub", "source", "coin", "type", "provider", "rootKey", "encryptedDataKey", "encryptedPrv", "created_at",
)  # fmt: skip
PAGE_ROWS = 200
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

Status = Literal["imported", "matched", "skipped", "failed"]


@dataclass(frozen=True)
class LegacyRow:
    """One row of the old table; the secret-bearing columns never appear in a repr."""

    id: int
    pub: str
    source: str
    coin: str
    type: str
    provider: str | None
    root_key_name: str = field(repr=False)
    encrypted_data_key: str = field(repr=False)
    encrypted_prv: str = field(repr=False)
    created_at: datetime | None = None


@dataclass(frozen=True)
class Recovered:
    """A row with its private key recovered."""

    row: LegacyRow
    prv: str = field(repr=False)


@dataclass(frozen=True)
class RowFailure:
    """Why a row could not be imported (a stable text that names no secret)."""

    legacy_id: int
    reason: str


@dataclass
class ImportSummary:
    """What an import did (or, dry, would do)."""

    origin: str
    root_key_id: str
    dry_run: bool
    rows: int = 0
    imported: int = 0
    matched: int = 0  # already stored in kmsq with the same key: recorded, not stored twice
    skipped: int = 0  # imported by an earlier run
    root_key_names_registered: int = 0  # old root key names newly kept sealed (see worker.legacy.root_key_names)
    failures: list[RowFailure] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    @property
    def failed(self) -> int:
        """Rows reported as failed."""
        return len(self.failures)


def source_engine_url(url: str) -> str:
    """Returns ``url`` with Postgres URLs pinned to psycopg 3 (the driver kmsq ships with)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


@dataclass(frozen=True)
class LegacyTable:
    """The old table as the database spells it: ``clause`` has its real column names, ``columns`` maps each
    name the import reads (LEGACY_COLUMNS) to the real one."""

    clause: TableClause
    columns: dict[str, str]

    @property
    def name(self) -> str:
        """``[schema.]table``."""
        return str(self.clause.fullname)

    def column(self, name: str) -> Any:
        """The real column behind one of LEGACY_COLUMNS."""
        return self.clause.c[self.columns[name]]

    def select_rows(self) -> Any:
        """SELECT of LEGACY_COLUMNS, each labelled with its LEGACY_COLUMNS name."""
        return select(*(self.column(name).label(name) for name in LEGACY_COLUMNS))


def resolve_table(engine: Engine, name: str) -> LegacyTable:
    """Finds the old table ``[schema.]name`` and its columns, case-insensitively.

    The replaced system's DDL is unquoted (``rootKey TEXT``): SQLite keeps ``rootKey``, Postgres folds it to
    ``rootkey``. Returns the table under its real names. Raises ConfigError for a bad or missing table, a
    missing column, or a name that matches several tables or columns in different case;
    DatabaseUnavailable when the database cannot be reached.
    """
    schema, _, bare = name.rpartition(".")
    if not _IDENTIFIER.fullmatch(bare) or (schema and not _IDENTIFIER.fullmatch(schema)):
        raise ConfigError(f"bad table name {name!r}: expected [schema.]table of letters, digits and '_'")
    try:
        real_table = _one_match("table", bare, inspect(engine).get_table_names(schema=schema or None), name)
        with engine.connect() as conn:  # names only: reflecting types warns on types SQLAlchemy lacks
            empty: Any = select(literal_column("*")).select_from(table(real_table, schema=schema or None)).limit(0)
            present = list(conn.execute(empty).keys())
    except sa_exc.OperationalError as e:
        raise DatabaseUnavailable(f"legacy database unreachable ({type(e.orig).__name__})") from None
    columns: dict[str, str] = {}
    missing = []
    for wanted in LEGACY_COLUMNS:
        try:
            columns[wanted] = _one_match("column", wanted, present, real_table)
        except _Missing:
            missing.append(wanted)
    if missing:
        raise ConfigError(f"table {real_table!r} lacks column(s): {', '.join(missing)}")
    clause = table(real_table, *(column(c) for c in columns.values()), schema=schema or None)
    return LegacyTable(clause, columns)


class _Missing(ConfigError):
    """No table or column of that name, in any case."""


def _one_match(kind: str, wanted: str, present: list[str], where: str) -> str:
    matches = [name for name in present if name.lower() == wanted.lower()]
    if not matches:
        raise _Missing(f"no {kind} {wanted!r} in the legacy database" if kind == "table" else wanted)
    if len(matches) > 1:
        raise ConfigError(
            f"{kind} name {wanted!r} is ambiguous in {where!r}: {', '.join(sorted(matches))} differ only in case"
        )
    return matches[0]


def read_pages(engine: Engine, old: LegacyTable, page_rows: int = PAGE_ROWS) -> Iterator[list[LegacyRow]]:
    """Yields the old rows in id order, a page at a time (keyset pagination: no long-held cursor)."""
    last: Any = None
    key = old.column("id")
    while True:
        query = old.select_rows().order_by(key).limit(page_rows)
        if last is not None:
            query = query.where(key > last)
        with engine.connect() as conn:
            page = [_legacy_row(r._mapping) for r in conn.execute(query)]
        if not page:
            return
        yield page
        last = page[-1].id


def _legacy_row(values: Any) -> LegacyRow:
    return LegacyRow(
        id=int(values["id"]),
        pub=values["pub"],
        source=values["source"],
        coin=values["coin"],
        type=values["type"],
        provider=values["provider"],
        root_key_name=values["rootKey"],
        encrypted_data_key=values["encryptedDataKey"],
        encrypted_prv=values["encryptedPrv"],
        created_at=_timestamp(values["created_at"]),
    )


def _timestamp(value: Any) -> datetime | None:
    # A TIMESTAMP column reads as a datetime; SQLite (no date type) gives the text it stored.
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def count_rows(engine: Engine, old: LegacyTable) -> int:
    """Returns the number of rows in the old table."""
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(old.clause)) or 0)


def recover(row: LegacyRow) -> Recovered | RowFailure:
    """Decrypts a row's data-key string with its ``rootKey`` value, then its private key with that string.

    Returns the recovered key, or why it failed (a malformed field, an envelope that does not decrypt).
    """
    texts = (row.pub, row.source, row.coin, row.type, row.root_key_name, row.encrypted_data_key, row.encrypted_prv)
    if not all(isinstance(value, str) for value in texts):
        return RowFailure(row.id, "a column is NULL or not text")
    try:
        data_key = sjcl.decrypt(row.root_key_name, row.encrypted_data_key)
    except sjcl.SjclError as e:
        return RowFailure(row.id, f"encryptedDataKey: {e}")
    try:
        prv = sjcl.decrypt(data_key, row.encrypted_prv)
    except sjcl.SjclError as e:
        return RowFailure(row.id, f"encryptedPrv: {e}")
    try:
        validate_private_key(pub=row.pub, prv=prv, coin=row.coin, source=row.source, type=row.type)
    except InvalidRequest as e:
        return RowFailure(row.id, str(e))
    return Recovered(row, prv)


class LegacyImporter:
    """Imports an old table into kmsq's database under one root key."""

    def __init__(
        self,
        hsm: KeyStore,
        sessions: sessionmaker[Session],
        source: Engine,
        old: LegacyTable,
        root_key_id: str | None,
        pool: str,
        *,
        dry_run: bool = False,
        threads: int = 2,
        register_names: bool = True,
    ) -> None:
        self.hsm = hsm
        self.sessions = sessions
        self.source = source
        self.old = old
        self.dry_run = dry_run
        self.threads = threads
        self.register_names = register_names
        self.pool = pool
        self._names_seen: set[str] = set()  # old root key names registered (or found registered) this run
        self.origin = f"{source.url.database or ''}/{old.name}"[-255:]
        with sessions() as db:
            self.version: RootKeyVersion = wrapping_version(db, root_key_id, pool)
            db.expunge(self.version)
        self.summary = ImportSummary(self.origin, self.version.root_key_id, dry_run)

    def run(self, progress: Callable[[int], None] | None = None) -> ImportSummary:
        """Imports every row; calls ``progress(rows done)`` after each page. Returns the summary.

        Raises DatabaseUnavailable when either database goes away (the page in progress rolls back).
        """
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kmsq-legacy") as pool:
            try:
                for page in read_pages(self.source, self.old):
                    self._page(page, pool)
                    if progress is not None:
                        progress(len(page))
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
                raise DatabaseUnavailable(f"database unavailable ({type(e.orig).__name__})") from None
        self.summary.elapsed_seconds = time.monotonic() - started
        return self.summary

    def _page(self, page: list[LegacyRow], pool: ThreadPoolExecutor) -> None:
        self.summary.rows += len(page)
        before = (self.summary.imported, self.summary.matched, len(self.summary.failures))
        with self.sessions() as db:
            done = set(
                db.scalars(
                    select(LegacyImport.legacy_id).where(
                        LegacyImport.origin == self.origin, LegacyImport.legacy_id.in_([r.id for r in page])
                    )
                )
            )
            self.summary.skipped += len(done)
            todo = [row for row in page if row.id not in done]
            # PBKDF2 (hashlib) releases the GIL: the threads recover rows in parallel.
            for result in pool.map(recover, todo):
                if isinstance(result, RowFailure):
                    self.summary.failures.append(result)
                    continue
                status = self._store(db, result)
                if isinstance(status, RowFailure):
                    self.summary.failures.append(status)
                    continue
                if status == "imported":
                    self.summary.imported += 1
                else:
                    self.summary.matched += 1
                self._register_name(db, result.row.root_key_name)
            if self.dry_run:
                db.rollback()
                return
            imported, matched, failed = (
                self.summary.imported - before[0], self.summary.matched - before[1],
                len(self.summary.failures) - before[2],
            )  # fmt: skip
            audit_log.operator_action(
                self.hsm, db, self.pool, "import-legacy", root_key_id=self.version.root_key_id,
                root_key_version=self.version.version,
                detail=f"{self.origin}: rows {page[0].id}-{page[-1].id}: {imported} imported, {matched} matched, "
                f"{failed} failed",
            )  # fmt: skip
            db.commit()

    def _register_name(self, db: Session, name: str) -> None:
        """Keeps the row's old root key name sealed, so the old system's encryptedKey values still decrypt."""
        if not self.register_names or name in self._names_seen:
            return
        _, created = add_legacy_root_key(self.hsm, db, name, self.version.root_key_id, self.pool, audit=False)
        self._names_seen.add(name)
        self.summary.root_key_names_registered += int(created)

    def _store(self, db: Session, item: Recovered) -> Status | RowFailure:
        row = item.row
        try:
            with db.begin_nested():
                existing = PrivateKeyRepository(db).get(row.pub, row.source)
                if existing is None:
                    existing = sealed_private_key_row(
                        self.hsm, self.version, pub=row.pub, prv=item.prv, coin=row.coin, source=row.source,
                        type=row.type,
                    )  # fmt: skip
                    db.add(existing)
                    db.flush()
                    status: Status = "imported"
                else:
                    status = "matched"
                if not self._reads_back(db, item):
                    raise _Refused(
                        "read-back verification failed" if status == "imported"
                        else "a different key is stored for this pub and source"
                    )  # fmt: skip
                db.add(LegacyImport(
                    origin=self.origin, legacy_id=row.id, private_key_id=existing.id, outcome=status,
                    legacy_provider=row.provider, legacy_created_at=row.created_at,
                ))  # fmt: skip
                db.flush()
            return status
        except _Refused as e:
            return RowFailure(row.id, str(e))
        except sa_exc.IntegrityError:
            return RowFailure(row.id, "stored concurrently by another import; run again")
        except ServiceError as e:
            return RowFailure(row.id, f"{e.code}: {e}")

    def _reads_back(self, db: Session, item: Recovered) -> bool:
        """True when kmsq opens the stored key through the HSM to the recovered one, with the row's fields."""
        row = item.row
        try:
            stored = get_private_key(self.hsm, db, row.pub, row.source)
        except IntegrityError:
            return False
        return (stored.prv, stored.coin, stored.type) == (item.prv, row.coin, row.type)


class _Refused(Exception):
    """A row that must not be imported; rolls back its savepoint."""
