"""deployment: the database's identity, which names its policy anchor in the token (worker.policy_anchor)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "deployment",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deployment"),
    )
    op.bulk_insert(table, [{"id": secrets.token_hex(16), "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("deployment")
