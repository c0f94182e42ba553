"""Evidence that the operators approved a policy row's exact content (dual control, docs/DUAL_CONTROL.md).

A policy row's ``approval`` column holds its evidence, as JSON::

    {"v": 1,
     "base": {"change": <change document>, "approvals": [<approval>, ...]} | null,
     "steps": [<step>, ...]}

The *base* is a change document (schemas.quorum) that lists the row, with its sequence number and fields, and the
approvals of a quorum of the operator set the document names. Each *step* is one operator's signature over a move
from the row's content before to its content after: a ``restrict`` (the new content grants less: fewer
operations or root keys, no plaintext, disabled, a higher minimum decryption version) or an ``act`` of the few
kinds one operator may do alone (create a root key, its versions and its pool's row; rotate). A row is approved
when its base holds (or it has none and its first step creates it), every step verifies and follows the rules,
and the content it ends at is exactly the row's (the bytes its policy MAC covers). Its sequence number, which
every base and step signs, grows by one with each change.

The operator sets form a chain in ``operator_sets``: the genesis, whose digest each worker pins in its own
configuration, then each set that a quorum of the set before approved (:func:`load_operator_sets`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas.quorum import (
    Approval,
    OperatorIdentity,
    OperatorSet,
    QuorumError,
    Tally,
    approve,
    change_digest,
    expiry_of,
    tally,
)
from schemas.wire import WireError, canonical_json, sign, signing_public, verify
from worker import policy_anchor
from worker.errors import Forbidden
from worker.policy_rows import Fields, PolicyRow, encode_fields, policy_fields
from worker.storage.models import OperatorSetRecord

EVIDENCE_VERSION = 1
ADOPT = "operators.adopt"  # the genesis: every operator of the new set approves, and every policy row is listed
CHANGE_OPERATORS = "operators.change"
REAPPROVE = "policy.reapprove"  # a quorum approves every policy row as it is (after a database restore, say)
_STEP_DOMAIN = b"kmsq/policy-step/v1\x00"
DUE = "due"  # a change that time makes (a destruction after its wait, a rotation by its period): nobody signs it
STEP_KINDS = ("restrict", "act", DUE)
CLOCK_SKEW = timedelta(minutes=5)  # how far ahead of this host's clock a due step's time may be


class ApprovalError(Forbidden):
    """Evidence, an operator set or its chain does not verify (the text says why, never a secret)."""


class QuorumRequired(Forbidden):
    """A change needs the approvals of more operators than the command holds: it must be proposed."""


# -- rows -------------------------------------------------------------------------------------------------


def row_name(row: PolicyRow) -> str:
    """``caller:alice``, ``root_key:rk-1``, ``root_key_version:rk-1:2``, ``pool:alpha``."""
    kind, identity = policy_anchor.row_key(row)
    return f"{kind}:{identity}"


def content_digest(kind: str, fields: Fields) -> str:
    """Hex SHA-256 of the canonical encoding of a row's fields (what its MAC covers)."""
    return hashlib.sha256(encode_fields(kind, fields)).hexdigest()


def row_content(row: PolicyRow) -> tuple[str, Fields, str]:
    """The row's kind, fields and content digest."""
    kind, fields = policy_fields(row)
    return kind, fields, content_digest(kind, fields)


def _fields(raw: object) -> Fields:
    if not isinstance(raw, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in raw
    ):
        raise ApprovalError("malformed row fields")
    return tuple((name, value) for name, value in raw)


def _as_dict(fields: Fields) -> dict[str, str]:
    return dict(fields)


def _subset(narrow: str, wide: str, everything: str | None = None) -> bool:
    if everything is not None and wide == everything:
        return True
    if everything is not None and narrow == everything:
        return False
    return set(filter(None, narrow.split(","))) <= set(filter(None, wide.split(",")))


def narrower(kind: str, before: Fields, after: Fields) -> bool:
    """True when ``after`` grants nothing ``before`` did not: the same identity and keys, and only fewer
    operations or root keys, no plaintext, a disabled state, or a higher minimum decryption version."""
    old, new = _as_dict(before), _as_dict(after)
    state_ok = new.get("state") == old.get("state") or new.get("state") == "disabled"
    if kind == "caller":
        same: tuple[str, ...] = ("name", "signing_key", "signing_key_id", "reply_key")
        return (
            all(old.get(k) == new.get(k) for k in same)
            and set(new) - _CALLER_LIMITS == set(old) - _CALLER_LIMITS
            and _limits_narrower(old, new)
            and _subset(new["allowed_ops"], old["allowed_ops"])
            and _subset(new["root_keys"], old["root_keys"], everything="*")
            and int(new["plaintext"]) <= int(old["plaintext"])
            and state_ok
        )
    if kind == "root_key":
        same = ("id", "type", "pool", "current_version")
        lowest = (int(old.get("min_decryption_version", "1")), int(new.get("min_decryption_version", "1")))
        return all(old.get(k) == new.get(k) for k in same) and lowest[1] >= lowest[0] and state_ok
    if kind == "pool":
        return old.get("name") == new.get("name") and state_ok
    if kind == "signing_rules":
        return _rules_tightened(old, new)
    # A version changes only by the quorum (scheduling its destruction), a cancel or time (worker.schedule).
    return False


