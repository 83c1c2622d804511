"""Statements and rules several use cases share: audit writes, visibility, site connectivity, plan rollup.

Why one module: these are the only transaction steps two aggregates run alike (an unenroll and the offline
sweep both give an agent's work back; a result and a cancel both roll a plan up), so each is written once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp.domain import AgentState, ExecState, PrincipalKind
from nkudo.cp.errors import NotFound, Unauthenticated
from nkudo.cp.records import AuditEntry, Principal, RequestInfo, Scope

NO_REQUEST = RequestInfo()


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def new_id() -> str:
    return str(uuid.uuid4())


def rand_token() -> str:
    return secrets.token_urlsafe(32)


def audit(conn: Connection, info: RequestInfo, entry: AuditEntry, now: dt.datetime) -> None:
    """Record ``entry`` in the current transaction (so an event exists exactly when its change does)."""
    conn.execute(t.audit_events.insert().values(
        tenant_id=entry.tenant_id, actor_type=entry.actor.type.value, actor_id=entry.actor.id, action=entry.action,
        object_type=entry.object_type, object_id=entry.object_id, request_id=info.request_id,
        source_ip=info.source_ip, details=entry.details or {}, occurred_at=now,
    ))


def require_admin(p: Principal) -> None:
    if p.kind != PrincipalKind.ADMIN:
        raise Unauthenticated("this operation needs the admin key", code="ADMIN_REQUIRED")


def tenant_scope(conn: Connection, p: Principal, tenant_id: str) -> Scope:
    """The tenant if ``p`` may see it; foreign or unknown ids are the same 404."""
    row = conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.id == tenant_id)).first()
    if row is None or not domain.tenant_visible(p.tenant_id, row.id):
        raise NotFound("tenant not found", code="TENANT_NOT_FOUND")
    return Scope(id=row.id, tenant_id=row.id)


def site_scope(conn: Connection, p: Principal, site_id: str) -> Scope:
    s = t.sites.c
    row = conn.execute(sa.select(s.id, s.tenant_id).where(s.id == site_id)).first()
    if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
        raise NotFound("site not found", code="SITE_NOT_FOUND")
    return Scope(id=row.id, tenant_id=row.tenant_id)


def set_site_connectivity(conn: Connection, site_id: str, state: domain.Connectivity) -> None:
    conn.execute(t.sites.update().where(t.sites.c.id == site_id).values(connectivity_state=state.value))


def recompute_sites(conn: Connection, site_ids: Iterable[str]) -> None:
    """Each site is ONLINE exactly while one of its agents is."""
    a = t.agents.c
    for sid in site_ids:
        online = conn.execute(sa.select(a.id).where(a.site_id == sid, a.state == AgentState.ONLINE).limit(1)).first()
        set_site_connectivity(conn, sid, domain.site_connectivity(online is not None))


def release_work(conn: Connection, agent_ids: list[str], now: dt.datetime) -> None:
    """Give the agents' work back to their sites now: executions PENDING again, plans lease-free.

    A late result from such an agent is then rejected as LEASE_LOST.
    """
    x, p = t.executions.c, t.plans.c
    conn.execute(t.executions.update().where(
        x.agent_id.in_(agent_ids), x.state.in_([ExecState.LEASED, ExecState.RUNNING])
    ).values(state=ExecState.PENDING, agent_id=None, updated_at=now))
    conn.execute(t.plans.update().where(p.leased_by_agent_id.in_(agent_ids)).values(
        leased_by_agent_id=None, lease_expires_at=None, updated_at=now))


def rollup(conn: Connection, plan_id: str, now: dt.datetime) -> domain.PlanStatus:
    """Store the plan status its executions imply (``domain.plan_status``); a finished plan drops its lease."""
    x, p = t.executions.c, t.plans.c
    states = [ExecState(r[0]) for r in conn.execute(sa.select(x.state).where(x.plan_id == plan_id))]
    status = domain.plan_status(states)
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if status in domain.TERMINAL_PLAN:
        values.update(completed_at=now, leased_by_agent_id=None, lease_expires_at=None)
    conn.execute(t.plans.update().where(p.id == plan_id).values(**values))
    return status
