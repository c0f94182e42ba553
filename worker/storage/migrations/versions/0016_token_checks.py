"""token_checks: what each token last answered to kmsq hsm check or to a worker's check at start (worker.replication).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_checks",
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked_by", sa.String(32), nullable=False),
        sa.Column("missing", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("token", name="pk_token_checks"),
    )


def downgrade() -> None:
    op.drop_table("token_checks")
