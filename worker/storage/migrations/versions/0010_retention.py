"""requests.expires_at (what retention prunes by) and audit_checkpoints (where a pruned audit chain starts)

Existing request records get ``created_at`` + 3900 s: the latest a request recorded then can have expired
(``expires_at`` is at most 3600 s after ``issued_at``, which is at most the default 300 s skew ahead of the
worker's clock), so pruning never removes an old record sooner than it would have a new one.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_BACKFILL = timedelta(seconds=3900)


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    bind = op.get_bind()
    requests = sa.table(
        "requests",
        sa.column("caller", sa.String),
        sa.column("request_id", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("expires_at", sa.DateTime(timezone=True)),
    )
    if bind.dialect.name == "postgresql":
        bind.execute(requests.update().values(expires_at=requests.c.created_at + sa.text("interval '3900 seconds'")))
    else:  # SQLite keeps date-times as text: compute them in Python
        rows = bind.execute(sa.select(requests.c.caller, requests.c.request_id, requests.c.created_at)).all()
        for caller, request_id, created_at in rows:
            bind.execute(
                requests.update()
                .where(requests.c.caller == caller, requests.c.request_id == request_id)
                .values(expires_at=created_at + _BACKFILL)
            )
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("expires_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index("ix_requests_expires_at", "requests", ["expires_at"])
    op.create_table(
        "audit_checkpoints",
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("pool", name="pk_audit_checkpoints"),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_index("ix_requests_expires_at", "requests")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("expires_at")
