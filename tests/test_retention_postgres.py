"""Pruning on Postgres: batches that skip rows another pruner holds, and space that is reused after pruning
(kmsq vacuums what it pruned, so the tables stay bounded even where autovacuum is off, as on this machine)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

from schemas.wire import key_id
from tests.conftest import fresh_database
from worker import record_stamps, retention
from worker.fleet import FleetSecrets
from worker.record_stamps import StampVerifier
from worker.storage.db import create_db_engine, migrate, session_factory, transaction
from worker.storage.models import RequestRecord

pytestmark = pytest.mark.db  # a Postgres database of its own (fresh_database), not a fixture the tiers know

POLICY = retention.RetentionPolicy(timedelta(seconds=0), timedelta(seconds=0), None)
# The rows are stamped as a worker of a pool with this fleet key, 0 s skew and grace, would stamp them.
_SIGNING = Ed25519PrivateKey.generate()
FLEET = FleetSecrets("p", key_id(_SIGNING.public_key().public_bytes_raw()), _SIGNING, X25519PrivateKey.generate())
STAMPER = record_stamps.Stamper(FLEET)


def _verifier() -> StampVerifier:
    return StampVerifier.of_fleet(None, FLEET)


@pytest.fixture
def sessions() -> Iterator[sessionmaker[Session]]:
    with fresh_database("kmsq_retention") as url:
        engine = create_db_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        migrate(engine)
        yield session_factory(engine)
        engine.dispose()


def _add(sessions: sessionmaker[Session], count: int, reply_bytes: int, expired: bool = True) -> None:
    now = datetime.now(UTC)
    expires = now - timedelta(seconds=5) if expired else now + timedelta(hours=1)
    keep = record_stamps.keep_until(expires, timedelta(0), timedelta(0))
    rows = []
    for _ in range(count):
        request_id = secrets.token_hex(16)
        stamp = STAMPER.stamp("c", request_id, keep)
        rows.append(
            {"caller": "c", "request_id": request_id, "request_hash": "0" * 64, "op": "generate_data_keys",
             "status": "ok", "error_code": None, "reply": secrets.token_urlsafe(reply_bytes), "created_at": now,
             "expires_at": expires, "keep_until": stamp.keep_until, "keep_key_id": stamp.key_id,
             "keep_mac": stamp.mac}
        )  # fmt: skip
    with transaction(sessions) as db:
        db.execute(insert(RequestRecord), rows)


def _size(sessions: sessionmaker[Session]) -> int:
    with sessions() as db:
        return int(db.scalar(text("select pg_total_relation_size('requests')")) or 0)


def test_pruned_space_is_reused(sessions: sessionmaker[Session]) -> None:
    sizes = []
    for _ in range(6):
        _add(sessions, 300, 20_000)  # 6 MB of replies (TOAST) per round, all past retention
        counts = retention.prune(None, sessions, POLICY, batch=100, verifier=_verifier())
        assert counts.requests == 300
        assert retention.vacuum(sessions, counts) == ["requests"]
        sizes.append(_size(sessions))
    assert sizes[-1] < 1.5 * sizes[1], sizes  # flat after the first rounds, not 6x


def test_concurrent_pruners_split_the_work(sessions: sessionmaker[Session]) -> None:
    _add(sessions, 2000, 100)
    _add(sessions, 50, 100, expired=False)
    removed: list[int] = []

    def prune() -> None:
        removed.append(retention.prune(None, sessions, POLICY, batch=50, verifier=_verifier()).requests)

    threads = [threading.Thread(target=prune) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(removed) == 2000  # each row deleted once, by one of them
    with sessions() as db:
        assert db.scalar(select(func.count()).select_from(RequestRecord)) == 50  # the ones within retention
