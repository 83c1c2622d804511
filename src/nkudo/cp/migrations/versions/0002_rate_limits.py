"""Shared token buckets and lock-outs for the rate limiter (issue 12).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # UNLOGGED on PostgreSQL: one UPSERT per rate-limited request writes no WAL; a crash empties the table,
    # which only refills every bucket.
    prefixes = ["UNLOGGED"] if op.get_bind().dialect.name == "postgresql" else []
    op.create_table(
        "rate_limit_buckets",
        sa.Column("bucket", sa.String(160), nullable=False),
        sa.Column("tat", sa.Float(53), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("spent", sa.Float(53), nullable=False),
        sa.PrimaryKeyConstraint("bucket", name="pk_rate_limit_buckets"),
        prefixes=prefixes,
    )
    op.create_table(
        "auth_lockouts",
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(32), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.Float(53), nullable=True),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.Float(53), nullable=True),
        sa.Column("last_failure", sa.Float(53), nullable=True),
        sa.PrimaryKeyConstraint("source", "credential", name="pk_auth_lockouts"),
    )


def downgrade() -> None:
    op.drop_table("auth_lockouts")
    op.drop_table("rate_limit_buckets")