_CALLER_LIMITS = frozenset({"lane", "rate_requests", "rate_items"})  # covered once set (worker.policy_rows)


def _limits_narrower(old: Mapping[str, str], new: Mapping[str, str]) -> bool:
    """True when a caller's new lane and quotas allow it nothing the old did not: a quota set or lowered, never
    removed or raised; the bulk lane kept once set."""
    for rate in ("rate_requests", "rate_items"):
        if rate in old and (rate not in new or float(new[rate]) > float(old[rate])):
            return False
    return old.get("lane") != "bulk" or new.get("lane") == "bulk"


def _rules_tightened(old: Mapping[str, str], new: Mapping[str, str]) -> bool:
    """True when a signing rules row's new document allows nothing its old one did not, for the same scope and
    wallet keys."""
    from schemas.signing_rules import RulesError, looser, parse_rules

    if set(old) != set(new) or old.get("scope") != new.get("scope") or old.get("members") != new.get("members"):
        return False
    try:
        return not looser(parse_rules(old["rules"]), parse_rules(new["rules"]))
    except (RulesError, KeyError):
        return False


def one_operator_act(kind: str, before: Fields | None, after: Fields) -> bool:
    """True for the changes one operator makes alone because they grant nobody anything: a new root key (enabled,
    version 1), a new version of one, a new pool row, a rotation (the current version one higher, nothing else
    changed), and a pending destruction cancelled (the version back as it was)."""
    new = _as_dict(after)
    if before is None:
        if kind == "signing_rules":  # rules for a wallet, coin or caller bind on top of a key's: they only add
            return new.get("scope", "").startswith(("wallet:", "coin:", "caller:"))
        if kind == "root_key":
            return new.get("state") == "enabled" and new.get("current_version") == "1"
        return kind in ("root_key_version", "pool") and new.get("state") == "enabled"
    old = _as_dict(before)
    if kind == "root_key_version" and old.get("state") == "pending_destroy":  # a destruction cancelled
        return new == {k: v for k, v in old.items() if k != "destroy_wait_days"} | {"state": "enabled"}
    if kind != "root_key" or not old.get("current_version", "").isdigit():
        return False
    rotated = dict(old, current_version=str(int(old["current_version"]) + 1))
    return rotated == new


# -- operator sets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorSets:
    """The deployment's operator sets, verified from the pinned genesis: each by digest, and the current one."""

    by_digest: Mapping[str, OperatorSet]
    current: OperatorSet
    made_by: str = ""  # digest of the change document that made the current set (its adoption or last change)
    made_by_operators: tuple[str, ...] = ()  # who approved that change
    made_at: datetime | None = None  # when the last of them approved it
    length: int = 0  # how many sets the chain holds

    def named(self, digest: object) -> OperatorSet:
        """The set with ``digest``. Raises ApprovalError when it is not in the chain."""
        found = self.by_digest.get(str(digest))
        if found is None:
            raise ApprovalError("approved under an operator set that is not in the deployment's chain")
        return found


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ApprovalError(f"malformed {what}") from None


def _approvals(raw: object) -> list[Approval]:
    if not isinstance(raw, list):
        raise ApprovalError("malformed approvals")
    try:
        return [Approval.from_document(a) for a in raw]
    except QuorumError as e:
        raise ApprovalError(str(e)) from None


def check_adoption(document: Mapping[str, Any], approvals: Sequence[Approval], operators: OperatorSet) -> None:
    """Raises ApprovalError unless ``document`` adopts ``operators`` and every one of them approved it."""
    if document.get("action") != ADOPT or document.get("operator_set") != operators.digest:
        raise ApprovalError("the genesis change does not adopt its operator set")
    everyone = OperatorSet(operators.operators, len(operators.operators))
    if not tally(change_digest(document), _expiry(document), approvals, everyone).met:
        raise ApprovalError("the genesis is not approved by every operator it adopts")


