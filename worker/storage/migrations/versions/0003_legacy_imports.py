"""legacy_imports: rows of the replaced system's table brought in by ``kmsq import-legacy``

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


def downgrade() -> None:
    op.drop_table("legacy_imports")
