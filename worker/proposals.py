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

from schemas.quorum import Approval, OperatorSet, QuorumError, approve, change_digest, expiry_of, tally
from schemas.wire import canonical_json
from worker import audit_log, policy
from worker.actions import ACTIONS
from worker.approvals import (
    ADOPT,
    CHANGE_OPERATORS,
    REAPPROVE,
    ApprovalError,
    LocalOperators,
    OperatorSets,
    QuorumRequired,
    _last_seq,
    adoption_document,
    change_document,
    evidence_document,
    operator_change_document,
    operator_change_tallies,
    proposed_set,
    reapproval_document,
    row_content,
    row_name,
    row_named,
    write_genesis,
    write_operator_change,
    write_reapproval,
)
from worker.errors import Conflict, Forbidden, InvalidRequest, NotFound
from worker.keystore import KeyStore
from worker.policy_rows import Fields, PolicyRow
from worker.storage.models import Proposal, ProposalApproval

DEFAULT_TTL_HOURS = 72.0
MAX_TTL_HOURS = 24 * 30.0


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
    met: bool = False  # the approvals it needs are there
    needs: str = ""  # whose approvals it needs, in words


def _check_proposal(sets: OperatorSets, proposed_by: str, ttl_hours: float) -> None:
    """Raises Forbidden unless ``proposed_by`` is an operator of the current set, InvalidRequest for a bad expiry."""
    if sets.current.get(proposed_by) is None:
        raise Forbidden(f"{proposed_by} is not an operator of the current set ({sets.current.describe()})")
    if not 0 < ttl_hours <= MAX_TTL_HOURS:
        raise InvalidRequest(f"a proposal expires within 0 to {MAX_TTL_HOURS:g} hours")


def _store(hsm: KeyStore, db: Session, document: Mapping[str, Any], said: str) -> None:
    """Stores the proposal of ``document`` and its audit record (``said``: what it proposes, in words)."""
    digest = change_digest(document)
    db.add(Proposal(id=document["id"], digest=digest, document=canonical_json(dict(document)).decode(),
                    state="pending", proposed_by=document["proposed_by"], expires_at=expiry_of(document)))  # fmt: skip
    db.flush()
    audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "proposal",
                              detail=f"{document['id']} {document['action']} digest {digest} by {said}")  # fmt: skip


def propose(
    hsm: KeyStore, sessions: Callable[[], Session], sets: OperatorSets, name: str, arguments: Mapping[str, Any],
    proposed_by: str, *, ttl_hours: float = DEFAULT_TTL_HOURS,
) -> ProposalInfo:  # fmt: skip
    """Stores the proposal of action ``name`` with ``arguments``, by the operator ``proposed_by``. Returns it;
    raises InvalidRequest (unknown action, bad arguments or expiry, nothing to change) or what the action raises."""
    _check_proposal(sets, proposed_by, ttl_hours)
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
    operator = sets.current.get(proposed_by)
    assert operator is not None
    with sessions() as db, db.begin():
        _store(hsm, db, document, f"{proposed_by} ({operator.key_id})")
    return describe(sessions, document["id"], sets)


def _needed(document: Mapping[str, Any], operators: OperatorSet) -> OperatorSet:
    """The set whose quorum a document needs: every operator of the set it adopts (the genesis), else the set's
    own quorum (a change of the set also needs a quorum of the new one: :func:`_count`)."""
    if document.get("action") == ADOPT:
        return OperatorSet(operators.operators, len(operators.operators))
    return operators


@dataclass(frozen=True)
class _Count:
    counted: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]
    met: bool
    quorum: int
    needs: str


def _count(document: Mapping[str, Any], digest: str, approvals: Sequence[Approval], operators: OperatorSet) -> _Count:
    """How ``approvals`` count for ``document``, approved under ``operators``."""
    needed = _needed(document, operators)
    if document.get("action") == CHANGE_OPERATORS:
        new = proposed_set(document)
        before, after = operator_change_tallies(document, approvals, needed, new)
        counted = tuple(dict.fromkeys(before.counted + after.counted))
        refused = tuple(r for r in before.refused if r[0] not in counted)
        needs = f"{needed.describe()} and, of the new set, {new.describe()}"
        return _Count(counted, refused, before.met and after.met, needed.quorum, needs)
    result = tally(digest, expiry_of(document), approvals, needed)
    return _Count(result.counted, result.refused, result.met, needed.quorum, needed.describe())


