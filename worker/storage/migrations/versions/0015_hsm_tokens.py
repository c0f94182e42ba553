"""hsm_tokens, key_copies, token_keys: tokens enrolled into the deployment, keys wrapped for them, and what each holds

(worker.replication).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hsm_tokens",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("transport_key", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(79), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_hsm_tokens"),
    )
    op.create_table(
        "key_copies",
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("mechanism", sa.String(24), nullable=False),
        sa.Column("wrapped", sa.Text, nullable=False),
        sa.Column("kcv", sa.String(64), nullable=False),
        sa.Column("public", sa.Text, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("target", "label", name="pk_key_copies"),
    )
    op.create_table(
        "token_keys",
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("kcv", sa.String(16), nullable=False),
        sa.Column("replicable", sa.Boolean, nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mac", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("token", "label", name="pk_token_keys"),
    )


def downgrade() -> None:
    op.drop_table("token_keys")
    op.drop_table("key_copies")
    op.drop_table("hsm_tokens")
