"""Tokens of one deployment, and the keys they pass each other through the database (``kmsq hsm ...``).

Each host runs the commands against its own token; the database carries only what is safe there: enrolled
tokens' transport public keys (``hsm_tokens``), keys wrapped for one target token (``key_copies``: only that
token opens them, worker.hsm_custody), and what each token reported holding, with key check values computed in
the token (``token_keys``). The order:

1. ``kmsq hsm enroll`` on the new token's host: its transport key, its row, its fingerprint shown.
2. ``kmsq hsm trust NAME --fingerprint FP`` on a host whose token holds the keys: the operator types the
   fingerprint read off the new host's screen, and that token's security officer trusts the key (SO PIN).
3. ``kmsq hsm replicate`` on the trusting host (wraps for each token it trusts what that token lacks), then on
   the new token's host (unwraps what waits for it, checks each key check value, deletes the copies). The
   policy anchor goes along, MACed under the policy key the tokens share: a token takes only a newer one.

A database writer can delete or change rows here: a changed copy does not unwrap or fails its check value and
is refused; a deleted one is made again by the next replicate; an ``hsm_tokens`` row of its own gets no key,
because no security officer trusted its key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.orm import Session

from schemas.wire import b64u, from_b64u
from worker import hsm_custody as custody
from worker import policy_anchor
from worker.errors import ConfigError, IntegrityError, NotReplicated
from worker.hsm import Hsm
from worker.keystore import KeyStore, root_key_label
from worker.periodic import Periodic
from worker.storage.models import HsmToken, KeyCopy, RootKeyVersion, TokenCheck, TokenKey, utcnow

log = logging.getLogger("kmsq.replication")

ANCHOR = "policy-anchor"
_ANCHOR_LABEL = b"kmsq/anchor-copy/v1\x00"
_HELD_LABEL = b"kmsq/token-holds/v1\x00"
_MAX_DER = 1024


@dataclass(frozen=True)
class Enrollment:
    """A token enrolled here: its name, its transport key's fingerprint, and whether the key was made now."""

    name: str
    fingerprint: str
    made: bool


@dataclass
class Replication:
    """What one ``kmsq hsm replicate`` did on this host's token."""

    token: str
    imported: list[str] = field(default_factory=list)
    exported: dict[str, int] = field(default_factory=dict)  # target token -> copies written for it
    anchor_adopted: bool = False
    refused: list[str] = field(default_factory=list)  # copies for this token that did not verify (kept out)


def enroll(hsm: Hsm, db: Session) -> Enrollment:
    """Makes this token's transport key (unless it has one) and records it in ``hsm_tokens``."""
    der, made = custody.ensure_transport_key(hsm)
    name = hsm.token_serial()
    shown = custody.fingerprint(der)
    row = db.get(HsmToken, name)
    if row is None:
        db.add(HsmToken(name=name, transport_key=b64u(der), fingerprint=shown))
    else:
        row.transport_key, row.fingerprint = b64u(der), shown
    return Enrollment(name, shown, made)


def _normalized(fingerprint: str) -> str:
    return re.sub(r"[^0-9a-f]", "", fingerprint.lower())


def trust(hsm: Hsm, db: Session, target: str, fingerprint: str, so_pin: str) -> bool:
    """Has this token's security officer trust the transport key of the enrolled token ``target``, once the
    operator's ``fingerprint`` (read on ``target``'s host) matches the key in the database. Returns False when it
    was trusted already.

    Raises ConfigError when ``target`` is not enrolled, the fingerprints differ (nothing is trusted), or the SO
    PIN is wrong."""
    if target == hsm.token_serial():
        raise ConfigError("a token cannot trust itself")
    row = db.get(HsmToken, target)
    if row is None:
        raise ConfigError(f"no token {target!r} is enrolled (run: kmsq hsm enroll, on its host)")
    der = from_b64u(row.transport_key, max_len=_MAX_DER)
    if _normalized(fingerprint) != _normalized(custody.fingerprint(der)):
        raise ConfigError(
            f"the fingerprint does not match the transport key of token {target} in the database; nothing was trusted "
            "(compare it with what kmsq hsm enroll showed on that host)"
        )
    return custody.trust_transport_key(hsm, target, der, so_pin)


