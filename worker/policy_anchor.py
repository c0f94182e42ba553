"""The policy anchor: what the policy rows are now, held where a database writer cannot roll it back.

A policy MAC (worker.policy) proves that a row's values were sealed by an operator command, not that they are the
row's current values: a database writer who kept an earlier copy of a row (a backup, a replica, a WAL archive)
could put it back, MAC and all, and undo a ``caller disable``, a ``root-key rotate`` or a ``pool disable``. So the
token also holds a digest of every policy row's identity and MAC (callers, root keys, root key versions, pools):
each operator transaction that seals a row writes the digest of the rows it leaves, and a worker uses the rows
only while they hash to the anchored digest. A row put back, inserted or deleted changes the digest, and the
worker refuses every policy row until an operator has reviewed the rows and anchored them again
(``kmsq policy check``, ``kmsq policy seal``).

The anchor is a token data object (``worker.hsm.POLICY_ANCHOR_LABEL`` and the database's own id, from its
``deployment`` row: one token may anchor several databases) holding the canonical JSON
``{"v": 1, "epoch": N, "current": <digest>, "previous": <digest or null>}``. An operator transaction writes it
twice: before its commit, ``current`` is the state it commits and ``previous`` the state it replaces (both are
accepted while it commits, so that workers never see a state without an anchor); after the commit, only the
new state. The epoch orders anchors written by concurrent transactions (on Postgres they are serialized by an
advisory lock taken when the first row is sealed; SQLite serializes writers itself): a reader trusts the
anchors of the highest epoch, and a transaction confirms its commit only if no later one has anchored since.
A process that dies between its commit and the confirmation leaves ``previous`` accepted until the next
operator command: ``kmsq policy check`` reports it, ``kmsq policy seal`` confirms it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session, SessionTransaction

from schemas.wire import canonical_json
from worker.keystore import KeyStore
from worker.storage.models import Caller, Deployment, Pool, RootKey, RootKeyVersion, SigningRulesRow

log = logging.getLogger("kmsq.policy")
_ARMED = "kmsq.policy_anchor"
# pg_advisory_xact_lock's key: operator transactions that change policy rows take it, one at a time.
_ADVISORY_KEY = 0x6B6D_7371_706F_6C  # "kmsqpol"

RowKey = tuple[str, str]  # (kind, identity): ("caller", name), ("root_key_version", "rk-1:2")
PolicyState = dict[RowKey, str | None]  # each row's policy MAC (None: none)


@dataclass(frozen=True)
class Anchor:
    """An anchor object's content."""

    epoch: int
    current: str
    previous: str | None = None

    def accepts(self, digest: str) -> bool:
        """True when ``digest`` is a state this anchor vouches for."""
        return digest in (self.current, self.previous)

    def encode(self) -> bytes:
        """The object's value."""
        return canonical_json({"v": 1, "epoch": self.epoch, "current": self.current, "previous": self.previous})

    @classmethod
    def decode(cls, raw: bytes) -> Anchor | None:
        """The anchor in ``raw``, or None for a value that is not one."""
        try:
            data = json.loads(raw)
            anchor = cls(int(data["epoch"]), str(data["current"]), data["previous"])
        except (ValueError, KeyError, TypeError):
            return None
        if data.get("v") != 1 or not (anchor.previous is None or isinstance(anchor.previous, str)):
            return None
        return anchor


def row_key(row: Caller | RootKey | RootKeyVersion | Pool | SigningRulesRow) -> RowKey:
    """The identity of a policy row in the anchored state."""
    if isinstance(row, Caller):
        return ("caller", row.name)
    if isinstance(row, SigningRulesRow):
        return ("signing_rules", row.scope)
    if isinstance(row, RootKey):
        return ("root_key", row.id)
    if isinstance(row, Pool):
        return ("pool", row.name)
    return ("root_key_version", f"{row.root_key_id}:{row.version}")


