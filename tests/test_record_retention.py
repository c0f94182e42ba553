"""A database writer cannot make a request run twice by getting its record pruned early (issue 22, item 6).

A request record is what makes a signed message run once; pruning trusts only the time its writing worker
signed (worker.record_stamps), never ``requests.expires_at`` nor the settings of the ``kmsq prune`` that runs.
Each check runs in the unit tier and on the real SoftHSM2 token with SQLite and Postgres (``token_unit``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import update

from schemas.limits import MAX_REPLY_BYTES
from schemas.messages import Reply, ReplyEnvelope
from schemas.wire import MAX_REQUEST_TTL_SECONDS, b64u, from_b64u, key_id
from tasks.codec import KmsCodec
from tests.unit_fixtures import Unit, answer
from worker import audit_log, record_stamps, retention
from worker.fleet import FleetSecrets
from worker.record_stamps import StampVerifier
from worker.storage.db import transaction
from worker.storage.models import FleetKey, RequestRecord

SKEW = timedelta(seconds=300)
GRACE = timedelta(seconds=600)
WORKERS = retention.RetentionPolicy(SKEW, GRACE, None)  # the unit worker's own settings
SHORTER = retention.RetentionPolicy(timedelta(0), timedelta(0), None)  # a `kmsq prune` with shorter settings
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _run(unit: Unit, full: KmsCodec) -> tuple[Any, list[Any], dict[str, Any]]:
    """One recorded request: its signed message, and the reply it got."""
    request, args = full.build_request({"op": "generate_data_key_without_plaintext"}, "alpha")
    return request, args, answer(full, unit.handle_args(request, args))


def _record(unit: Unit, request_id: object) -> RequestRecord | None:
    with unit.service.sessions() as db:
        return db.get(RequestRecord, ("full", str(request_id)))


def _edit(unit: Unit, request_id: object, **values: Any) -> None:
    """What a database writer does: change the record's columns directly."""
    with transaction(unit.service.sessions) as db:
        db.execute(
            update(RequestRecord)
            .where(RequestRecord.caller == "full", RequestRecord.request_id == str(request_id))
            .values(**values)
        )  # fmt: skip


def _prune(unit: Unit, at: datetime, policy: retention.RetentionPolicy = WORKERS) -> retention.PruneCounts:
    return retention.prune(unit.service.hsm, unit.service.sessions, policy, now=at)


def _runs_once(unit: Unit, full: KmsCodec, request: Any, args: list[Any], first: dict[str, Any]) -> None:
    """The same message delivered again gets the stored reply: the request did not run a second time."""
    assert _record(unit, request.request_id) is not None
    assert answer(full, unit.handle_args(request, args)) == first


def lowered_expiry_is_not_pruned(unit: Unit, full: KmsCodec) -> None:
    request, args, first = _run(unit, full)
    _edit(unit, request.request_id, expires_at=LONG_AGO)
    counts = _prune(unit, datetime.now(UTC))
    assert counts.requests == 0 and counts.requests_refused == 0 and counts.requests_signed_later == 1
    _runs_once(unit, full, request, args, first)


def lowered_stamp_is_refused_and_kept(unit: Unit, full: KmsCodec) -> None:
    request, args, first = _run(unit, full)
    _edit(unit, request.request_id, expires_at=LONG_AGO, keep_until=LONG_AGO)
    counts = _prune(unit, datetime.now(UTC))
    assert counts.requests == 0 and counts.requests_refused == 1
    _runs_once(unit, full, request, args, first)


def shorter_prune_settings_keep_the_signed_time(unit: Unit, full: KmsCodec) -> None:
    request, args, first = _run(unit, full)
    record = _record(unit, request.request_id)
    assert record is not None and record.keep_until is not None
    expiry, keep = audit_log.utc(record.expires_at), audit_log.utc(record.keep_until)
    assert expiry + SKEW + GRACE <= keep < expiry + SKEW + GRACE + timedelta(seconds=1)  # rounded up to a second
    unit.clock[0] = expiry + SKEW - timedelta(seconds=1)  # the message is still valid for the worker
    assert _prune(unit, expiry + timedelta(seconds=1), SHORTER).requests == 0
    _runs_once(unit, full, request, args, first)
    assert _prune(unit, keep + timedelta(seconds=1), SHORTER).requests == 1  # then it goes


def a_worker_with_a_longer_grace_signs_a_longer_time(unit: Unit, full: KmsCodec) -> None:
    unit.ctx.reply_grace = timedelta(seconds=3600)
    request, _, _ = _run(unit, full)
    record = _record(unit, request.request_id)
    assert record is not None
    expiry = audit_log.utc(record.expires_at)
    assert _prune(unit, expiry + SKEW + GRACE + timedelta(seconds=5)).requests == 0  # this pruner's own time
    assert _prune(unit, expiry + SKEW + timedelta(seconds=3601)).requests == 1