def genesis_sets(genesis: OperatorSet) -> OperatorSets:
    """The operator sets of a deployment that the pinned ``genesis`` has not adopted yet: the genesis alone (what
    its adoption proposal is approved under)."""
    return OperatorSets({genesis.digest: genesis}, genesis)


def deployment_sets(db: Session, genesis: OperatorSet) -> OperatorSets:
    """The deployment's verified operator sets, or, before the genesis adopted it, :func:`genesis_sets`. Raises
    ApprovalError when the chain does not verify."""
    from worker.approvals import load_operator_sets
    from worker.storage.models import OperatorSetRecord

    if db.scalar(select(OperatorSetRecord.seq).limit(1)) is None:
        return genesis_sets(genesis)
    return load_operator_sets(db, genesis.digest)


def propose_adoption(
    hsm: KeyStore, sessions: Callable[[], Session], genesis: OperatorSet, proposed_by: str,
    *, ttl_hours: float = DEFAULT_TTL_HOURS,
) -> ProposalInfo:  # fmt: skip
    """Stores the genesis proposal: ``genesis`` adopts the deployment and every policy row as it is, once every
    one of its operators approved. Raises Conflict when the deployment has an operator set already."""
    from worker.storage.models import OperatorSetRecord

    with sessions() as db, db.begin():
        if db.scalar(select(OperatorSetRecord.seq).limit(1)) is not None:
            raise Conflict("the deployment has an operator set already: it changes only by quorum")
        document = adoption_document(db, genesis, proposed_by, ttl_hours=ttl_hours)
        _store(hsm, db, document, f"{proposed_by}: {genesis.describe()}")
    return describe(sessions, document["id"], genesis_sets(genesis))


def propose_operator_change(
    hsm: KeyStore, sessions: Callable[[], Session], sets: OperatorSets, new: OperatorSet, proposed_by: str,
    *, ttl_hours: float = DEFAULT_TTL_HOURS,
) -> ProposalInfo:  # fmt: skip
    """Stores the proposal that ``new`` replaces the current operator set: it applies once a quorum of the current
    set and a quorum of ``new`` approved, and vouches then for every policy row as it is. Raises Forbidden
    (``proposed_by`` is not an operator) or InvalidRequest (``new`` is the current set)."""
    _check_proposal(sets, proposed_by, ttl_hours)
    with sessions() as db, db.begin():
        try:
            document = operator_change_document(db, sets, new, proposed_by, ttl_hours=ttl_hours)
        except ApprovalError as e:
            raise InvalidRequest(str(e)) from None
        _store(hsm, db, document, f"{proposed_by}: {sets.current.describe()} -> {new.describe()}")
    return describe(sessions, document["id"], sets)


def propose_reapproval(
    hsm: KeyStore, sessions: Callable[[], Session], sets: OperatorSets, proposed_by: str,
    *, ttl_hours: float = DEFAULT_TTL_HOURS,
) -> ProposalInfo:  # fmt: skip
    """Stores the proposal that a quorum approves every policy row as it is now (worker.approvals.REAPPROVE).
    Raises Forbidden or InvalidRequest."""
    _check_proposal(sets, proposed_by, ttl_hours)
    with sessions() as db, db.begin():
        document = reapproval_document(db, sets, proposed_by, ttl_hours=ttl_hours)
        if not document["rows"]:
            raise InvalidRequest("there is no policy row to approve")
        _store(hsm, db, document, f"{proposed_by}: {len(document['rows'])} rows as they are")
    return describe(sessions, document["id"], sets)


