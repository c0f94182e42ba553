"""The rows that say who may do what, protected by a MAC under a key that never leaves the HSM.

A caller's row (its keys, operations, root keys, plaintext permission and state) and the security-relevant
columns of a root key (its pool, state and current version) and of each version (its HSM object, wrap
algorithm and state) decide what a request may do. With database access alone an attacker could widen a
caller, swap its keys or add one, and then get plaintext back through the workers with the broker access
every caller has: the replaced system's flaw again. So the operator commands, which reach the HSM, store
with each such row an HMAC-SHA256 (CKM_SHA256_HMAC, inside the token) of its canonical encoding under the
token's policy key, and workers check it on every load (:class:`TrustedRows`): a row that fails is refused as if
absent, and logged.

The encoding is worker.policy_rows'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import approvals, audit_log, policy_anchor, policy_rows, replication
from worker.errors import InvalidRequest
from worker.high_water import HighWater
from worker.keystore import KeyStore
from worker.policy_rows import PolicyRow, mac_input
from worker.storage.cache import TtlCache, detached_copy
from worker.storage.models import Caller, Pool, RootKey, RootKeyVersion, SigningRulesRow
from worker.storage.repo import RootKeyRepository

log = logging.getLogger("kmsq.policy")
_ABSENT = object()
_APPROVING = "kmsq.policy_approving"
AUTHORIZER = "kmsq.authorizer"  # db.info key: what gives a sealed row its evidence of approval
_PROCESS_AUTHORIZER: list[Any] = [None]  # set_process_authorizer: the operator keys this whole process signs with
R = TypeVar("R", Caller, RootKey, RootKeyVersion, Pool, SigningRulesRow)


class PolicyViolation(InvalidRequest):
    """A policy row's MAC is missing or does not verify: it was written outside the operator commands."""


class PolicyNotAnchored(PolicyViolation):
    """The policy rows do not hash to the token's anchor (a row put back, added or removed outside the operator
    commands, or no anchor yet): no policy row is trusted."""


def set_process_authorizer(authorizer: object) -> None:
    """Makes ``authorizer`` (worker.approvals.LocalOperators) give evidence to every row this process seals whose
    session names none: an operator tool that holds operator keys. Workers never hold any."""
    _PROCESS_AUTHORIZER[0] = authorizer


def seal(hsm: KeyStore, db: Session, row: PolicyRow) -> None:
    """Sets ``row.policy_mac`` for its current values (operator commands, after every change of the row),
    creating the token's policy key on first use; the commit of ``db``'s transaction then anchors the rows it
    leaves in the token (worker.policy_anchor). With an authorizer in ``db.info[AUTHORIZER]`` (the operators'
    keys a command holds, or an applied proposal: worker.approvals, worker.proposals) the row also gets its
    evidence of approval, or the authorizer raises (the change needs the quorum)."""
    hsm.ensure_policy_key()
    authorizer = db.info.get(AUTHORIZER) or _PROCESS_AUTHORIZER[0]
    if authorizer is not None:
        row.approval = authorizer.evidence_for(db, row, row.approval)
    row.policy_mac = hsm.policy_mac(mac_input(row)).hex()
    try:
        policy_anchor.arm(hsm, db, approve=db.info.get(_APPROVING, False), then=replication.share_anchor)
    except policy_anchor.NotAnchored as e:
        raise PolicyNotAnchored(f"{e}; no operator change is made until then") from None


def require(hsm: KeyStore, row: PolicyRow) -> None:
    """Raises PolicyViolation unless ``row`` verifies: an operator command changes only rows it can vouch for
    (re-sealing a row someone else changed would approve that change)."""
    if not verifies(hsm, row):
        raise PolicyViolation(
            f"{describe(row)} failed its policy check: review it, then run `kmsq policy seal` to approve it"
        )


def verifies(hsm: KeyStore, row: PolicyRow) -> bool:
    """True when ``row`` carries the MAC of its current values under this token's policy key."""
    return policy_rows.verifies(hsm, row)


def describe(row: PolicyRow) -> str:
    """Names a row for operators (never a secret: these rows hold public keys and identifiers)."""
    if isinstance(row, Caller):
        return f"caller {row.name}"
    if isinstance(row, RootKey):
        return f"root key {row.id}"
    if isinstance(row, Pool):
        return f"pool {row.name}"
    if isinstance(row, SigningRulesRow):
        return f"signing rules {row.scope[:60]}"
    return f"root key {row.root_key_id} version {row.version}"


# -- the rows a worker acts on ---------------------------------------------------------------------------


