"""Initial schema: tenants, keys, sites, tokens, hosts, agents, certificates, plans, executions, logs, VMs, audit.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from nkudo.cp.schema import JSONType, UtcDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.String(36)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, UtcDateTime(), nullable=nullable)


def fk_tenant() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("tenant_id", Id, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)


def fk_site() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("site_id", Id, sa.ForeignKey("sites.id", ondelete="CASCADE"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", Id, primary_key=True),
        sa.Column("slug", sa.String(63), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        ts("created_at"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", Id, primary_key=True),
        fk_tenant(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        ts("created_at"), ts("expires_at", True), ts("revoked_at", True),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "sites",
        sa.Column("id", Id, primary_key=True),
        fk_tenant(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("external_key", sa.String(200), nullable=True),
        sa.Column("connectivity_state", sa.String(16), nullable=False),
        ts("created_at"),
        sa.UniqueConstraint("tenant_id", "name"),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", Id, primary_key=True),
        fk_tenant(),
        fk_site(),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        ts("created_at"), ts("expires_at"), ts("used_at", True),
        sa.Column("used_by_agent_id", Id, nullable=True),
    )
    op.create_index("ix_enrollment_tokens_tenant_id", "enrollment_tokens", ["tenant_id"])
    op.create_table(
        "hosts",
        sa.Column("id", Id, primary_key=True),
        fk_tenant(),
        fk_site(),
        sa.Column("hostname", sa.String(253), nullable=False),
        sa.Column("fingerprint", JSONType, nullable=False),
        sa.Column("facts", JSONType, nullable=True),
        sa.Column("current_agent_id", Id, nullable=True, unique=True),
        ts("last_facts_at", True), ts("created_at"),
        sa.UniqueConstraint("site_id", "hostname"),
    )
    op.create_table(
        "agents",
        sa.Column("id", Id, primary_key=True),
        fk_tenant(),
        fk_site(),
        sa.Column("host_id", Id, sa.ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cert_serial", sa.String(64), nullable=True),
        sa.Column("prev_cert_serial", sa.String(64), nullable=True),
        ts("prev_serial_valid_until", True), ts("cert_expires_at", True),
        sa.Column("refresh_token_hash", sa.String(64), nullable=True),
        sa.Column("agent_version", sa.String(256), nullable=False),
        sa.Column("os", sa.String(256), nullable=False),
        sa.Column("arch", sa.String(256), nullable=False),
        sa.Column("kernel_version", sa.String(256), nullable=False),
        sa.Column("heartbeat_seq", sa.BigInteger(), nullable=False),
        sa.Column("vm_digest", sa.String(64), nullable=True),
        sa.Column("facts_digest", sa.String(64), nullable=True),
        ts("enrolled_at"), ts("last_heartbeat_at", True), ts("unenrolled_at", True),
    )
    op.create_index("ix_agents_site_id_state", "agents", ["site_id", "state"])
    op.create_index("ix_agents_state_last_heartbeat_at", "agents", ["state", "last_heartbeat_at"])
    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(64), primary_key=True),
        sa.Column("agent_id", Id, sa.ForeignKey("agents.id", ondelete="CASCADE"), nullable=False),
        ts("issued_at"), ts("expires_at"), ts("revoked_at", True),
        sa.Column("revocation_reason", sa.String(32), nullable=True),
    )
    op.create_index("ix_certificates_agent_id", "certificates", ["agent_id"])
    op.create_table(
        "plans",
        sa.Column("id", Id, primary_key=True),
        fk_tenant(),
        fk_site(),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("leased_by_agent_id", Id, nullable=True),
        ts("lease_expires_at", True), ts("created_at"), ts("updated_at"), ts("completed_at", True),
    )
    op.create_index("ix_plans_site_id_status_created_at", "plans", ["site_id", "status", "created_at"])
    op.create_index("ix_plans_leased_by_agent_id", "plans", ["leased_by_agent_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", Id, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("plan_id", Id, sa.ForeignKey("plans.id", ondelete="CASCADE"), nullable=False),
        sa.Column("request_digest", sa.String(64), nullable=False),
        ts("created_at"),
    )
    op.create_table(
        "executions",
        sa.Column("id", Id, primary_key=True),
        fk_tenant(),
        fk_site(),
        sa.Column("plan_id", Id, sa.ForeignKey("plans.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("action_id", sa.String(128), nullable=False),
        sa.Column("action_type", sa.String(32), nullable=False),
        sa.Column("params", JSONType, nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("agent_id", Id, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        ts("created_at"), ts("updated_at"), ts("started_at", True), ts("finished_at", True),
        sa.UniqueConstraint("plan_id", "action_id"),
        sa.UniqueConstraint("plan_id", "position"),
    )
    op.create_index("ix_executions_site_id_state", "executions", ["site_id", "state"])
    op.create_table(
        "execution_logs",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", Id, nullable=False),
        sa.Column("execution_id", Id, sa.ForeignKey("executions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        ts("emitted_at"), ts("ingested_at"),
        sa.UniqueConstraint("execution_id", "seq"),
    )
    op.create_table(
        "vms",
        sa.Column("site_id", Id, sa.ForeignKey("sites.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("vm_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", Id, nullable=False),
        sa.Column("host_id", Id, nullable=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        ts("updated_at"), ts("last_transition_at", True),
    )
    op.create_index("ix_vms_tenant_id", "vms", ["tenant_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", Id, nullable=True),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("actor_id", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object_type", sa.String(32), nullable=False),
        sa.Column("object_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("source_ip", sa.String(64), nullable=True),
        sa.Column("details", JSONType, nullable=False),
        ts("occurred_at"),
    )
    op.create_index("ix_audit_events_tenant_id", "audit_events", ["tenant_id"])


def downgrade() -> None:
    for t in ("audit_events", "vms", "execution_logs", "executions", "idempotency_keys", "plans",
              "certificates", "agents", "hosts", "enrollment_tokens", "sites", "api_keys", "tenants"):
        op.drop_table(t)