def _expiry(document: Mapping[str, Any]) -> datetime:
    try:
        return expiry_of(document)
    except QuorumError as e:
        raise ApprovalError(str(e)) from None


def load_operator_sets(db: Session, pinned: str) -> OperatorSets:
    """The chain of operator sets in ``db``, verified from the genesis whose digest is ``pinned``: the genesis
    approved by all its operators, each later set by a quorum of the one before. Raises ApprovalError."""
    records = list(db.scalars(select(OperatorSetRecord).order_by(OperatorSetRecord.seq)))
    if not records:
        raise ApprovalError(
            "the database has no operator set (kmsq init; with --operators, every operator approves "
            "its adoption: kmsq proposals)"
        )
    by_digest: dict[str, OperatorSet] = {}
    previous: OperatorSet | None = None
    made_by, approvers, made_at = "", tuple[str, ...](), None
    for index, record in enumerate(records):
        if record.seq != index:
            raise ApprovalError("the operator sets' chain has a gap")
        try:
            operators = OperatorSet.from_document(_loads(record.document, "operator set"))
        except QuorumError as e:
            raise ApprovalError(str(e)) from None
        if operators.digest != record.digest:
            raise ApprovalError("an operator set does not match its digest")
        document = _loads(record.change, "change document")
        approvals = _approvals(_loads(record.approvals, "approvals"))
        if previous is None:
            if operators.digest != pinned:
                raise ApprovalError("the database's genesis operator set is not the one this host pins")
            check_adoption(document, approvals, operators)
            approvers = tuple(dict.fromkeys(a.operator for a in approvals))
        else:
            if (
                document.get("action") != CHANGE_OPERATORS
                or document.get("operator_set") != previous.digest
                or (document.get("new_operator_set") != operators.digest)
            ):
                raise ApprovalError("an operator set was not made by a change of the set before it")
            approvers = check_operator_change(document, approvals, previous, operators)
        by_digest[operators.digest] = operators
        previous, made_by, made_at = operators, change_digest(document), approved_at(approvals, approvers)
    assert previous is not None
    return OperatorSets(by_digest, previous, made_by, approvers, made_at, len(records))


def approved_at(approvals: Sequence[Approval], counted: Sequence[str]) -> datetime:
    """When the last of the ``counted`` operators approved (each one's first approval: the one a tally counts)."""
    first: dict[str, datetime] = {}
    for approval in approvals:
        if approval.operator in counted and approval.operator not in first:
            first[approval.operator] = datetime.fromisoformat(approval.approved_at)
    return max(first.values())


def chain_length(db: Session) -> int:
    """How many operator sets the deployment's chain holds (0 before its adoption)."""
    return int(db.scalar(select(func.count()).select_from(OperatorSetRecord)) or 0)


def proposed_set(document: Mapping[str, Any]) -> OperatorSet:
    """The operator set that an ``operators.change`` document makes. Raises ApprovalError."""
    try:
        new = OperatorSet.from_document(document["arguments"]["operator_set"])
    except (KeyError, TypeError, QuorumError) as e:
        raise ApprovalError(f"the change names no valid operator set ({e})") from None
    if document.get("new_operator_set") != new.digest:
        raise ApprovalError("the change's operator set does not match its digest")
    return new


def operator_change_tallies(
    document: Mapping[str, Any], approvals: Sequence[Approval], previous: OperatorSet, new: OperatorSet
) -> tuple[Tally, Tally]:
    """How ``approvals`` of an ``operators.change`` count under the set it replaces and the set it makes."""
    digest, expires = change_digest(document), _expiry(document)
    return tally(digest, expires, approvals, previous), tally(digest, expires, approvals, new)


def check_operator_change(
    document: Mapping[str, Any], approvals: Sequence[Approval], previous: OperatorSet, new: OperatorSet
) -> tuple[str, ...]:
    """Returns who approved the change from ``previous`` to ``new``; raises ApprovalError unless a quorum of each
    did (as TUF rotates its root: the set being replaced consents, and the new one shows it holds its keys)."""
    before, after = operator_change_tallies(document, approvals, previous, new)
    if not before.met:
        raise ApprovalError(f"an operator set change approved by {len(before.counted)} of the {previous.quorum} "
                            "operators of the set before it that it needs")  # fmt: skip
    if not after.met:
        raise ApprovalError(f"an operator set change approved by {len(after.counted)} of the {new.quorum} "
                            "operators of the new set that it needs")  # fmt: skip
    return tuple(dict.fromkeys(before.counted + after.counted))


# -- evidence ---------------------------------------------------------------------------------------------


