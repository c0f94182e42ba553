"""callers, requests, audit events and fleet keys (the queue path)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "callers",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("signing_key", sa.String(64), nullable=False),
        sa.Column("signing_key_id", sa.String(32), nullable=False),
        sa.Column("reply_key", sa.String(64), nullable=False),
        sa.Column("allowed_ops", sa.Text, nullable=False),
        sa.Column("root_keys", sa.Text, nullable=False),
        sa.Column("plaintext", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_callers"),
    )
    op.create_table(
        "requests",
        sa.Column("caller", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("op", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(32), nullable=True),
        sa.Column("reply", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("caller", "request_id", name="pk_requests"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("caller", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("op", sa.String(64), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_table(
        "fleet_keys",
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("signing_key", sa.String(64), nullable=False),
        sa.Column("transport_key", sa.String(64), nullable=False),
        sa.Column("root_key", sa.String(64), nullable=False),
        sa.Column("root_key_version", sa.Integer, nullable=False),
        sa.Column("encrypted_private", sa.Text, nullable=False),
        sa.Column("encrypted_data_key", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pool", name="pk_fleet_keys"),
        sa.ForeignKeyConstraint(
            ["root_key", "root_key_version"],
            ["root_key_versions.root_key_id", "root_key_versions.version"],
            name="fk_fleet_keys_root_key_version",
        ),
    )


def downgrade() -> None:
    op.drop_table("fleet_keys")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("requests")
    op.drop_table("callers")
