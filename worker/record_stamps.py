"""Retention stamps: when a request record may be pruned, MACed by the worker that wrote it.

A request record is what makes a signed request run once: while it exists, every later delivery of the message
gets the stored reply. Pruning it while a worker could still accept the message would let the message run a
second time, so pruning must not trust anything a database writer can edit (``requests.expires_at``) nor the
settings of whoever runs ``kmsq prune``. The worker therefore MACs, under a key derived from its pool's fleet
private key, the time until which the record is kept (:func:`keep_until`):

    the request's own ``expires_at`` (bounded as :func:`worker.retention.record_expiry` does)
    + the worker's clock skew (after that it refuses every delivery as ``expired``)
    + its reply grace (``get_result`` answers until then)

The pruner deletes a record only once its stamp verifies under the fleet key as opened in the HSM
(:class:`StampVerifier`) and that time has passed; its own settings can keep a record longer, never shorter.
A MAC, not a signature: a pruner checks hundreds of records per batch, and HMAC-SHA256 costs about a
microsecond where an Ed25519 verification costs about a hundred; whoever can check a stamp holds the fleet
key anyway (a worker of the pool, or ``kmsq prune`` with the token).
A pool's workers must share one clock skew: a worker with a larger one than the record's writer would accept
a late delivery after the record is gone.

Records written before stamps existed (migration 0014) carry none; for them the pruner derives a bound from the
fleet-signed reply they hold: its ``issued_at`` + MAX_REQUEST_TTL_SECONDS + twice the pruner's skew (the
latest a delivery of that request can be accepted) + its grace.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple, Protocol

import pydantic
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.limits import MAX_REPLY_BYTES
from schemas.messages import Reply, ReplyEnvelope
from schemas.wire import (
    MAX_REQUEST_TTL_SECONDS,
    WireError,
    b64u,
    canonical_json,
    from_b64u,
    key_id,
    reply_signing_input,
    verify,
)
from worker.errors import ServiceError
from worker.fleet import FleetSecrets, load_fleet_key
from worker.keystore import KeyStore
from worker.storage.models import FleetKey, RequestRecord

_LABEL = b"kmsq/request-record-retention/v1\x00"


class RetentionMargins(Protocol):
    """A pruner's settings (worker.retention.RetentionPolicy)."""

    @property
    def clock_skew(self) -> timedelta: ...
    @property
    def reply_grace(self) -> timedelta: ...


# Why a record's pruning time could not be established: its MAC does not verify (a database writer changed
# the record), or it names a fleet key this HSM cannot check (another pool's: its own workers prune it).
Unverified = Literal["refused", "unchecked"]


class Stamp(NamedTuple):
    """A record's retention time: whole seconds (UTC), the fleet key's id and the MAC (the columns
    ``keep_until``, ``keep_key_id``, ``keep_mac``)."""

    keep_until: datetime
    key_id: str
    mac: str


def keep_until(expiry: datetime, clock_skew: timedelta, reply_grace: timedelta) -> datetime:
    """Returns when a record whose (bounded) request expiry is ``expiry`` may be pruned, written by a worker
    with ``clock_skew`` and ``reply_grace``: rounded up to a whole second."""
    moment = expiry.astimezone(UTC) + clock_skew + reply_grace
    return datetime.fromtimestamp(math.ceil(moment.timestamp()), UTC)


def mac_input(caller: str, request_id: str, keep: datetime) -> bytes:
    """Returns the bytes a stamp's MAC covers: the record's key and its time in whole seconds."""
    return _LABEL + canonical_json([caller, request_id, int(keep.timestamp())])


def stamp_key(fleet: FleetSecrets) -> bytes:
    """Returns the pool's stamp MAC key: HKDF-SHA256 of the fleet signing key's seed (label ``_LABEL``)."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=_LABEL).derive(fleet.signing.private_bytes_raw())


def _mac(key: bytes, caller: str, request_id: str, keep: datetime) -> str:
    return b64u(hmac.new(key, mac_input(caller, request_id, keep), hashlib.sha256).digest())


class Stamper:
    """Stamps the records a worker of ``fleet``'s pool writes."""

    def __init__(self, fleet: FleetSecrets) -> None:
        self._key_id = fleet.signing_key_id
        self._key = stamp_key(fleet)

    def stamp(self, caller: str, request_id: str, keep: datetime) -> Stamp:
        """Returns the stamp of the record (``caller``, ``request_id``) kept until ``keep``."""
        return Stamp(keep, self._key_id, _mac(self._key, caller, request_id, keep))


