"""min_decryption_version on root_keys, and the pools table (a pool can be disabled)

Existing root keys decrypt every version (1); a pool without a row is enabled.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("root_keys") as batch:
        batch.add_column(sa.Column("min_decryption_version", sa.Integer, nullable=False, server_default="1"))
    op.create_table(
        "pools",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("policy_mac", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_pools"),
    )


def downgrade() -> None:
    op.drop_table("pools")
    with op.batch_alter_table("root_keys") as batch:
        batch.drop_column("min_decryption_version")
