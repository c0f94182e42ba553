"""rejection_counts: refusals before authentication, counted per minute instead of one audit row each

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejection_counts",
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("caller", sa.String(64), nullable=False),
        sa.Column("op", sa.String(64), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("last_request_id", sa.String(36), nullable=False),
        sa.PrimaryKeyConstraint("minute", "pool", "caller", "op", "code", "reason", name="pk_rejection_counts"),
    )


def downgrade() -> None:
    op.drop_table("rejection_counts")