class _FleetCheck(NamedTuple):
    public: Ed25519PublicKey  # checks replies (records without a stamp)
    stamp_key: bytes  # checks stamps


def _check_of(fleet: FleetSecrets) -> _FleetCheck:
    return _FleetCheck(fleet.signing.public_key(), stamp_key(fleet))


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)  # SQLite: naive UTC


class StampVerifier:
    """Tells when request records may be pruned, trusting only what a fleet key vouches for.

    Fleet keys are taken from ``known`` (a worker's own) or, by key id, from the database's fleet rows, each
    opened in ``hsm`` (:func:`worker.fleet.load_fleet_key`: a row whose public key was changed does not open).
    A key this HSM cannot open (another pool's, on another token) is unknown for the current run
    (:meth:`new_run`), and records stamped with it are left to its own workers.
    """

    def __init__(self, hsm: KeyStore | None, known: list[FleetSecrets] | None = None) -> None:
        self._hsm = hsm
        self._keys: dict[str, _FleetCheck] = {fleet.signing_key_id: _check_of(fleet) for fleet in known or []}
        self._unknown: set[str] = set()

    @classmethod
    def of_fleet(cls, hsm: KeyStore | None, fleet: FleetSecrets) -> StampVerifier:
        """A verifier that knows ``fleet``'s own keys already."""
        return cls(hsm, [fleet])

    def new_run(self) -> None:
        """Forgets which keys could not be opened (a fleet key may have been created since)."""
        self._unknown.clear()

    def _key(self, db: Session, wanted: str) -> _FleetCheck | None:
        """Returns the checks of the fleet key with id ``wanted``, opened in the HSM, or None when none can be."""
        if wanted in self._keys:
            return self._keys[wanted]
        if wanted in self._unknown or self._hsm is None:
            return None
        for row in db.scalars(select(FleetKey)):
            try:
                if key_id(from_b64u(row.signing_key, max_len=32)) != wanted:
                    continue
                secrets = load_fleet_key(self._hsm, db, row.pool)
            except (ServiceError, WireError):  # changed, or not openable here
                continue
            if secrets.signing_key_id == wanted:
                self._keys[wanted] = _check_of(secrets)
                return self._keys[wanted]
        self._unknown.add(wanted)
        return None

    def prunable_after(self, db: Session, record: RequestRecord, policy: RetentionMargins) -> datetime | Unverified:
        """Returns when ``record`` may be pruned, as its writer vouched: its stamp, or for an unstamped record
        the bound its signed reply gives under ``policy`` (the pruner's skew and grace).

        Returns ``"refused"`` when the MAC or signature does not verify or the reply names another record (a
        database writer changed it), ``"unchecked"`` when it names a key this HSM cannot open."""
        if record.keep_mac is None or record.keep_key_id is None or record.keep_until is None:
            return self._from_reply(db, record, policy)
        check = self._key(db, record.keep_key_id)
        if check is None:
            return "unchecked"
        keep = _utc(record.keep_until)
        expected = _mac(check.stamp_key, record.caller, record.request_id, keep)
        if not hmac.compare_digest(expected, record.keep_mac):
            return "refused"
        return keep

    def _from_reply(self, db: Session, record: RequestRecord, policy: RetentionMargins) -> datetime | Unverified:
        try:
            envelope = ReplyEnvelope.model_validate_json(record.reply)
            check = self._key(db, envelope.key_id)
            if check is None:
                return "unchecked"
            body = from_b64u(envelope.body, max_len=MAX_REPLY_BYTES)
            verify(check.public, envelope.signature, reply_signing_input(body))
            reply = Reply.model_validate_json(body)
        except (pydantic.ValidationError, WireError, ValueError):
            return "refused"
        if reply.caller != record.caller or str(reply.request_id) != record.request_id:
            return "refused"
        # The reply was made when the request ran, at most one skew before its issued_at; the request expired at
        # most MAX_REQUEST_TTL_SECONDS after that, and a delivery is accepted until one skew later.
        latest_expiry = _utc(reply.issued_at) + timedelta(seconds=MAX_REQUEST_TTL_SECONDS) + policy.clock_skew
        return latest_expiry + policy.clock_skew + policy.reply_grace