def _step_input(step: Mapping[str, Any]) -> bytes:
    signed = {k: step.get(k) for k in ("kind", "row", "seq", "from", "fields", "operator", "operator_set", "at")}
    return _STEP_DOMAIN + canonical_json(signed)


@dataclass(frozen=True)
class Verified:
    """What verified evidence says of its row."""

    seq: int
    approved_by: tuple[str, ...]  # the base's operators, then each step's
    fields: Fields
    approved_at: datetime | None = None  # when the content it ends at was approved (or changed when due)


def verify_evidence(row: PolicyRow, evidence: str | None, sets: OperatorSets) -> Verified:
    """Checks ``row``'s evidence (its ``approval`` column) for exactly its current content. Returns what it
    says; raises ApprovalError saying why it does not hold."""
    kind, _, digest = row_content(row)
    verified = verify_chain(kind, row_name(row), evidence, sets)
    if content_digest(kind, verified.fields) != digest:
        raise ApprovalError("approved for other content than the row holds")
    return verified


def verify_chain(kind: str, name: str, evidence: str | None, sets: OperatorSets) -> Verified:
    """Checks evidence of the row ``name`` (of ``kind``): its base and every step. Returns the content it ends
    at, its sequence number and who approved; raises ApprovalError."""
    if not evidence:
        raise ApprovalError("no operator approval")
    data = _loads(evidence, "evidence")
    if not isinstance(data, dict) or data.get("v") != EVIDENCE_VERSION or not isinstance(data.get("steps"), list):
        raise ApprovalError("malformed evidence")
    state = Verified(0, (), ()) if data.get("base") is None else _verify_base(name, data["base"], sets)
    fields: Fields | None = state.fields if data.get("base") is not None else None
    seq, approved_by, at = state.seq, list(state.approved_by), state.approved_at
    for step in data["steps"]:
        operator, at = _verify_step(kind, name, step, fields, seq, at, sets)
        fields, seq = _fields(step["fields"]), seq + 1
        if operator is not None:
            approved_by.append(operator)
    if fields is None:
        raise ApprovalError("no operator approval")
    return Verified(seq, tuple(approved_by), fields, at)


def _verify_base(name: str, base: object, sets: OperatorSets) -> Verified:
    """The row's entry in a base change document, once a quorum's approvals of it verify."""
    if not isinstance(base, dict) or not isinstance(base.get("change"), dict):
        raise ApprovalError("malformed evidence")
    document = base["change"]
    if document.get("action") in (ADOPT, CHANGE_OPERATORS):
        # Only the change that made the current set vouches for rows: it listed every one, and the chain's check
        # (load_operator_sets) verified its approvals.
        if change_digest(document) != sets.made_by:
            raise ApprovalError("approved by an earlier operator set (superseded by a change of the set)")
        counted, at = sets.made_by_operators, sets.made_at
    else:
        if document.get("operator_set") != sets.current.digest:
            sets.named(document.get("operator_set"))
            raise ApprovalError("approved under an earlier operator set (superseded by a change of the set)")
        approvals = _approvals(base.get("approvals"))
        result = tally(change_digest(document), _expiry(document), approvals, sets.current)
        if not result.met:
            raise ApprovalError(f"approved by {len(result.counted)} of the {sets.current.quorum} operators needed")
        counted, at = result.counted, approved_at(approvals, result.counted)
    rows = document.get("rows")
    entries = [e for e in rows if isinstance(e, dict) and e.get("row") == name] if isinstance(rows, list) else []
    if len(entries) != 1 or not isinstance(entries[0].get("seq"), int):
        raise ApprovalError("the approved change does not list this row")
    return Verified(entries[0]["seq"], counted, _fields(entries[0].get("fields")), at)


def _verify_step(
    kind: str, name: str, step: object, before: Fields | None, seq: int, at: datetime | None, sets: OperatorSets
) -> tuple[str | None, datetime | None]:
    """Returns the operator who signed ``step`` (None for a ``due`` step, which nobody signs) and when the content
    it makes was approved, once it verifies and follows ``before`` (approved at ``at``) by the rules."""
    if not isinstance(step, dict) or step.get("kind") not in STEP_KINDS or step.get("row") != name:
        raise ApprovalError("malformed step")
    after = _fields(step.get("fields"))
    if step.get("from") != (content_digest(kind, before) if before is not None else None) or step.get("seq") != seq + 1:
        raise ApprovalError("a step does not follow the content before it")
    if step["kind"] == DUE:
        return None, _verify_due(kind, before, after, at, step.get("at"))
    if step.get("operator_set") != sets.current.digest:
        sets.named(step.get("operator_set"))
        raise ApprovalError("a step signed under an earlier operator set (superseded by a change of the set)")
    operator = sets.current.get(str(step.get("operator")))
    if operator is None:
        raise ApprovalError("a step by an operator outside its set")
    try:
        verify(signing_public(operator.signing_key), str(step.get("signature")), _step_input(step))
    except WireError:
        raise ApprovalError("a step's signature does not verify") from None
    if step["kind"] == "restrict":
        allowed = before is not None and narrower(kind, before, after)
    else:
        allowed = one_operator_act(kind, before, after)
    if not allowed:
        raise ApprovalError(f"a {step['kind']} step that one operator may not make")
    return operator.name, _step_time(step.get("at"))


