"""policy_mac on callers, root_keys and root_key_versions: HMAC-SHA256 under the HSM's policy key

Rows from before have none: workers refuse them until an operator reviews and seals them (kmsq policy seal).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = ("callers", "root_keys", "root_key_versions")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("policy_mac", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("policy_mac")