def describe(sessions: Callable[[], Session], proposal_id: str, sets: OperatorSets) -> ProposalInfo:
    """The proposal ``proposal_id``. Raises NotFound."""
    with sessions() as db:
        row = db.get(Proposal, proposal_id)
        if row is None:
            raise NotFound(f"no proposal {proposal_id!r}")
        approvals = _stored_approvals(db, proposal_id)
    document = json.loads(row.document)
    count = _count(document, row.digest, approvals, sets.by_digest.get(document["operator_set"], sets.current))
    return ProposalInfo(row.id, document["action"], row.digest, _state(row), row.proposed_by, expiry_of(document),
                        count.counted, count.quorum, tuple(document["rows"]), document.get("arguments", {}),
                        count.met, count.needs)  # fmt: skip


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
        result = _count(document, row.digest, [approval], sets.named(document["operator_set"]))
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
        row, document, result, approvals = _approved(db, proposal_id, sets)
        if document["action"] in OPERATIONS:
            raise InvalidRequest(f"proposal {proposal_id} is approved: carry it out with "
                                 f"{OPERATIONS[document['action']]} --proposal {proposal_id}")  # fmt: skip
        counted = [a for a in approvals if a.operator in result.counted]
        if document["action"] == ADOPT:
            write_genesis(db, sets.current, document, counted)
        elif document["action"] == CHANGE_OPERATORS:
            write_operator_change(db, sets, document, counted)
        elif document["action"] == REAPPROVE:
            write_reapproval(db, sets, document, counted)
        else:
            _apply_action(hsm, db, document, counted)
        row.state, row.closed_at, row.closed_by = "applied", datetime.now(UTC), applied_by
        audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "proposal applied",
                                  detail=f"{proposal_id} {document['action']} approved by "
                                         f"{', '.join(sorted(result.counted))}")  # fmt: skip
    return describe(sessions, proposal_id, sets)


def _approved(db: Session, proposal_id: str, sets: OperatorSets) -> tuple[Proposal, dict[str, Any], _Count,
                                                                        list[Approval]]:  # fmt: skip
    """The pending proposal (locked), its document, how its approvals count and the approvals, once a quorum of the
    current set approved it. Raises NotFound, Conflict or Forbidden."""
    row, document = _pending(db, proposal_id)
    if document["operator_set"] != sets.current.digest:
        raise Forbidden("the operator set changed since the proposal: propose it again")
    approvals = _stored_approvals(db, proposal_id)
    result = _count(document, row.digest, approvals, sets.current)
    if not result.met:
        raise Forbidden(f"proposal {proposal_id} has the approvals of {', '.join(result.counted) or 'nobody'}; "
                        f"it needs {result.needs}")  # fmt: skip
    return row, document, result, approvals


# -- operations: what needs a quorum but changes no policy row ----------------------------------------------

# Each, with the command that carries it out once approved.
OPERATIONS = {
    "backup.restore": "kmsq backup restore FILE --fingerprint F --custodian-key ...",
    "hsm.trust": "kmsq hsm trust NAME --fingerprint F",
}


def propose_operation(
    hsm: KeyStore, sessions: Callable[[], Session], sets: OperatorSets, action: str, arguments: Mapping[str, Any],
    proposed_by: str, *, ttl_hours: float = DEFAULT_TTL_HOURS,
) -> ProposalInfo:  # fmt: skip
    """Stores the proposal of operation ``action`` (one of :data:`OPERATIONS`) with exactly ``arguments``; once a
    quorum approved it, its command carries it out once (:func:`approved_operation`). Raises InvalidRequest or
    Forbidden."""
    if action not in OPERATIONS:
        raise InvalidRequest(f"unknown operation {action!r} (known: {', '.join(sorted(OPERATIONS))})")
    _check_proposal(sets, proposed_by, ttl_hours)
    document = change_document(action, [], sets.current.digest, proposed_by, arguments=arguments,
                               ttl_hours=ttl_hours)  # fmt: skip
    with sessions() as db, db.begin():
        _store(hsm, db, document, proposed_by)
    return describe(sessions, document["id"], sets)


@dataclass(frozen=True)
class Grant:
    """What lets a command carry out an operation: an approved proposal (``proposal_id``), or the approvals of a
    quorum whose keys the command holds (``document`` and ``approvals``, stored when the operation is done: the
    token may get its policy key, which audit records need, only from the operation itself)."""

    proposal_id: str
    document: Mapping[str, Any] | None = None
    approvals: tuple[Approval, ...] = ()


