"""Signing rules (docs/PROTOCOL.md, "Signing rules"): a policy row per scope (``signing_rules``) and a log of
every signed payload (``signing_log``) that the rules' windows sum; the caller that generated a signing key
(``private_keys.owner``).

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signing_rules",
        sa.Column("scope", sa.String(160), primary_key=True),
        sa.Column("rules", sa.Text, nullable=False),
        sa.Column("members", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("policy_mac", sa.String(64), nullable=True),
        sa.Column("approval", sa.Text, nullable=True),
    )
    op.create_table(
        "signing_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("caller", sa.String(64), nullable=False),
        sa.Column("pub", sa.String(1024), nullable=False),
        sa.Column("coin", sa.String(128), nullable=False),
        sa.Column("wallet", sa.String(32), nullable=True),
        sa.Column("payload_digest", sa.String(64), nullable=False),
        sa.Column("payment", sa.Numeric(78, 0).with_variant(sa.String(80), "sqlite"), nullable=False),
        sa.Column("fee", sa.BigInteger, nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
    )
    op.create_index("ix_signing_log_signed_at", "signing_log", ["signed_at"])
    op.create_index("ix_signing_log_pub", "signing_log", ["pub"])
    with op.batch_alter_table("private_keys") as table:
        table.add_column(sa.Column("owner", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("private_keys") as table:
        table.drop_column("owner")
    op.drop_index("ix_signing_log_pub", "signing_log")
    op.drop_index("ix_signing_log_signed_at", "signing_log")
    op.drop_table("signing_log")
    op.drop_table("signing_rules")