class TrustedRows:
    """Reads the policy rows an operation acts on: callers, root keys and their versions, and pools.

    With ``hsm`` (a worker), a row is used only if it carries the MAC of its current values under that token's
    policy key: one that does not is refused as if absent, and logged. Without (the operator commands, which
    check each row they change with :func:`require`), rows are read as the database holds them. With
    ``cache_seconds``, rows (and their absence) are kept that long as detached copies, so that a request does not
    spend queries and HSM calls on rows that change a few times a year; a change then reaches this process
    within that time. When the rows stop matching the token's anchor, ``catch_up`` (a worker on a token of a
    deployment with several: worker.replication.take_anchor) may move the anchor to the one another token left
    for this one; it returns True when it did, and the rows are checked again before they are refused.
    """

    def __init__(
        self, hsm: KeyStore | None = None, cache_seconds: float = 0.0,
        catch_up: Callable[[Session], bool] | None = None, *, operators: str | None = None,
        high_water: HighWater | None = None,
    ) -> None:  # fmt: skip
        if hsm is not None and operators is None:
            raise ValueError("a reader that checks rows needs the pinned operator set's digest (worker.operators)")
        self.hsm = hsm
        self.operators = operators
        self.high_water = high_water  # a worker's (worker.high_water): refuses an older approved copy of a row
        self._cache = TtlCache(cache_seconds)
        self._catch_up = catch_up

    def _approved(self, db: Session, row: PolicyRow) -> bool:
        """True when ``row`` carries evidence that the operators approved exactly its content (worker.approvals),
        from the operator sets' chain that the pinned genesis verifies (read once per cache period); logged when
        not."""
        assert self.operators is not None
        pinned = self.operators
        try:
            sets = self._cache.get(("operator_sets",), lambda: approvals.load_operator_sets(db, pinned))
            try:
                verified = approvals.verify_evidence(row, row.approval, sets)
            except approvals.ApprovalError:
                if approvals.chain_length(db) == sets.length:
                    raise
                # The operator set changed since the chain was read, and the rows were re-approved with it.
                self._cache.forget(("operator_sets",))
                sets = self._cache.get(("operator_sets",), lambda: approvals.load_operator_sets(db, pinned))
                verified = approvals.verify_evidence(row, row.approval, sets)
        except approvals.ApprovalError as e:
            log.error("refused %s: not approved by the operators (%s)", describe(row), e)
            return False
        name = approvals.row_name(row)
        if self.high_water is not None and not self.high_water.admits(
            policy_anchor.deployment_id(db), name, verified.seq, verified.approved_at
        ):
            log.error("refused %s: an older approved copy (change %d) than this host honoured before (%s): put "
                      "back?", describe(row), verified.seq, self.high_water.mark(policy_anchor.deployment_id(db),
                                                                                   name))  # fmt: skip
            return False
        return True

    def _anchored(self, db: Session, *, fresh: bool = False) -> policy_anchor.PolicyState:
        """The policy rows' identities and MACs, once the token's anchor vouches for them (read again at most
        once per cache period, or now with ``fresh``). Raises PolicyNotAnchored when it does not: a row was put
        back, added or removed outside the operator commands (or the token has no anchor), and no policy row is
        trusted then. Raises HsmUnavailable (transient)."""
        assert self.hsm is not None
        hsm = self.hsm

        def load() -> policy_anchor.PolicyState:
            state = policy_anchor.policy_state(db)
            scope = policy_anchor.deployment_id(db)
            if not policy_anchor.accepted(hsm, scope, state) and not (
                self._catch_up is not None and self._catch_up(db) and policy_anchor.accepted(hsm, scope, state)
            ):
                log.error("refused every policy row: %s", policy_anchor.status(hsm, db).describe())
                raise PolicyNotAnchored("the policy rows do not match the token's policy anchor")
            return state

        if fresh:
            self._cache.forget(("anchored",))
        return self._cache.get(("anchored",), load)

    def _trusted(self, db: Session, row: R | None) -> R | None:
        """``row`` unless it fails its MAC check or is not the anchored one; then None (logged). Raises
        PolicyNotAnchored when the rows are not anchored, HsmUnavailable (transient)."""
        if row is None or self.hsm is None:
            return row
        key = policy_anchor.row_key(row)
        state = self._anchored(db)
        if state.get(key, _ABSENT) != row.policy_mac:  # changed since the rows were last anchored: read them again
            state = self._anchored(db, fresh=True)
        if state.get(key, _ABSENT) == row.policy_mac and verifies(self.hsm, row):
            return row if self._approved(db, row) else None
        log.error("refused %s: its policy MAC is missing, wrong or not the anchored one (changed outside the "
                  "operator commands?)", describe(row))  # fmt: skip
        return None

    def _kept(self, row: R | None) -> R | None:
        return detached_copy(row) if row is not None and self._cache.ttl > 0 else row

    def caller(self, db: Session, name: str) -> Caller | None:
        """Returns the caller, enabled or not, or None. Raises PolicyViolation when its row fails the check."""

        def load() -> Caller | None:
            row = db.get(Caller, name)
            if row is not None and self._trusted(db, row) is None:
                raise PolicyViolation(f"{describe(row)} failed its policy check")
            return self._kept(row)

        return self._cache.get(("caller", name), load)

    def root_key(self, db: Session, root_key_id: str) -> RootKey | None:
        """Returns the root key, or None (absent, or failing its check)."""
        return self._cache.get(
            ("root_key", root_key_id),
            lambda: self._kept(self._trusted(db, RootKeyRepository(db).get(root_key_id))),
        )

    def root_key_version(self, db: Session, root_key_id: str, version: int) -> RootKeyVersion | None:
        """Returns the root key's version, or None (absent, or failing its check)."""
        return self._cache.get(
            ("root_key_version", root_key_id, version),
            lambda: self._kept(self._trusted(db, RootKeyRepository(db).get_version(root_key_id, version))),
        )

    def default_root_key(self, db: Session, pool: str) -> RootKey | None:
        """Returns the oldest enabled root key of ``pool`` that passes the check, or None: a row slipped in by
        someone else cannot make itself, or nothing, the pool's default."""

        def load() -> RootKey | None:
            enabled = RootKeyRepository(db).enabled_in_pool(pool)
            return self._kept(next((row for row in enabled if self._trusted(db, row) is not None), None))

        return self._cache.get(("default_root_key", pool), load)

    def signing_rules(self, db: Session) -> dict[str, SigningRulesRow]:
        """Returns every signing rules row by scope. Raises PolicyViolation when one fails its check: a rule
        someone changed or slipped in cannot be told from one that was loosened, so nothing signs then."""

        def load() -> dict[str, SigningRulesRow]:
            rows = {}
            for row in db.scalars(select(SigningRulesRow)):
                trusted = self._kept(self._trusted(db, row))
                if trusted is None:
                    raise PolicyViolation(f"{describe(row)} failed its policy check")
                rows[row.scope] = trusted
            return rows

        return self._cache.get(("signing_rules",), load)

    def pool_refusal(self, db: Session, pool: str) -> InvalidRequest | None:
        """Why a worker of ``pool`` must refuse requests now, or None. A pool is served only while its row is
        there, enabled, and passes its check: a row that fails counts as disabled (someone may have re-enabled it
        behind the operator), and no row means not served (someone may have deleted the disabled one)."""

        def load() -> str:  # the check (an HSM call) runs once per cache period, not per request
            row = db.get(Pool, pool)
            if row is None:
                return "has no policy row (an operator creates it: kmsq policy seal)"
            return f"is {row.state}" if self._trusted(db, row) is not None else "failed its policy check"

        state = self._cache.get(("pool", pool), load)
        if state in ("enabled", "is enabled"):
            return None
        return InvalidRequest(f"pool {pool} {state}")