def approved_operation(
    sets: OperatorSets, sessions: Callable[[], Session], action: str, arguments: Mapping[str, Any],
    proposal_id: str | None, local: LocalOperators | None,
) -> Grant:  # fmt: skip
    """What lets a command carry out ``action`` with ``arguments`` now: the pending ``proposal_id``, of exactly this
    operation, that a quorum approved before its expiry; without one, the approvals of the operator keys the
    command holds (``local``), when they are a quorum (the embedded default's 1-of-1). The command records it with
    :func:`close_operation` once done. Writes nothing.

    Raises QuorumRequired (no proposal, and too few keys: the message says what to propose), NotFound, Conflict
    (already carried out, cancelled, expired) or Forbidden (another operation, too few approvals)."""
    if proposal_id is None:
        mine = [i for i in (local.identities if local else ()) if sets.current.get(i.name) == i.public]
        if len(mine) < sets.current.quorum:
            raise QuorumRequired(f"{action} needs {sets.current.describe()}: propose it (kmsq propose "
                                 f"{action.replace('.', ' ')} ...), then run this with --proposal ID")  # fmt: skip
        if action not in OPERATIONS:
            raise InvalidRequest(f"unknown operation {action!r}")
        document = change_document(action, [], sets.current.digest, mine[0].name, arguments=arguments, ttl_hours=1)
        digest = change_digest(document)
        return Grant(document["id"], document, tuple(approve(i, digest) for i in mine))
    with sessions() as db:
        _, document, _, _ = _approved(db, proposal_id, sets)
    if document["action"] != action or document.get("arguments") != dict(arguments):
        raise Forbidden(f"proposal {proposal_id} approved another operation ({document['action']} "
                        f"{json.dumps(document.get('arguments'), sort_keys=True)})")  # fmt: skip
    return Grant(proposal_id)


def close_operation(hsm: KeyStore, sessions: Callable[[], Session], grant: Grant, done_by: str, said: str) -> None:
    """Records that the operation ``grant`` allowed was carried out (``said``: what it did), so that it is not
    carried out again: the proposal applied (a quorum's own approvals stored first, with their audit records).
    Raises NotFound or Conflict."""
    with sessions() as db, db.begin():
        if grant.document is not None:
            _store(hsm, db, grant.document, grant.document["proposed_by"])
            for approval in grant.approvals:
                db.add(ProposalApproval(proposal_id=grant.proposal_id, operator=approval.operator,
                                        approval=json.dumps(approval.document())))  # fmt: skip
                audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "approval",
                                          detail=f"{grant.proposal_id} by {approval.operator} "
                                                 f"({approval.key_id})")  # fmt: skip
            db.flush()
        row, document = _pending(db, grant.proposal_id)
        row.state, row.closed_at, row.closed_by = "applied", datetime.now(UTC), done_by
        audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "proposal applied",
                                  detail=f"{grant.proposal_id} {document['action']}: {said}")  # fmt: skip


def _apply_action(hsm: KeyStore, db: Session, document: Mapping[str, Any], approvals: Sequence[Approval]) -> None:
    applier = _Applier(document, approvals)
    _run(hsm, db, document["action"], document.get("arguments", {}), applier)
    missing = {e["row"] for e in document["rows"]} - applier.sealed
    if missing:
        raise ApprovalError(f"the database changed since the proposal ({', '.join(sorted(missing))} not sealed): "
                            "propose it again")  # fmt: skip


def differences(sessions: Callable[[], Session], document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the change document does to each row it lists, against the database now: ``{"row", "new",
    "fields": {name: [before, after]}}`` with the fields that differ (every field of a new row)."""
    out = []
    with sessions() as db:
        for entry in document["rows"]:
            row = row_named(db, entry["row"])
            before = dict(row_content(row)[1]) if row is not None else {}
            after = dict(tuple(f) for f in entry["fields"])
            changed = {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}
            out.append({"row": entry["row"], "new": row is None, "fields": changed})
    return out


def parse_approval(text: str) -> Approval:
    """An approval from its JSON text. Raises InvalidRequest."""
    try:
        return Approval.from_document(json.loads(text))
    except (ValueError, QuorumError) as e:
        raise InvalidRequest(f"not an approval: {e}") from None
