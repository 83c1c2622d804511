"""Tenant quotas: read and override a tenant's limits, and the checks the other use cases run before they add.

Why the checks lock the tenant row: two requests at "limit - 1" (on one replica or two) must not both pass.
Each check runs inside the transaction that then adds the row, after ``lock_tenant`` took the tenant row
with ``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL (the counting requests of one tenant queue behind each
other; inserts elsewhere that only reference the tenant by foreign key are not blocked). SQLite needs no
lock: every write transaction is ``BEGIN IMMEDIATE``, so they are serialised already.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.domain import AgentState, ExecState, PlanStatus, QuotaBreach, QuotaLimit
from nkudo.cp.errors import Forbidden
from nkudo.cp.models import QuotaUpdate
from nkudo.cp.ports import Clock, Transactions
from nkudo.cp.records import AuditEntry, Principal, RequestInfo
from nkudo.cp.usecases.common import audit, require_admin, tenant_scope
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType, ErrorCode

QUOTA_EXCEEDED = ErrorCode.QUOTA_EXCEEDED.value
_q = t.tenant_quotas.c
_LIVE_PLAN = (PlanStatus.PENDING.value, PlanStatus.IN_PROGRESS.value)
_LIVE_EXEC = (ExecState.PENDING.value, ExecState.LEASED.value, ExecState.RUNNING.value)


def lock_tenant(conn: Connection, tenant_id: str) -> None:
    """Serialise quota checks of one tenant until the end of the transaction (see the module docstring)."""
    conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.id == tenant_id).with_for_update(key_share=True))


def tenant_quotas(conn: Connection, tenant_id: str) -> dict[QuotaLimit, int]:
    """The tenant's effective limits (overrides over defaults)."""
    return domain.effective_quotas(overrides(conn, tenant_id))


def overrides(conn: Connection, tenant_id: str) -> dict[QuotaLimit, int | None]:
    row = conn.execute(sa.select(t.tenant_quotas).where(_q.tenant_id == tenant_id)).first()
    if row is None:
        return {}
    return {limit: getattr(row, limit.value) for limit in QuotaLimit}


def refuse(breach: QuotaBreach | None) -> None:
    """Raise the API's quota error (403, ``QUOTA_EXCEEDED``, the limit as the field) for a breach."""
    if breach is not None:
        raise Forbidden(breach.message, code=QUOTA_EXCEEDED, field=breach.limit.value)


def _count(conn: Connection, stmt: sa.Select[Any]) -> int:
    n: int = conn.execute(stmt).scalar_one()
    return n


def count_sites(conn: Connection, tenant_id: str) -> int:
    return _count(conn, sa.select(sa.func.count()).select_from(t.sites).where(t.sites.c.tenant_id == tenant_id))


def count_api_keys(conn: Connection, tenant_id: str, now: dt.datetime) -> int:
    """Live keys: revoked and expired ones no longer count."""
    k = t.api_keys.c
    return _count(conn, sa.select(sa.func.count()).select_from(t.api_keys).where(
        k.tenant_id == tenant_id, k.revoked_at.is_(None), sa.or_(k.expires_at.is_(None), k.expires_at > now)))


def count_live_plans(conn: Connection, tenant_id: str) -> int:
    p, s = t.plans.c, t.sites.c
    # Through the tenant's sites: plans are indexed by (site_id, status).
    return _count(conn, sa.select(sa.func.count()).select_from(t.plans).where(
        p.site_id.in_(sa.select(s.id).where(s.tenant_id == tenant_id)), p.status.in_(_LIVE_PLAN)))


def count_site_agents(conn: Connection, site_id: str) -> int:
    a = t.agents.c
    return _count(conn, sa.select(sa.func.count()).select_from(t.agents).where(
        a.site_id == site_id, a.state != AgentState.UNENROLLED.value))


def check_sites(conn: Connection, tenant_id: str) -> None:
    lock_tenant(conn, tenant_id)
    limit = QuotaLimit.SITES
    refuse(domain.quota_breach(limit, tenant_quotas(conn, tenant_id)[limit], count_sites(conn, tenant_id)))