def policy_state(db: Session) -> PolicyState:
    """Every policy row's identity and MAC, as ``db`` sees them (four small queries, no HSM)."""
    state: PolicyState = {}
    for name, mac in db.execute(select(Caller.name, Caller.policy_mac)):
        state[("caller", name)] = mac
    for key_id, mac in db.execute(select(RootKey.id, RootKey.policy_mac)):
        state[("root_key", key_id)] = mac
    for key_id, version, mac in db.execute(
        select(RootKeyVersion.root_key_id, RootKeyVersion.version, RootKeyVersion.policy_mac)
    ):
        state[("root_key_version", f"{key_id}:{version}")] = mac
    for name, mac in db.execute(select(Pool.name, Pool.policy_mac)):
        state[("pool", name)] = mac
    for scope, mac in db.execute(select(SigningRulesRow.scope, SigningRulesRow.policy_mac)):
        state[("signing_rules", scope)] = mac
    return state


def state_digest(state: PolicyState) -> str:
    """The hex SHA-256 of a policy state: its rows in order, each kind, identity and MAC length-prefixed."""
    digest = hashlib.sha256(b"kmsq/policy-state/v1\x00")
    for (kind, identity), mac in sorted(state.items()):
        for part in (kind, identity, mac or ""):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return digest.hexdigest()


def deployment_id(db: Session) -> str | None:
    """The database's identity (migration 0013), which names its anchor objects; None when its row is gone."""
    ids = db.scalars(select(Deployment.id)).all()
    return ids[0] if len(ids) == 1 else None


def anchors(hsm: KeyStore, scope: str | None, *, reread: bool = False) -> list[Anchor]:
    """The token's anchors of database ``scope`` of the highest epoch (more than one only while two operator
    transactions race), or an empty list when it has none; with ``reread``, after the token is read again."""
    if scope is None:
        return []
    raws = hsm.policy_anchors(scope, reread=reread)
    found = [a for a in (Anchor.decode(raw) for raw in raws) if a is not None]
    if not found:
        return []
    top = max(a.epoch for a in found)
    return [a for a in found if a.epoch == top]


def accepted(hsm: KeyStore, scope: str | None, state: PolicyState) -> bool:
    """True when the token anchors ``state`` for database ``scope`` (reading the token again before saying no:
    another process may have anchored it). Raises HsmUnavailable (transient)."""
    digest = state_digest(state)
    if any(a.accepts(digest) for a in anchors(hsm, scope)):
        return True
    return any(a.accepts(digest) for a in anchors(hsm, scope, reread=True))


def _write(hsm: KeyStore, scope: str, anchor: Anchor) -> None:
    """Writes ``anchor`` and removes every older anchor object of ``scope``."""
    older = [raw for raw in hsm.policy_anchors(scope) if (a := Anchor.decode(raw)) is None or a.epoch < anchor.epoch]
    hsm.write_policy_anchor(scope, anchor.encode(), older)


def adopt(hsm: KeyStore, scope: str, raw: bytes) -> bool:
    """Writes an anchor that another token of the deployment holds (worker.replication: it comes MACed under the
    policy key both tokens share) when it is newer than this token's own. Returns True when it was written."""
    anchor = Anchor.decode(raw)
    if anchor is None:
        return False
    found = anchors(hsm, scope, reread=True)
    if found and found[0].epoch >= anchor.epoch:
        return False
    _write(hsm, scope, anchor)
    return True


def _top_epoch(hsm: KeyStore, scope: str) -> tuple[int, str | None]:
    found = anchors(hsm, scope, reread=True)
    if not found:
        return 0, None
    confirmed = [a for a in found if a.previous is None]
    return found[0].epoch, (confirmed or found)[0].current


class NotAnchored(Exception):
    """The policy rows an operator command would change are not the anchored ones."""


Moved = Callable[[KeyStore, Any, str], None]  # (token, the session's bind, scope), after a confirmed move


def arm(hsm: KeyStore, db: Session, *, approve: bool = False, then: Moved | None = None) -> None:
    """Makes the commit of ``db``'s transaction also move the token's anchor to the policy rows it leaves (see
    the module docstring), then call ``then`` (worker.replication.share_anchor). Called when an operator command
    seals a row; once per transaction. On Postgres it takes the advisory lock that serializes such transactions
    until this one ends.

    Raises NotAnchored, unless ``approve`` (``kmsq policy seal``, whose job is to approve the rows as they are),
    when the rows as the transaction found them are not the anchored ones: an ordinary operator command must not
    anchor, along with its own change, a row someone put back meanwhile. (A token with no anchor yet and no
    policy row is a new deployment: its first command anchors.)"""
    if db.info.get(_ARMED):
        return
    with db.no_autoflush:  # the rows as they were before this command's own changes
        if db.get_bind().dialect.name == "postgresql":
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_KEY})
        scope = deployment_id(db)
        state = policy_state(db)
    if scope is None:
        raise NotAnchored("the database has no deployment row (migration 0013): its policy rows cannot be anchored")
    if not approve and (state or anchors(hsm, scope)) and not accepted(hsm, scope, state):
        raise NotAnchored(status(hsm, db).describe())
    db.info[_ARMED] = True
    _AnchorMove(hsm, scope, then).listen(db)


