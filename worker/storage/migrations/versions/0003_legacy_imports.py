"""legacy_imports and legacy_root_keys: what ``kmsq import-legacy`` brought in from the replaced system

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "legacy_imports",
        sa.Column("origin", sa.String(255), nullable=False),
        sa.Column("legacy_id", sa.BigInteger, nullable=False),
        sa.Column("private_key_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("legacy_provider", sa.String(64), nullable=True),
        sa.Column("legacy_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("origin", "legacy_id", name="pk_legacy_imports"),
        sa.ForeignKeyConstraint(
            ["private_key_id"], ["private_keys.id"], name="fk_legacy_imports_private_key_id_private_keys"
        ),
    )
    op.create_table(
        "legacy_root_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("root_key", sa.String(64), nullable=False),
        sa.Column("root_key_version", sa.Integer, nullable=False),
        sa.Column("encrypted_name", sa.Text, nullable=False),
        sa.Column("encrypted_data_key", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_legacy_root_keys"),
        sa.ForeignKeyConstraint(
            ["root_key", "root_key_version"],
            ["root_key_versions.root_key_id", "root_key_versions.version"],
            name="fk_legacy_root_keys_root_key_version",
        ),
    )


def downgrade() -> None:
    op.drop_table("legacy_root_keys")
    op.drop_table("legacy_imports")