def check_api_keys(conn: Connection, tenant_id: str, now: dt.datetime) -> None:
    lock_tenant(conn, tenant_id)
    limit = QuotaLimit.API_KEYS
    refuse(domain.quota_breach(limit, tenant_quotas(conn, tenant_id)[limit], count_api_keys(conn, tenant_id, now)))


def check_agents(conn: Connection, tenant_id: str, site_id: str) -> None:
    lock_tenant(conn, tenant_id)
    limit = QuotaLimit.AGENTS_PER_SITE
    refuse(domain.quota_breach(limit, tenant_quotas(conn, tenant_id)[limit], count_site_agents(conn, site_id)))


def check_plan(conn: Connection, tenant_id: str, site_id: str, creates: set[str], deletes: set[str]) -> None:
    """Concurrent plans, and VMs per agent from the VMs the plan would create plus those reported and pending.

    The caller took ``lock_tenant`` before its idempotency lookup (one lock order for every quota check).
    """
    quotas = tenant_quotas(conn, tenant_id)
    limit = QuotaLimit.CONCURRENT_PLANS
    refuse(domain.quota_breach(limit, quotas[limit], count_live_plans(conn, tenant_id)))
    if not creates:
        return
    vm, x = t.vms.c, t.executions.c
    existing = {r[0] for r in conn.execute(sa.select(vm.vm_id).where(
        vm.site_id == site_id, vm.state != VmStatus.DELETED.value))}
    pending = {r[0] for r in conn.execute(sa.select(x.vm_id).where(
        x.site_id == site_id, x.action_type == ActionType.MICROVM_CREATE.value, x.state.in_(_LIVE_EXEC),
        x.vm_id.is_not(None)))}
    refuse(domain.vm_quota_breach(quotas[QuotaLimit.VMS_PER_AGENT], count_site_agents(conn, site_id), existing,
                                  pending, creates, deletes))


class Quotas:
    """Read a tenant's quota (admin, or the tenant's own key) and override it (admin only)."""

    def __init__(self, db: Transactions, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def _view(self, conn: Connection, tenant_id: str) -> v.QuotaView:
        over = overrides(conn, tenant_id)
        eff = domain.effective_quotas(over)
        return v.QuotaView(
            tenant_id=tenant_id,
            limits=v.QuotaLimits(**{limit.value: eff[limit] for limit in QuotaLimit}),
            overridden=sorted(limit.value for limit, value in over.items() if value is not None),
            usage=v.QuotaUsage(sites=count_sites(conn, tenant_id),
                               api_keys=count_api_keys(conn, tenant_id, self.clock.now()),
                               concurrent_plans=count_live_plans(conn, tenant_id)),
        )

    async def get_quota(self, p: Principal, tenant_id: str) -> v.QuotaView:
        def tx(conn: Connection) -> v.QuotaView:
            tenant_scope(conn, p, tenant_id)
            return self._view(conn, tenant_id)

        return await self.db.run(tx)

    async def set_quota(self, p: Principal, tenant_id: str, body: QuotaUpdate, info: RequestInfo) -> v.QuotaView:
        """Apply the fields the body names: a number overrides the default, ``null`` goes back to it.

        Lowering a limit below current use refuses new additions only; nothing existing is removed.
        """
        require_admin(p)

        def tx(conn: Connection) -> v.QuotaView:
            tenant_scope(conn, p, tenant_id)
            lock_tenant(conn, tenant_id)
            now = self.clock.now()
            changes = body.changes()
            current = overrides(conn, tenant_id)
            merged = {limit.value: current.get(limit) for limit in QuotaLimit}
            merged.update({limit.value: value for limit, value in changes.items()})
            if current:
                conn.execute(t.tenant_quotas.update().where(_q.tenant_id == tenant_id).values(
                    **merged, updated_at=now))
            else:
                conn.execute(t.tenant_quotas.insert().values(tenant_id=tenant_id, **merged, updated_at=now))
            audit(conn, info, AuditEntry(p.actor, "tenant.quota.update", tenant_id, "tenant", tenant_id,
                                         {limit.value: value for limit, value in changes.items()}), now)
            return self._view(conn, tenant_id)

        return await self.db.run(tx)
