"""Sharing a pool (docs/OPERATIONS.md): a caller's lane and quotas (``callers.lane``, ``rate_requests``,
``rate_items``, policy fields covered once set) and the token buckets every worker of a pool takes from
(``rate_buckets``).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("callers") as table:
        table.add_column(sa.Column("lane", sa.String(16), nullable=False, server_default="auto"))
        table.add_column(sa.Column("rate_requests", sa.Float, nullable=True))
        table.add_column(sa.Column("rate_items", sa.Float, nullable=True))
    op.create_table(
        "rate_buckets",
        sa.Column("pool", sa.String(64), primary_key=True),
        sa.Column("caller", sa.String(64), primary_key=True),
        sa.Column("requests", sa.Float, nullable=False),
        sa.Column("items", sa.Float, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("taken", sa.String(32), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("rate_buckets")
    with op.batch_alter_table("callers") as table:
        table.drop_column("rate_items")
        table.drop_column("rate_requests")
        table.drop_column("lane")
