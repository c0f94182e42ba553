"""private_keys.coin: 1-128 characters (token names such as ``hteth:bgerchv2``, contract addresses)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return  # SQLite does not enforce VARCHAR lengths; rebuilding the table would gain nothing
    op.alter_column("private_keys", "coin", type_=sa.String(128), existing_type=sa.String(32), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("private_keys", "coin", type_=sa.String(32), existing_type=sa.String(128), existing_nullable=False)
