"""Time as a second control (docs/DUAL_CONTROL.md): a root key version scheduled for destruction waits
``destroy_wait_days`` after its approval (state ``pending_destroy``), and a root key may carry a rotation period
(``rotation_period_days``) that its pool's workers apply. Both are policy fields once set.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("root_key_versions") as table:
        table.add_column(sa.Column("destroy_wait_days", sa.Integer, nullable=True))
    with op.batch_alter_table("root_keys") as table:
        table.add_column(sa.Column("rotation_period_days", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("root_keys") as table:
        table.drop_column("rotation_period_days")
    with op.batch_alter_table("root_key_versions") as table:
        table.drop_column("destroy_wait_days")