class _AnchorMove:
    """One transaction's move of the anchor: pending before its commit, confirmed after it, undone if it rolls
    back after the pending anchor was written."""

    def __init__(self, hsm: KeyStore, scope: str, then: Moved | None = None) -> None:
        self.hsm = hsm
        self.scope = scope
        self.then = then
        self.pending: Anchor | None = None
        self.committed = False
        self.over = False  # the transaction ended: its listeners do nothing more (removing them while the
        # session dispatches its events is not allowed)
        self._listeners: dict[str, Callable[..., Any]] = {
            "before_commit": self.before_commit,
            "after_commit": self.after_commit,
            "after_transaction_end": self.ended,
        }

    def listen(self, db: Session) -> None:
        for name, listener in self._listeners.items():
            event.listen(db, name, listener)

    def before_commit(self, session: Session) -> None:
        if self.over or session.in_nested_transaction():  # SQLAlchemy fires it for a savepoint's release too
            return
        session.flush()
        digest = state_digest(policy_state(session))
        epoch, current = _top_epoch(self.hsm, self.scope)
        self.pending = Anchor(epoch + 1, digest, current if current != digest else None)
        _write(self.hsm, self.scope, self.pending)

    def after_commit(self, session: Session) -> None:
        if self.over or session.in_nested_transaction():
            return
        self.committed = True
        if self.pending is not None:
            self._settle(self.pending.current, "confirmed")
            if self.then is not None:
                self.then(self.hsm, session.get_bind(), self.scope)

    def ended(self, session: Session, transaction: SessionTransaction) -> None:
        if self.over or transaction.parent is not None:  # over, or a savepoint
            return
        if self.pending is not None and not self.committed and self.pending.previous is not None:
            self._settle(self.pending.previous, "restored")  # rolled back: the state before is the only one again
        self.over = True
        session.info.pop(_ARMED, None)

    def _settle(self, digest: str, what: str) -> None:
        """Anchors ``digest`` alone, unless a later transaction anchored since (its anchor already covers it)."""
        assert self.pending is not None
        try:
            if _top_epoch(self.hsm, self.scope)[0] == self.pending.epoch:
                _write(self.hsm, self.scope, Anchor(self.pending.epoch + 1, digest))
        except Exception as e:  # the commit stands; the previous state stays accepted until the next one
            log.error("the policy anchor was not %s (%s): run `kmsq policy seal`", what, type(e).__name__)


@dataclass(frozen=True)
class AnchorStatus:
    """Whether the token anchors the policy rows as the database holds them."""

    epoch: int
    matches: bool
    pending: bool  # a transaction's commit is not confirmed: the state before it is still accepted
    present: bool

    def describe(self) -> str:
        """One line for operators."""
        if not self.present:
            return "the token has no policy anchor: workers refuse every request (run: kmsq policy seal)"
        if not self.matches:
            return (
                f"the policy rows do not match the token's anchor (epoch {self.epoch}): a row was put back, added "
                "or removed outside the operator commands, and workers refuse every request; review the rows, then "
                "run kmsq policy seal"
            )
        if self.pending:
            return f"anchored (epoch {self.epoch}), but an operator change was not confirmed: run kmsq policy seal"
        return f"anchored (epoch {self.epoch})"


def status(hsm: KeyStore, db: Session) -> AnchorStatus:
    """The anchor's status against the rows ``db`` sees (without its own changes not yet flushed)."""
    with db.no_autoflush:
        found = anchors(hsm, deployment_id(db))
        digest = state_digest(policy_state(db))
    matching = [a for a in found if a.accepts(digest)]
    return AnchorStatus(
        epoch=found[0].epoch if found else 0,
        matches=bool(matching),
        pending=any(a.previous is not None for a in matching),
        present=bool(found),
    )
