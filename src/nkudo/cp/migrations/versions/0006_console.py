"""Console tails requested from and shipped by agents (issue 15).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from nkudo.cp.schema import UtcDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_requests",
        sa.Column("site_id", sa.String(36), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("host_id", sa.String(36), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("requested_at", UtcDateTime(), nullable=False),
        sa.Column("captured_at", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("site_id", "vm_id", name="pk_console_requests"),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name="fk_console_requests_site_id_sites", ondelete="CASCADE"),
    )
    op.create_index("ix_console_requests_host_id_state", "console_requests", ["host_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_console_requests_host_id_state", table_name="console_requests")
    op.drop_table("console_requests")
