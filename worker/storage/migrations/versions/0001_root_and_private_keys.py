"""root keys, their versions, and private keys

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "root_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_root_keys"),
    )
    op.create_index("ix_root_keys_pool", "root_keys", ["pool"])
    op.create_table(
        "root_key_versions",
        sa.Column("root_key_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("hsm_id", sa.String(128), nullable=False),
        sa.Column("hsm_label", sa.String(128), nullable=False),
        sa.Column("wrap_algorithm", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("root_key_id", "version", name="pk_root_key_versions"),
        sa.ForeignKeyConstraint(["root_key_id"], ["root_keys.id"], name="fk_root_key_versions_root_key_id_root_keys"),
    )
    op.create_table(
        "private_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False, autoincrement=True),
        sa.Column("pub", sa.String(1024), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("coin", sa.String(32), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("rootKey", sa.String(64), nullable=False),
        sa.Column("root_key_version", sa.Integer, nullable=False),
        sa.Column("format_version", sa.Integer, nullable=False),
        sa.Column("encryptedPrv", sa.Text, nullable=False),
        sa.Column("encryptedDataKey", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_private_keys"),
        sa.UniqueConstraint("pub", "source", name="uq_private_keys_pub_source"),
        sa.ForeignKeyConstraint(
            ["rootKey", "root_key_version"],
            ["root_key_versions.root_key_id", "root_key_versions.version"],
            name="fk_private_keys_root_key_version",
        ),
    )


def downgrade() -> None:
    op.drop_table("private_keys")
    op.drop_table("root_key_versions")
    op.drop_index("ix_root_keys_pool", table_name="root_keys")
    op.drop_table("root_keys")
