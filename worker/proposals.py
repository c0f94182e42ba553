"""Proposals: a sensitive change waiting for the operators' approvals (dual control, docs/DUAL_CONTROL.md).

:func:`propose` runs the change's action in a transaction that is rolled back, recording every policy row the
action would seal, and stores the change document listing them (with their sequence numbers and fields).
:func:`add_approval` stores one operator's signature over the document's digest. :func:`apply` runs the action
again, for real, once a quorum approved: every row it seals must be one the document lists, exactly, and each
gets the document and its approvals as evidence; if the database moved meanwhile, apply refuses and the change
is proposed again. Every step is an audit record naming the operators and their key ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.quorum import Approval, QuorumError, change_digest, expiry_of, tally
from schemas.wire import canonical_json
from worker import audit_log, policy
from worker.approvals import (
    ApprovalError,
    OperatorSets,
    _last_seq,
    change_document,
    evidence_document,
    row_content,
    row_name,
)
from worker.errors import Conflict, Forbidden, InvalidRequest, NotFound
from worker.keystore import KeyStore
from worker.policy import Fields, PolicyRow
from worker.storage.models import Proposal, ProposalApproval

Action = Callable[[KeyStore, Session, Mapping[str, Any]], object]
ACTIONS: dict[str, Action] = {}
DEFAULT_TTL_HOURS = 72.0
MAX_TTL_HOURS = 24 * 30.0


def action(name: str) -> Callable[[Action], Action]:
    """Registers ``func`` as the action ``name`` that proposals may carry."""

    def register(func: Action) -> Action:
        ACTIONS[name] = func
        return func

    return register


@dataclass
class _Recorder:
    """Records what an action would seal (for :func:`propose`); the rows get no evidence, the transaction is
    rolled back."""

    rows: list[tuple[str, int, Fields]] = field(default_factory=list)

    def evidence_for(self, db: Session, row: PolicyRow, previous: str | None) -> str | None:
        name = row_name(row)
        _, fields, _ = row_content(row)
        self.rows = [r for r in self.rows if r[0] != name] + [(name, _last_seq(previous, name) + 1, fields)]
        return previous


@dataclass
class _Applier:
    """Gives each row an applied proposal seals its evidence, refusing a row the document does not list as it is."""

    document: Mapping[str, Any]
    approvals: Sequence[Approval]
    sealed: set[str] = field(default_factory=set)

    def evidence_for(self, db: Session, row: PolicyRow, previous: str | None) -> str:
        name = row_name(row)
        _, fields, _ = row_content(row)
        listed = [e for e in self.document["rows"] if e["row"] == name]
        if not listed or tuple(tuple(f) for f in listed[0]["fields"]) != fields:
            raise ApprovalError(f"{name} is not what the proposal approved (the database changed since): propose "
                                "it again")  # fmt: skip
        if listed[0]["seq"] != _last_seq(previous, name) + 1:
            raise ApprovalError(f"{name} changed since the proposal: propose it again")
        self.sealed.add(name)
        return evidence_document({"change": dict(self.document), "approvals": [a.document() for a in self.approvals]},
                                 [])  # fmt: skip


def _run(hsm: KeyStore, db: Session, name: str, arguments: Mapping[str, Any], authorizer: object) -> object:
    run = ACTIONS.get(name)
    if run is None:
        raise InvalidRequest(f"unknown action {name!r} (known: {', '.join(sorted(ACTIONS))})")
    previous = db.info.get(policy.AUTHORIZER)
    db.info[policy.AUTHORIZER] = authorizer
    try:
        return run(hsm, db, arguments)
    finally:
        if previous is None:
            db.info.pop(policy.AUTHORIZER, None)
        else:
            db.info[policy.AUTHORIZER] = previous


@dataclass(frozen=True)
class ProposalInfo:
    """A proposal as operators see it."""

    id: str
    action: str
    digest: str
    state: str
    proposed_by: str
    expires_at: datetime
    approved_by: tuple[str, ...]
    quorum: int
    rows: tuple[Mapping[str, Any], ...]
    arguments: Mapping[str, Any]


def propose(
    hsm: KeyStore, sessions: Callable[[], Session], sets: OperatorSets, name: str, arguments: Mapping[str, Any],
    proposed_by: str, *, ttl_hours: float = DEFAULT_TTL_HOURS,
) -> ProposalInfo:  # fmt: skip
    """Stores the proposal of action ``name`` with ``arguments``, by the operator ``proposed_by``. Returns it;
    raises InvalidRequest (unknown action, bad arguments or expiry, nothing to change) or what the action raises."""
    if sets.current.get(proposed_by) is None:
        raise Forbidden(f"{proposed_by} is not an operator of the current set ({sets.current.describe()})")
    if not 0 < ttl_hours <= MAX_TTL_HOURS:
        raise InvalidRequest(f"a proposal expires within 0 to {MAX_TTL_HOURS:g} hours")
    recorder = _Recorder()
    with sessions() as dry:
        try:
            _run(hsm, dry, name, arguments, recorder)
        finally:
            dry.rollback()  # nothing of the dry run stays: it only told which rows the action seals
    if not recorder.rows:
        raise InvalidRequest(f"{name} would change no policy row")
    document = change_document(name, recorder.rows, sets.current.digest, proposed_by, arguments=arguments,
                               ttl_hours=ttl_hours)  # fmt: skip
    digest = change_digest(document)
    with sessions() as db, db.begin():
        db.add(Proposal(id=document["id"], digest=digest, document=canonical_json(document).decode(), state="pending",
                        proposed_by=proposed_by, expires_at=expiry_of(document)))  # fmt: skip
        db.flush()
        operator = sets.current.get(proposed_by)
        assert operator is not None
        audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "proposal",
                                  detail=f"{document['id']} {name} digest {digest} by {proposed_by} "
                                         f"({operator.key_id})")  # fmt: skip
    return describe(sessions, document["id"], sets)


def describe(sessions: Callable[[], Session], proposal_id: str, sets: OperatorSets) -> ProposalInfo:
    """The proposal ``proposal_id``. Raises NotFound."""
    with sessions() as db:
        row = db.get(Proposal, proposal_id)
        if row is None:
            raise NotFound(f"no proposal {proposal_id!r}")
        approvals = _stored_approvals(db, proposal_id)
    document = json.loads(row.document)
    operators = sets.by_digest.get(document["operator_set"], sets.current)
    counted = tally(row.digest, expiry_of(document), approvals, operators).counted
    return ProposalInfo(row.id, document["action"], row.digest, _state(row), row.proposed_by, expiry_of(document),
                        counted, operators.quorum, tuple(document["rows"]), document.get("arguments", {}))  # fmt: skip


def list_proposals(sessions: Callable[[], Session], sets: OperatorSets) -> list[ProposalInfo]:
    """Every proposal, newest first."""
    with sessions() as db:
        ids = list(db.scalars(select(Proposal.id).order_by(Proposal.created_at.desc())))
    return [describe(sessions, i, sets) for i in ids]


def _state(row: Proposal) -> str:
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
    return "expired" if row.state == "pending" and expires <= datetime.now(UTC) else row.state


def _stored_approvals(db: Session, proposal_id: str) -> list[Approval]:
    rows = db.scalars(select(ProposalApproval).where(ProposalApproval.proposal_id == proposal_id))
    return [Approval.from_document(json.loads(r.approval)) for r in rows]


def document_of(sessions: Callable[[], Session], proposal_id: str) -> dict[str, Any]:
    """The change document of proposal ``proposal_id`` (what an operator reviews, then signs). Raises NotFound."""
    with sessions() as db:
        row = db.get(Proposal, proposal_id)
        if row is None:
            raise NotFound(f"no proposal {proposal_id!r}")
        document: dict[str, Any] = json.loads(row.document)
    return document


def _pending(db: Session, proposal_id: str) -> tuple[Proposal, dict[str, Any]]:
    """The pending proposal and its document, locked for this transaction. Raises NotFound or Conflict (applied,
    cancelled or expired)."""
    row = db.get(Proposal, proposal_id, with_for_update=True)
    if row is None:
        raise NotFound(f"no proposal {proposal_id!r}")
    state = _state(row)
    if state != "pending":
        raise Conflict(f"proposal {proposal_id} is {state}")
    return row, json.loads(row.document)


def add_approval(
    hsm: KeyStore, sessions: Callable[[], Session], sets: OperatorSets, proposal_id: str, approval: Approval
) -> ProposalInfo:
    """Stores ``approval`` of proposal ``proposal_id``. Returns the proposal; raises NotFound, Conflict (not
    pending, or this operator approved already) or Forbidden (expired, or an approval that does not count: for
    another digest, by an operator outside the set, a signature that does not verify)."""
    with sessions() as db, db.begin():
        row, document = _pending(db, proposal_id)
        operators = sets.named(document["operator_set"])
        result = tally(row.digest, expiry_of(document), [approval], operators)
        if not result.counted:
            raise Forbidden(f"the approval does not count: {result.refused[0][1]}")
        if db.get(ProposalApproval, (proposal_id, approval.operator)) is not None:
            raise Conflict(f"{approval.operator} approved proposal {proposal_id} already")
        db.add(ProposalApproval(proposal_id=proposal_id, operator=approval.operator,
                                approval=json.dumps(approval.document())))  # fmt: skip
        db.flush()
        audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "approval",
                                  detail=f"{proposal_id} by {approval.operator} ({approval.key_id})")  # fmt: skip
    return describe(sessions, proposal_id, sets)


def apply(
    hsm: KeyStore, sessions: Callable[[], Session], sets: OperatorSets, proposal_id: str, applied_by: str
) -> ProposalInfo:
    """Applies proposal ``proposal_id`` once a quorum approved it before its expiry. Returns it; raises NotFound,
    Conflict (not pending), Forbidden (too few approvals, expired, or the operator set changed) or ApprovalError
    (the database changed since the proposal)."""
    with sessions() as db, db.begin():
        row, document = _pending(db, proposal_id)
        if document["operator_set"] != sets.current.digest:
            raise Forbidden("the operator set changed since the proposal: propose it again")
        approvals = _stored_approvals(db, proposal_id)
        result = tally(row.digest, expiry_of(document), approvals, sets.current)
        if not result.met:
            raise Forbidden(f"proposal {proposal_id} has {len(result.counted)} of the {sets.current.quorum} "
                            "approvals it needs")  # fmt: skip
        applier = _Applier(document, [a for a in approvals if a.operator in result.counted])
        _run(hsm, db, document["action"], document.get("arguments", {}), applier)
        missing = {e["row"] for e in document["rows"]} - applier.sealed
        if missing:
            raise ApprovalError(f"the database changed since the proposal ({', '.join(sorted(missing))} not sealed): "
                                "propose it again")  # fmt: skip
        row.state, row.closed_at, row.closed_by = "applied", datetime.now(UTC), applied_by
        audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "proposal applied",
                                  detail=f"{proposal_id} {document['action']} approved by "
                                         f"{', '.join(sorted(result.counted))}")  # fmt: skip
    return describe(sessions, proposal_id, sets)


def parse_approval(text: str) -> Approval:
    """An approval from its JSON text. Raises InvalidRequest."""
    try:
        return Approval.from_document(json.loads(text))
    except (ValueError, QuorumError) as e:
        raise InvalidRequest(f"not an approval: {e}") from None