def an_unstamped_record_goes_by_its_signed_reply(unit: Unit, full: KmsCodec) -> None:
    """A record written before migration 0014 (or whose stamp was removed) is kept until the latest time its
    fleet-signed reply allows: issued_at + the longest request lifetime + two skews + grace."""
    request, args, first = _run(unit, full)
    _edit(unit, request.request_id, expires_at=LONG_AGO, keep_until=None, keep_key_id=None, keep_mac=None)
    issued = _issued_at(unit, request.request_id)
    latest = issued + timedelta(seconds=MAX_REQUEST_TTL_SECONDS) + 2 * SKEW + GRACE
    assert _prune(unit, latest - timedelta(seconds=5)).requests == 0
    _runs_once(unit, full, request, args, first)
    assert _prune(unit, latest + timedelta(seconds=5)).requests == 1


def _issued_at(unit: Unit, request_id: object) -> datetime:
    """The issued_at of the record's stored (signed) reply."""
    record = _record(unit, request_id)
    assert record is not None
    envelope = ReplyEnvelope.model_validate_json(record.reply)
    return audit_log.utc(Reply.model_validate_json(from_b64u(envelope.body, max_len=MAX_REPLY_BYTES)).issued_at)


def another_records_reply_is_refused(unit: Unit, full: KmsCodec) -> None:
    request, _, _ = _run(unit, full)
    other, _, _ = _run(unit, full)
    other_record = _record(unit, other.request_id)
    assert other_record is not None
    _edit(unit, request.request_id, expires_at=LONG_AGO, keep_until=None, keep_key_id=None, keep_mac=None,
          reply=other_record.reply)  # fmt: skip
    counts = _prune(unit, datetime.now(UTC) + timedelta(days=1))
    assert counts.requests == 1 and counts.requests_refused == 1  # the other one goes; this one stays
    assert _record(unit, request.request_id) is not None


def a_stamp_by_a_key_of_the_writers_own_is_not_trusted(unit: Unit, full: KmsCodec) -> None:
    """The writer puts a fleet key of its own in the pool's fleet row and stamps an early time with it: that row
    no longer opens in the HSM, so its key is never trusted (by a worker, which knows its own key, nor by
    `kmsq prune`, which opens the rows)."""
    request, _, _ = _run(unit, full)
    signing = Ed25519PrivateKey.generate()
    public = signing.public_key().public_bytes_raw()
    forged = FleetSecrets("alpha", key_id(public), signing, X25519PrivateKey.generate())
    with transaction(unit.service.sessions) as db:
        db.execute(update(FleetKey).where(FleetKey.pool == "alpha")
                   .values(signing_key=b64u(public)))  # fmt: skip
    stamp = record_stamps.Stamper(forged).stamp("full", str(request.request_id), datetime(2001, 1, 1, tzinfo=UTC))
    _edit(unit, request.request_id, expires_at=LONG_AGO, keep_until=stamp.keep_until, keep_key_id=stamp.key_id,
          keep_mac=stamp.mac)  # fmt: skip
    for verifier in (StampVerifier(unit.service.hsm), StampVerifier.of_fleet(unit.service.hsm, unit.ctx.fleet)):
        counts = retention.prune(
            unit.service.hsm, unit.service.sessions, WORKERS, now=datetime.now(UTC), verifier=verifier
        )
        assert counts.requests == 0 and counts.requests_unchecked == 1
    assert _record(unit, request.request_id) is not None


CHECKS: dict[str, Callable[[Unit, KmsCodec], None]] = {
    check.__name__: check
    for check in (
        lowered_expiry_is_not_pruned,
        lowered_stamp_is_refused_and_kept,
        shorter_prune_settings_keep_the_signed_time,
        a_worker_with_a_longer_grace_signs_a_longer_time,
        an_unstamped_record_goes_by_its_signed_reply,
        another_records_reply_is_refused,
        a_stamp_by_a_key_of_the_writers_own_is_not_trusted,
    )
}


@pytest.mark.unit
@pytest.mark.parametrize("name", list(CHECKS))
def test_pruning_trusts_only_the_signed_time(unit: Unit, full: KmsCodec, name: str) -> None:
    CHECKS[name](unit, full)


@pytest.mark.parametrize("name", list(CHECKS))
def test_pruning_trusts_only_the_signed_time_on_softhsm2(token_unit: Unit, name: str) -> None:
    token_unit.full = token_unit.register("full")
    CHECKS[name](token_unit, token_unit.full)
