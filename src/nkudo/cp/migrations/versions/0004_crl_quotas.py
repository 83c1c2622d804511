"""CRL reason codes and tenant quotas (issue 12).

The CRL's reason codes need no schema change (``certificates.revocation_reason`` exists since 0001); the
quotas are one table of per-tenant overrides (NULL = the default).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from nkudo.cp.schema import UtcDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_quotas",
        sa.Column("tenant_id", sa.String(36), nullable=False),
        sa.Column("max_sites", sa.Integer(), nullable=True),
        sa.Column("max_agents_per_site", sa.Integer(), nullable=True),
        sa.Column("max_vms_per_agent", sa.Integer(), nullable=True),
        sa.Column("max_concurrent_plans", sa.Integer(), nullable=True),
        sa.Column("max_api_keys", sa.Integer(), nullable=True),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_tenant_quotas_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_quotas"),
    )


def downgrade() -> None:
    op.drop_table("tenant_quotas")