def _step_time(value: object) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise ApprovalError("a step without a valid time") from None
    if moment.tzinfo is None:
        raise ApprovalError("a step without a valid time")
    return moment


def due_at(kind: str, before: Fields, after: Fields, approved: datetime | None) -> datetime | None:
    """When the change from ``before`` (approved at ``approved``) to ``after`` falls due by itself, or None when it
    is not one that time makes: a version waiting for destruction destroyed ``destroy_wait_days`` after its
    approval; a root key with a rotation period rotated that long after its last change."""
    if approved is None:
        return None
    old, new = _as_dict(before), _as_dict(after)
    if kind == "root_key_version" and old.get("state") == "pending_destroy":
        days = old.get("destroy_wait_days", "")
        if days.isdigit() and new == dict(old, state="destroyed"):
            return approved + timedelta(days=int(days))
    if kind == "root_key" and old.get("state") == "enabled" and old.get("current_version", "").isdigit():
        days = old.get("rotation_period_days", "")
        if days.isdigit() and new == dict(old, current_version=str(int(old["current_version"]) + 1)):
            return approved + timedelta(days=int(days))
    return None


def _verify_due(kind: str, before: Fields | None, after: Fields, approved: datetime | None, at: object) -> datetime:
    """The time of a ``due`` step, once the change is one that time makes and it fell due by this host's clock. A
    new version of a root key is one (a rotation by its period makes it; it grants nothing until the root key's
    own row, by an approved change or its rotation period, names it)."""
    moment = _step_time(at)
    if before is None:
        if (
            kind != "root_key_version"
            or _as_dict(after).get("state") != "enabled"
            or "destroy_wait_days" in dict(after)
        ):
            raise ApprovalError("a due step that is not a change time makes")
        if moment > datetime.now(UTC) + CLOCK_SKEW:
            raise ApprovalError("a due step made before the change fell due")
        return moment
    due = due_at(kind, before, after, approved)
    if due is None:
        raise ApprovalError("a due step that is not a change time makes")
    if moment < due or moment > datetime.now(UTC) + CLOCK_SKEW:
        raise ApprovalError("a due step made before the change fell due")
    return moment


def evidence_document(base: Mapping[str, Any] | None, steps: Sequence[Mapping[str, Any]]) -> str:
    """The ``approval`` column's JSON."""
    return canonical_json({"v": EVIDENCE_VERSION, "base": base, "steps": list(steps)}).decode()


