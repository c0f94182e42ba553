"""Break glass (docs/DUAL_CONTROL.md): when fewer than a quorum of the operators remain (keys lost, people gone),
the token's security officer replaces the deployment's operator sets with a new genesis. It is the one change
the quorum does not make, so it takes what no operator holds alone: the token's SO PIN (held by the backup
custodians, never the user PIN's holders), and then every worker host's administrators, who replace the pinned
``operator-set.json``; until they do, those workers refuse every policy row. It is audited, and every operator
of the new set must still approve its adoption of the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from schemas.quorum import OperatorSet
from worker import audit_log
from worker.hsm import Hsm
from worker.storage.models import OperatorSetRecord, Proposal

ACTOR_NOTE = "authorized by the token's security officer"


@dataclass(frozen=True)
class BrokenGlass:
    """What break glass replaced: the chain's sets (their count and the last digest), the new genesis, and the
    proposals it cancelled."""

    replaced_sets: int
    replaced_current: str | None
    genesis: str
    cancelled_proposals: tuple[str, ...]


def break_glass(hsm: Hsm, db: Session, genesis: OperatorSet, so_pin: str) -> BrokenGlass:
    """In ``db``'s transaction: checks ``so_pin`` on the token (ConfigError when wrong: nothing changes), removes
    the operator sets' chain, cancels the pending proposals (made under sets that no longer count) and records
    it all in the global audit chain. The caller pins ``genesis`` and proposes its adoption. Returns what it
    replaced."""
    with hsm.so_session(so_pin):
        pass  # the SO logged in: the PIN is the security officer's
    records = list(db.scalars(select(OperatorSetRecord).order_by(OperatorSetRecord.seq)))
    current = records[-1].digest if records else None
    db.execute(delete(OperatorSetRecord))
    cancelled = []
    for proposal in db.scalars(select(Proposal).where(Proposal.state == "pending")):
        proposal.state, proposal.closed_at, proposal.closed_by = "cancelled", datetime.now(UTC), "break-glass"
        cancelled.append(proposal.id)
    db.flush()
    was = (current or "none")[:16]
    audit_log.operator_action(hsm, db, audit_log.GLOBAL_CHAIN, "break glass",
                              detail=f"{ACTOR_NOTE}: {len(records)} operator set(s) replaced by the genesis "
                                     f"{genesis.digest} ({genesis.describe()}); {len(cancelled)} pending "
                                     f"proposal(s) cancelled; the current set was {was}")  # fmt: skip
    return BrokenGlass(len(records), current, genesis.digest, tuple(cancelled))
