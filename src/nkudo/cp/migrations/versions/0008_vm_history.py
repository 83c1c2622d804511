"""VM state history and the executions-by-VM index (issue 13: the dashboard's VM page).

Revision ID: 0008
Revises: 0007

No backfill: the history starts with the first change after the upgrade (earlier states were never kept).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from nkudo.cp.schema import UtcDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "vm_state_history",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(36), nullable=False),
        sa.Column("site_id", sa.String(36), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("previous_state", sa.String(16), nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("execution_id", sa.String(36), nullable=True),
        sa.Column("at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_vm_state_history"),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name="fk_vm_state_history_site_id_sites",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_vm_state_history_site_id_vm_id_at", "vm_state_history", ["site_id", "vm_id", "at"])
    op.create_index("ix_executions_site_id_vm_id", "executions", ["site_id", "vm_id"])


def downgrade() -> None:
    op.drop_index("ix_executions_site_id_vm_id", table_name="executions")
    op.drop_index("ix_vm_state_history_site_id_vm_id_at", table_name="vm_state_history")
    op.drop_table("vm_state_history")