def sign_step(
    identity: OperatorIdentity, kind: str, row: str, seq: int, before: str | None, fields: Fields,
    operator_set: str, now: datetime | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One operator's ``restrict`` or ``act`` step of ``row`` to ``fields``."""
    step: dict[str, Any] = {"kind": kind, "row": row, "seq": seq, "from": before, "fields": [list(f) for f in fields],
                            "operator": identity.name, "operator_set": operator_set,
                            "at": (now or datetime.now(UTC)).isoformat()}  # fmt: skip
    step["signature"] = sign(identity.signing, _step_input(step))
    return step


# -- the operator side: attaching evidence when a row is sealed ---------------------------------------------


@dataclass
class LocalOperators:
    """The operator identities an operator command holds (one, usually: the operator running it; the embedded
    default's 1-of-1 key; a test's keys). When a row is sealed it attaches evidence for the row's new content: a
    ``restrict`` or ``act`` step signed by the first of them when one operator may make the change alone, else a
    change document approved by all of them, if they are a quorum. Otherwise raises QuorumRequired."""

    identities: Sequence[OperatorIdentity]
    genesis: OperatorSet  # the pinned one
    action: str = "seal"
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC), repr=False)  # when they sign
    _sets: dict[str, OperatorSets] = field(default_factory=dict, repr=False)  # by database

    def sets(self, db: Session) -> OperatorSets:
        """The verified operator sets of ``db``'s deployment (read once per command and database). A database
        without any is adopted by the pinned genesis when this command holds every one of its operators' keys
        (``kmsq init``'s 1-of-1)."""
        scope = policy_anchor.deployment_id(db) or str(db.get_bind().engine.url)
        if scope not in self._sets:
            if db.scalar(select(OperatorSetRecord.seq).limit(1)) is None and self.holds_genesis():
                self.adopt(db)
            self._sets[scope] = load_operator_sets(db, self.genesis.digest)
        return self._sets[scope]

    def holds_genesis(self) -> bool:
        """True when this command holds the key of every operator of the genesis."""
        held = {i.public for i in self.identities}
        return all(o in held for o in self.genesis.operators)

    def adopt(self, db: Session) -> None:
        """Writes the genesis, adopting every current policy row, approved by every operator's key held here."""
        document = adoption_document(db, self.genesis, self.identities[0].name)
        digest = change_digest(document)
        approvals = [approve(i, digest) for i in self.identities if i.public in self.genesis.operators]
        write_genesis(db, self.genesis, document, approvals)

    def evidence_for(self, db: Session, row: PolicyRow, previous: str | None) -> str:
        """The evidence for ``row``'s new content, given its ``previous`` evidence (None for a new row or one
        without). Raises QuorumRequired or ApprovalError."""
        sets = self.sets(db)
        current = sets.current
        mine = [i for i in self.identities if (o := current.get(i.name)) is not None and o == i.public]
        if not mine:
            raise QuorumRequired("no operator key of the current operator set is available to this command "
                                 "(--operator-key, KMSQ_OPERATOR_KEY)")  # fmt: skip
        kind, fields, _ = row_content(row)
        before: Verified | None = None
        data: dict[str, Any] | None = None
        if previous:
            try:
                before = verify_chain(kind, row_name(row), previous, sets)
                data = json.loads(previous)
            except ApprovalError:
                before = None
        if before is not None and before.fields == fields:
            return previous or ""
        step_kind = None
        if before is not None and narrower(kind, before.fields, fields):
            step_kind = "restrict"
        elif one_operator_act(kind, before.fields if before is not None else None, fields) and (
            before is not None or not previous
        ):
            step_kind = "act"
        name = row_name(row)
        seq = (before.seq if before is not None else 0) + 1
        if step_kind is not None:
            prior = content_digest(kind, before.fields) if before is not None else None
            step = sign_step(mine[0], step_kind, name, seq, prior, fields, current.digest, self.clock())
            base = data.get("base") if data is not None and before is not None else None
            steps = [*(data or {}).get("steps", []), step] if before is not None else [step]
            return evidence_document(base, steps)
        if len(mine) < current.quorum:
            raise QuorumRequired(
                f"{name}: this change needs {current.quorum} of the {len(current.operators)} operators "
                f"({current.describe()}): propose it (kmsq propose ...)"
            )
        now = self.clock()
        document = change_document(self.action, [(name, seq, fields)], current.digest, mine[0].name, now=now)
        digest = change_digest(document)
        approvals = [approve(i, digest, now).document() for i in mine]
        return evidence_document({"change": document, "approvals": approvals}, [])


@dataclass
class TimeMade:
    """Gives evidence to a change that time makes (worker.schedule: a version destroyed after its wait, a root key
    rotated by its period, with its new version): a ``due`` step that nobody signs, which every reader checks
    against the approved content before it and its own clock. Raises ApprovalError for any other change, or one
    not due yet."""

    sets: OperatorSets
    now: datetime

    def evidence_for(self, db: Session, row: PolicyRow, previous: str | None) -> str:
        kind, fields, _ = row_content(row)
        name = row_name(row)
        if not previous and kind == "root_key_version":  # the new version a rotation by its period makes
            step = {"kind": DUE, "row": name, "seq": 1, "from": None, "fields": [list(f) for f in fields],
                    "at": self.now.isoformat()}  # fmt: skip
            return evidence_document(None, [step])
        before = verify_chain(kind, name, previous, self.sets)
        due = due_at(kind, before.fields, fields, before.approved_at)
        if due is None or due > self.now:
            raise ApprovalError(f"{name}: not a change that has fallen due")
        step = {"kind": DUE, "row": name, "seq": before.seq + 1, "from": content_digest(kind, before.fields),
                "fields": [list(f) for f in fields], "at": self.now.isoformat()}  # fmt: skip
        data = json.loads(previous or "{}")
        return evidence_document(data.get("base"), [*data.get("steps", []), step])


