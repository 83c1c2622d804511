"""Per-VM counters reported in heartbeats (issue 15): the latest report and the one before, for rates.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from nkudo.cp.schema import JSONType

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns with no default: a plain ADD COLUMN on SQLite and PostgreSQL alike, no table rewrite.
    op.add_column("vms", sa.Column("counters", JSONType, nullable=True))
    op.add_column("vms", sa.Column("counters_prev", JSONType, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("counters_prev")
        batch.drop_column("counters")
