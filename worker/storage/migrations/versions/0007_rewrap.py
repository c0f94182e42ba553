"""sealed_version on sealed rows, and the jobs table: rewrapping under a root key's current version

A rewrap (kmsq root-key rewrap) wraps a row's data key again, inside the HSM, under the root key's current
version; the ciphertext it opens stays as it is, and its associated data keeps naming the version it was
sealed under. ``sealed_version`` records that version once it differs from ``root_key_version`` (NULL: the
same). ``jobs`` counts what a named job has done, in the transactions that do it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLES = ("private_keys", "fleet_keys", "legacy_root_keys")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("sealed_version", sa.Integer, nullable=True))
    op.create_table(
        "jobs",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("done", sa.BigInteger, nullable=False),
        sa.Column("failed", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_jobs"),
    )


def downgrade() -> None:
    op.drop_table("jobs")
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("sealed_version")