# -- operator review --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowStatus:
    """One policy row and whether its MAC verifies."""

    row: str
    verifies: bool


def review(hsm: KeyStore, db: Session, *, seal_failing: bool = False) -> list[RowStatus]:
    """Checks every policy row; with ``seal_failing``, seals the ones that fail (the operator has reviewed
    them: ``kmsq caller list``, ``kmsq root-key list``), creates the missing row of each pool that has root keys
    (a pool is served only with its row), and anchors the result in the token (worker.policy_anchor). Returns each
    row's status before sealing (a missing pool row as failing)."""
    rows: list[PolicyRow] = [
        *db.scalars(select(Caller).order_by(Caller.name)),
        *db.scalars(select(RootKey).order_by(RootKey.id)),
        *db.scalars(select(RootKeyVersion).order_by(RootKeyVersion.root_key_id, RootKeyVersion.version)),
        *db.scalars(select(Pool).order_by(Pool.name)),
        *db.scalars(select(SigningRulesRow).order_by(SigningRulesRow.scope)),
    ]
    statuses = []
    if seal_failing:
        db.info[_APPROVING] = True  # the operator approves the rows as they are: no anchor check before sealing
        policy_anchor.arm(hsm, db, approve=True, then=replication.share_anchor)
    for row in rows:
        ok = verifies(hsm, row)
        statuses.append(RowStatus(describe(row), ok))
        if not ok and seal_failing:
            seal(hsm, db, row)
    have_rows = {row.name for row in rows if isinstance(row, Pool)}
    for name in sorted(set(db.scalars(select(RootKey.pool))) - have_rows):
        statuses.append(RowStatus(f"pool {name} (no row)", False))
        if seal_failing:
            ensure_pool_row(hsm, db, name)
    db.flush()
    sealed = [s.row for s in statuses if not s.verifies] if seal_failing else []
    if sealed:
        audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "policy seal", detail="; ".join(sealed))
    return statuses


def ensure_pool_row(hsm: KeyStore, db: Session, name: str) -> Pool:
    """Returns pool ``name``'s row, creating it (enabled, sealed) when it has none."""
    row = db.get(Pool, name)
    if row is None:
        row = Pool(name=name, state="enabled")
        seal(hsm, db, row)
        db.add(row)
        db.flush()
    return row