def _held_mac(hsm: Hsm, token: str, label: str, kcv: str) -> str | None:
    """The MAC of a ``token_keys`` row, or None when this token has no policy key yet."""
    try:
        return hsm.policy_mac(_HELD_LABEL + "\x00".join((token, label, kcv)).encode()).hex()
    except ConfigError:
        return None


def report_inventory(hsm: Hsm, db: Session, scope: str | None = None) -> list[custody.TokenKey]:
    """Records what this token holds (``token_keys``, each row MACed under the policy key), with a row for its
    policy anchor of database ``scope`` (its value's digest: a source sends the anchor only when it differs), and
    returns the keys."""
    name = hsm.token_serial()
    keys = custody.inventory(hsm)
    db.execute(delete(TokenKey).where(TokenKey.token == name))
    now = utcnow()
    rows = [(k.label, k.kind, k.kcv, k.replicable) for k in keys]
    anchor = anchor_value(hsm, scope)
    if scope is not None and anchor is not None:
        rows.append((f"{ANCHOR}:{scope}", ANCHOR, _digest(anchor), False))
    db.add_all(TokenKey(token=name, label=label, kind=kind, kcv=kcv, replicable=replicable, seen_at=now,
                        mac=_held_mac(hsm, name, label, kcv)) for label, kind, kcv, replicable in rows)  # fmt: skip
    return keys


def record_check(db: Session, token: str, lacking: list[custody.Capability], checked_by: str) -> None:
    """Records what ``token`` answered to the check of what kmsq needs of it (``token_checks``, one row per token,
    the last check): ``lacking`` is what the deployment needs that the token lacks (empty when it has all)."""
    names = json.dumps([f"{c.name} ({c.needed_for})" for c in lacking])
    row = db.get(TokenCheck, token)
    if row is None:
        db.add(TokenCheck(token=token, checked_by=checked_by, missing=names))
    else:
        row.checked_at, row.checked_by, row.missing = utcnow(), checked_by, names


def _digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()[:16]


def held_by(hsm: Hsm, db: Session, token: str) -> set[tuple[str, str]]:
    """(label, kcv) of the keys ``token`` reported holding, by the rows whose MAC verifies here (a database
    writer's row cannot make a source believe a key is safe elsewhere when it is not)."""
    rows = db.scalars(select(TokenKey).where(TokenKey.token == token, TokenKey.mac.is_not(None)))
    return {(row.label, row.kcv) for row in rows if _verifies(hsm, row)}


def _verifies(hsm: Hsm, row: TokenKey) -> bool:
    return hmac.compare_digest(row.mac or "", _held_mac(hsm, row.token, row.label, row.kcv) or "-")


def replicate(hsm: Hsm, db: Session, scope: str | None) -> Replication:
    """Imports what waits for this token, then wraps for every token it trusts the keys that token lacks, with
    the policy anchor of database ``scope``; records this token's keys. Returns what it did."""
    name = hsm.token_serial()
    done = Replication(name)
    if not custody.takes_part(hsm):  # neither enrolled nor trusting another token: nothing to do
        return done
    retired = retired_labels(hsm, db)
    _import(hsm, db, name, scope, done, retired)
    mine = report_inventory(hsm, db, scope)
    for target in custody.trusted_targets(hsm):
        held = held_by(hsm, db, target)
        waiting = set(db.scalars(select(KeyCopy.label).where(KeyCopy.target == target)))
        missing = {k.label for k in mine if (k.label, k.kcv) not in held and k.label not in waiting and k.replicable}
        missing -= retired
        copies = custody.export_keys(hsm, target, missing) if missing else []
        for copy in copies:
            db.merge(KeyCopy(target=target, label=copy.label, kind=copy.kind, mechanism=copy.mechanism,
                             wrapped=b64u(copy.wrapped), kcv=copy.kcv, public=json.dumps(copy.public), source=name,
                             created_at=utcnow()))  # fmt: skip
        anchor = _anchor_copy(hsm, scope, target, name, held)
        if anchor is not None:
            db.merge(anchor)
        if copies:
            done.exported[target] = len([c for c in copies if c.kind != custody.REPLICATION])
    return done


