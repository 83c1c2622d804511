"""Indexes for keyset paging of a site's plans and executions, newest first, and for counting a site's VMs by
state (issue 13).

Revision ID: 0009
Revises: 0008

Why: ``GET /sites/{id}/plans`` and ``/executions`` page by ``created_at`` descending; without an index that
starts with ``(site_id, created_at)`` every page sorts all of the site's rows. VMs (primary key
``(site_id, vm_id)``) and hosts (unique ``(site_id, hostname)``) have theirs; a site's agents are few. The
site status (dashboard and ``GET /sites/{id}/status``) counts VMs per state: ``(site_id, state)`` makes that a
scan of a small covering index instead of every VM row with its counters (a site of 5,000 VMs: the largest
part of the site page's database time).
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_plans_site_id_created_at", "plans", ["site_id", "created_at"])
    op.create_index("ix_executions_site_id_created_at", "executions", ["site_id", "created_at"])
    op.create_index("ix_vms_site_id_state", "vms", ["site_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_vms_site_id_state", table_name="vms")
    op.drop_index("ix_executions_site_id_created_at", table_name="executions")
    op.drop_index("ix_plans_site_id_created_at", table_name="plans")
