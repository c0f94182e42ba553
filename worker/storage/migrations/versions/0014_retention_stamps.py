"""requests.keep_until, keep_key_id, keep_mac: when a record may be pruned, MACed by the worker that wrote it

(worker.record_stamps). Existing records get none: the pruner derives their time from the fleet-signed reply
they hold, never from ``expires_at``, which a database writer can change.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("keep_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("keep_key_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("keep_mac", sa.String(43), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("keep_mac")
        batch.drop_column("keep_key_id")
        batch.drop_column("keep_until")