def _anchor_mac(hsm: Hsm, scope: str, value: bytes) -> str:
    return hsm.policy_mac(_ANCHOR_LABEL + scope.encode() + b"\x00" + value).hex()


def anchor_value(hsm: Hsm, scope: str | None) -> bytes | None:
    """This token's policy anchor of ``scope`` (the confirmed one of the highest epoch), or None."""
    found = policy_anchor.anchors(hsm, scope)
    if scope is None or not found:
        return None
    confirmed = [a for a in found if a.previous is None] or found
    return confirmed[0].encode()


def _anchor_copy(hsm: Hsm, scope: str | None, target: str, source: str, held: set[tuple[str, str]]) -> KeyCopy | None:
    """The copy of this token's anchor for ``target``, unless ``target`` reported holding the same one."""
    value = anchor_value(hsm, scope)
    if scope is None or value is None or (f"{ANCHOR}:{scope}", _digest(value)) in held:
        return None
    return KeyCopy(target=target, label=f"{ANCHOR}:{scope}", kind=ANCHOR, mechanism="hmac-sha256", wrapped=b64u(value),
                   kcv=_anchor_mac(hsm, scope, value), public="{}", source=source, created_at=utcnow())  # fmt: skip


def push_anchor(hsm: Hsm, db: Session, scope: str | None) -> list[str]:
    """Leaves this token's policy anchor of ``scope`` for every token it trusts that did not report holding it
    (what :func:`replicate` does for the anchor alone, cheaply: no key is wrapped). Returns those tokens' names."""
    if scope is None or not custody.takes_part(hsm):
        return []
    name, pushed = hsm.token_serial(), []
    for target in custody.trusted_targets(hsm):
        anchor = _anchor_copy(hsm, scope, target, name, held_by(hsm, db, target))
        if anchor is not None:
            db.merge(anchor)
            pushed.append(target)
    return pushed


def share_anchor(hsm: KeyStore, bind: Engine | Connection, scope: str) -> None:
    """After an operator command moved the anchor of ``scope`` on this token: leaves it at once for the tokens
    this one trusts (:func:`push_anchor`, in a transaction of its own on ``bind``), so that their workers, which
    take it when the rows stop matching their own (:func:`take_anchor`), do not refuse requests until the next
    replication. A failure is logged: the workers' replication leaves it within its interval."""
    if not isinstance(hsm, Hsm):
        return
    try:
        with Session(bind) as db, db.begin():
            pushed = push_anchor(hsm, db, scope)
    except Exception as e:  # the operator's change stands; replication carries the anchor later
        log.warning("the policy anchor was not left for the other tokens now (%s): the workers' replication "
                    "does it within KMSQ_REPLICATE_INTERVAL_SECONDS", type(e).__name__)  # fmt: skip
        return
    if pushed:
        log.info("the policy anchor left for tokens %s", ", ".join(pushed))


def _verified_anchor(hsm: Hsm, scope: str, row: KeyCopy) -> bytes | None:
    """The anchor value an ANCHOR copy carries, when its MAC (under the policy key the tokens share) verifies."""
    value = from_b64u(row.wrapped, max_len=4096)
    return value if hmac.compare_digest(_anchor_mac(hsm, scope, value), row.kcv) else None


def take_anchor(hsm: Hsm, db: Session, scope: str | None) -> bool:
    """Takes the policy anchor of ``scope`` another token left for this one, when its MAC verifies and it is newer
    than this token's own (a worker whose rows stop matching its token's anchor calls it before refusing: an
    operator command on another token moved the anchor). The row stays for the next replication to remove.
    Returns True when this token's anchor moved. Raises HsmUnavailable (transient)."""
    if scope is None:
        return False
    row = db.get(KeyCopy, (hsm.token_serial(), f"{ANCHOR}:{scope}"))
    value = _verified_anchor(hsm, scope, row) if row is not None and row.kind == ANCHOR else None
    return value is not None and policy_anchor.adopt(hsm, scope, value)


