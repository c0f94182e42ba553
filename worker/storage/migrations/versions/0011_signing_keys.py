"""private_keys.exportable: keys generated inside kmsq for signing are never exported

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("private_keys") as batch:
        batch.add_column(sa.Column("exportable", sa.Boolean, nullable=False, server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table("private_keys") as batch:
        batch.drop_column("exportable")