def change_document(
    action: str, rows: Sequence[tuple[str, int, Fields]], operator_set: str, proposed_by: str,
    *, arguments: Mapping[str, Any] | None = None, ttl_hours: float = 24, now: datetime | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A change document listing ``rows`` (name, seq, fields) for approval under ``operator_set``."""
    import uuid
    from datetime import timedelta

    moment = now or datetime.now(UTC)
    return {
        "kind": "kmsq-change", "v": 1, "id": str(uuid.uuid4()), "action": action, "arguments": dict(arguments or {}),
        "rows": [{"row": n, "seq": s, "fields": [list(f) for f in fs],
                  "content": content_digest(n.split(":", 1)[0], fs)} for n, s, fs in rows],
        "operator_set": operator_set, "proposed_by": proposed_by, "proposed_at": moment.isoformat(),
        "expires_at": (moment + timedelta(hours=ttl_hours)).isoformat(),
    }  # fmt: skip


def policy_rows(db: Session) -> list[PolicyRow]:
    """Every policy row, in a fixed order (callers, root keys, versions, pools)."""
    from worker.storage.models import Caller, Pool, RootKey, RootKeyVersion, SigningRulesRow

    return [
        *db.scalars(select(Caller).order_by(Caller.name)),
        *db.scalars(select(RootKey).order_by(RootKey.id)),
        *db.scalars(select(RootKeyVersion).order_by(RootKeyVersion.root_key_id, RootKeyVersion.version)),
        *db.scalars(select(Pool).order_by(Pool.name)),
        *db.scalars(select(SigningRulesRow).order_by(SigningRulesRow.scope)),
    ]


def adoption_document(
    db: Session, operators: OperatorSet, proposed_by: str, *, ttl_hours: float = 24
) -> dict[str, Any]:
    """The genesis change: ``operators`` adopt the deployment, and with it every policy row as it is now (each
    at the sequence number after its current evidence's, or 1)."""
    rows = []
    for row in policy_rows(db):
        name = row_name(row)
        rows.append((name, _last_seq(row.approval, name) + 1, policy_fields(row)[1]))
    return change_document(ADOPT, rows, operators.digest, proposed_by, arguments={"operator_set": operators.document()},
                           ttl_hours=ttl_hours)  # fmt: skip


def _last_seq(evidence: str | None, name: str) -> int:
    """The sequence number the evidence of row ``name`` ends at, as it claims (0 when there is none or it is
    unreadable)."""
    try:
        data = json.loads(evidence or "null")
        steps = data.get("steps") or []
        if steps:
            return int(steps[-1]["seq"])
        return max((int(e["seq"]) for e in data["base"]["change"]["rows"] if e["row"] == name), default=0)
    except (ValueError, AttributeError, TypeError, KeyError):
        return 0


def claimed_approval_time(evidence: str | None) -> datetime | None:
    """When the content that ``evidence`` ends at was approved, as it claims (for display: readers verify it with
    :func:`verify_chain`), or None when it says nothing readable."""
    try:
        data = json.loads(evidence or "null")
        steps = data.get("steps") or []
        if steps:
            return datetime.fromisoformat(steps[-1]["at"])
        return max(datetime.fromisoformat(a["approved_at"]) for a in data["base"]["approvals"])
    except (ValueError, AttributeError, TypeError, KeyError):
        return None


def write_genesis(
    db: Session, operators: OperatorSet, document: Mapping[str, Any], approvals: Sequence[Approval]
) -> None:
    """Stores the genesis that ``document`` (from :func:`adoption_document`) and the approvals of every operator
    make, and gives each row the document lists its evidence. Raises ApprovalError when the approvals do not
    hold, the database already has an operator set, or a row changed since the document was made."""
    check_adoption(document, approvals, operators)
    if db.scalar(select(OperatorSetRecord.seq).limit(1)) is not None:
        raise ApprovalError("the deployment already has an operator set: it changes only by quorum")
    _rebase(db, document, approvals, "the adoption")
    _append_set(db, 0, operators, document, approvals)


def operator_change_document(
    db: Session, sets: OperatorSets, new: OperatorSet, proposed_by: str, *, ttl_hours: float = 24
) -> dict[str, Any]:
    """The change of the current operator set to ``new``: it lists every policy row as it is now (each at the
    sequence number after its current evidence's), which the change then vouches for under ``new``. Raises
    ApprovalError when ``new`` is the current set."""
    if new == sets.current:
        raise ApprovalError("that is the current operator set")
    rows = [(name, _last_seq(row.approval, name) + 1, policy_fields(row)[1])
            for row in policy_rows(db) for name in (row_name(row),)]  # fmt: skip
    document = change_document(CHANGE_OPERATORS, rows, sets.current.digest, proposed_by,
                               arguments={"operator_set": new.document()}, ttl_hours=ttl_hours)  # fmt: skip
    document["new_operator_set"] = new.digest
    return document


def write_operator_change(
    db: Session, sets: OperatorSets, document: Mapping[str, Any], approvals: Sequence[Approval]
) -> OperatorSet:
    """Appends the set that ``document`` (from :func:`operator_change_document`) makes to the chain, once a quorum
    of the current set and one of the new set approved it, and gives every policy row the document as its
    evidence (what an earlier set approved no longer counts). Returns the new set. Raises ApprovalError."""
    if document.get("action") != CHANGE_OPERATORS or document.get("operator_set") != sets.current.digest:
        raise ApprovalError("not a change of the current operator set: propose it again")
    new = proposed_set(document)
    check_operator_change(document, approvals, sets.current, new)
    if chain_length(db) != sets.length:
        raise ApprovalError("the operator set changed meanwhile: propose it again")
    _rebase(db, document, approvals, "the change of the operator set")
    _append_set(db, sets.length, new, document, approvals)
    return new


def reapproval_document(db: Session, sets: OperatorSets, proposed_by: str, *, ttl_hours: float = 24) -> dict[str, Any]:
    """The change by which a quorum of the current set approves every policy row as it is now (each at the
    sequence number after its current evidence's): after a database restored from a backup, the workers that
    honoured newer rows (worker.high_water) accept these once approved, with a newer approval time."""
    rows = [(name, _last_seq(row.approval, name) + 1, policy_fields(row)[1])
            for row in policy_rows(db) for name in (row_name(row),)]  # fmt: skip
    return change_document(REAPPROVE, rows, sets.current.digest, proposed_by, ttl_hours=ttl_hours)


def write_reapproval(
    db: Session, sets: OperatorSets, document: Mapping[str, Any], approvals: Sequence[Approval]
) -> None:
    """Gives every policy row ``document`` (from :func:`reapproval_document`) and a quorum's ``approvals`` as its
    evidence. Raises ApprovalError (not a quorum of the current set, or the rows changed since)."""
    if document.get("action") != REAPPROVE or document.get("operator_set") != sets.current.digest:
        raise ApprovalError("not a re-approval under the current operator set: propose it again")
    if not tally(change_digest(document), _expiry(document), approvals, sets.current).met:
        raise ApprovalError("a re-approval needs a quorum of the current operator set")
    _rebase(db, document, approvals, "the re-approval")


def _rebase(db: Session, document: Mapping[str, Any], approvals: Sequence[Approval], what: str) -> None:
    """Gives every policy row ``document`` (listing each one exactly as it is) and ``approvals`` as its evidence.
    Raises ApprovalError when the rows differ from the listed ones."""
    listed = {e["row"]: e for e in document["rows"]}
    rows = {row_name(row): row for row in policy_rows(db)}
    if set(listed) != set(rows):
        raise ApprovalError(f"the policy rows changed since {what} was proposed: propose it again")
    base = {"change": dict(document), "approvals": [a.document() for a in approvals]}
    for name, row in rows.items():
        if _fields(listed[name]["fields"]) != policy_fields(row)[1]:
            raise ApprovalError(f"{name} changed since {what} was proposed: propose it again")
        if listed[name]["seq"] != _last_seq(row.approval, name) + 1:
            raise ApprovalError(f"{name} changed since {what} was proposed: propose it again")
        row.approval = evidence_document(base, [])


def _append_set(
    db: Session, seq: int, operators: OperatorSet, document: Mapping[str, Any], approvals: Sequence[Approval]
) -> None:
    db.add(OperatorSetRecord(seq=seq, digest=operators.digest, document=canonical_json(operators.document()).decode(),
                             change=canonical_json(dict(document)).decode(),
                             approvals=json.dumps([a.document() for a in approvals])))  # fmt: skip
    db.flush()


def row_named(db: Session, name: str) -> PolicyRow | None:
    """The policy row called ``name`` (``caller:alice``, ``root_key_version:rk-1:2``, ...), or None."""
    from worker.storage.models import Caller, Pool, RootKey, RootKeyVersion, SigningRulesRow

    kind, _, identity = name.partition(":")
    if kind == "caller":
        return db.get(Caller, identity)
    if kind == "signing_rules":
        return db.get(SigningRulesRow, identity)
    if kind == "root_key":
        return db.get(RootKey, identity)
    if kind == "pool":
        return db.get(Pool, identity)
    if kind == "root_key_version":
        key, _, version = identity.rpartition(":")
        return db.get(RootKeyVersion, (key, int(version))) if version.isdigit() else None
    return None