def retired_labels(hsm: Hsm, db: Session) -> set[str]:
    """The labels of root key versions destroyed or waiting for destruction (rows whose MAC verifies): no token
    passes them on, so a copy cannot bring back what a destruction removed (worker.schedule)."""
    from worker.policy_rows import verifies

    rows = list(db.scalars(select(RootKeyVersion).where(RootKeyVersion.state.in_(("pending_destroy", "destroyed")))))
    try:
        return {row.hsm_label for row in rows if verifies(hsm, row)}
    except ConfigError:  # no policy key yet (a new token): not taken now, passed on again once it can check
        return {row.hsm_label for row in rows}


def _import(hsm: Hsm, db: Session, name: str, scope: str | None, done: Replication, retired: set[str]) -> None:
    rows = list(db.scalars(select(KeyCopy).where(KeyCopy.target == name)))
    keys = [row for row in rows if row.kind != ANCHOR and row.label not in retired]
    copies = [
        custody.WrappedKey(row.label, row.kind, row.mechanism, from_b64u(row.wrapped, max_len=1 << 16), row.kcv,
                           json.loads(row.public))
        for row in sorted(keys, key=lambda r: r.kind != custody.REPLICATION)
    ]  # fmt: skip
    if copies:
        try:
            done.imported = custody.import_keys(hsm, copies)
        except IntegrityError:  # a copy was changed, or wrapped for another token: the source makes them again
            done.refused = [copy.label for copy in copies if copy.kind != custody.REPLICATION]
            log.error("key copies for token %s do not verify; dropped, to be made again (%s)", name,
                      ", ".join(done.refused))  # fmt: skip
    for row in rows:
        if row.kind == ANCHOR and scope is not None and row.label == f"{ANCHOR}:{scope}":
            value = _verified_anchor(hsm, scope, row)
            if value is not None:
                done.anchor_adopted = policy_anchor.adopt(hsm, scope, value)
            else:
                done.refused.append(row.label)
                log.error("the policy anchor copied for token %s does not verify: not taken", name)
        db.delete(row)


class Replicator(Periodic[Replication]):
    """Replicates every ``interval`` seconds (with jitter) in the background of a worker process, until
    :meth:`stop`: what waits for this token is taken and what the tokens it trusts lack is wrapped for them, so
    a new root key or version, a token signing key and the policy anchor reach every enrolled token without an
    operator. A failed run is logged and retried at the next interval."""

    def __init__(self, run: Callable[[], Replication], interval: float) -> None:
        super().__init__("kmsq-replicator", run, interval, log, "replication", _report)


def _report(done: Replication) -> None:
    if done.imported or done.exported or done.anchor_adopted:
        adopted = ", the policy anchor taken" if done.anchor_adopted else ""
        log.info("replication: %d keys taken, %s wrapped for other tokens%s", len(done.imported),
                 sum(done.exported.values()), adopted)  # fmt: skip


class CustodyGate:
    """A worker's :attr:`worker.service.RootKeyAccess.gate` when ``KMSQ_MIN_TOKENS`` asks for more than one token:
    nothing is wrapped under a root key version until ``min_tokens`` tokens reported holding it (``token_keys``
    rows whose MAC verifies under the policy key: a database writer cannot vouch for a copy that does not exist).
    A version found on enough tokens is remembered by the process; one that is not is looked up again on the next
    request (the request itself is retried: NotReplicated is transient)."""

    def __init__(self, hsm: Hsm, min_tokens: int) -> None:
        self.hsm = hsm
        self.min_tokens = min_tokens
        self._held: set[str] = set()

    def holders(self, db: Session, label: str) -> set[str]:
        """The tokens that reported holding ``label``, by rows whose MAC verifies."""
        rows = db.scalars(select(TokenKey).where(TokenKey.label == label, TokenKey.mac.is_not(None)))
        return {row.token for row in rows if _verifies(self.hsm, row)}

    def __call__(self, db: Session, version: RootKeyVersion) -> None:
        label = root_key_label(version.root_key_id, version.version)
        if label in self._held:
            return
        found = len(self.holders(db, label))
        if found < self.min_tokens:
            raise NotReplicated(
                f"root key {version.root_key_id} version {version.version} is on {found} of the {self.min_tokens} "
                "tokens KMSQ_MIN_TOKENS asks for; it is used once replicated (kmsq hsm replicate)"
            )
        self._held.add(label)
