"""Dual control (docs/DUAL_CONTROL.md): the operator sets, proposals and their approvals, and each policy row's
evidence of approval (``approval``: the change document and its approvals, or a restriction by one operator).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

POLICY_TABLES = ("callers", "root_keys", "root_key_versions", "pools")


def upgrade() -> None:
    op.create_table(
        "operator_sets",
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("change", sa.Text, nullable=False),
        sa.Column("approvals", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_operator_sets"),
        sa.UniqueConstraint("digest", name="uq_operator_sets_digest"),
    )
    op.create_table(
        "proposals",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("proposed_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_proposals"),
    )
    op.create_table(
        "proposal_approvals",
        sa.Column("proposal_id", sa.String(36), nullable=False),
        sa.Column("operator", sa.String(64), nullable=False),
        sa.Column("approval", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("proposal_id", "operator", name="pk_proposal_approvals"),
        sa.ForeignKeyConstraint(["proposal_id"], ["proposals.id"], name="fk_proposal_approvals_proposal_id_proposals"),
    )
    for table in POLICY_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("approval", sa.Text, nullable=True))


def downgrade() -> None:
    for table in POLICY_TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("approval")
    op.drop_table("proposal_approvals")
    op.drop_table("proposals")
    op.drop_table("operator_sets")
