"""Statements and rules several use cases share: audit writes, visibility, site connectivity, plan rollup.

Why one module: these are the only transaction steps two aggregates run alike (an unenroll and the offline
sweep both give an agent's work back; a result and a cancel both roll a plan up), so each is written once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from nkudo.cp import auditchain, domain
from nkudo.cp import schema as t
from nkudo.cp.domain import AgentState, ExecState
from nkudo.cp.errors import Forbidden, NotFound, Unauthenticated
from nkudo.cp.records import AuditEntry, Principal, RequestInfo, Scope

NO_REQUEST = RequestInfo()


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def new_id() -> str:
    return str(uuid.uuid4())


def rand_token() -> str:
    return secrets.token_urlsafe(32)


def audit(conn: Connection, info: RequestInfo, entry: AuditEntry, now: dt.datetime) -> None:
    """Append ``entry`` to its chain in the current transaction (so an event exists exactly when its change does).

    The one writer of audit events. The chain is the entry's tenant, or ``global`` when it has none. The
    chain's head row is locked first (``FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already
    serialises writers), so appends from any number of replicas take turns and each links to the one
    before it; a rolled-back change takes its event with it. ``(chain, seq)`` is unique besides, so a
    fork is impossible even for a writer that skipped the lock. Events that record no change of their own
    (a refused enrollment, a lock-out) go through ``AuditLog.record``, which gives them a transaction.
    """
    chain = entry.tenant_id or auditchain.GLOBAL_CHAIN
    h = t.audit_chain_heads.c
    lock = sa.select(h.seq, h.entry_hash).where(h.chain == chain).with_for_update()
    head = conn.execute(lock).first()
    if head is None:  # the chain's first event: create its head (a concurrent creator makes this a no-op)
        first = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(t.audit_chain_heads)
        conn.execute(first.values(chain=chain, seq=0, entry_hash=auditchain.GENESIS, updated_at=now)
                     .on_conflict_do_nothing(index_elements=["chain"]))
        head = conn.execute(lock).one()
    seq, prev = head.seq + 1, head.entry_hash
    details = auditchain.normalise(entry.details)
    actor_type = entry.actor.type.value
    digest = auditchain.link(chain, seq, now, entry.tenant_id, actor_type, entry.actor.id, entry.action,
                             entry.object_type, entry.object_id, info.request_id, info.source_ip, details, prev)
    ins = t.audit_events.insert().values(
        tenant_id=entry.tenant_id, actor_type=actor_type, actor_id=entry.actor.id, action=entry.action,
        object_type=entry.object_type, object_id=entry.object_id, request_id=info.request_id,
        source_ip=info.source_ip, details=details, occurred_at=now, chain=chain, seq=seq, prev_hash=prev,
        entry_hash=digest,
    )
    move = t.audit_chain_heads.update().where(h.chain == chain).values(seq=seq, entry_hash=digest, updated_at=now)
    if conn.dialect.name == "postgresql":
        # One round trip fewer while the head is locked (a data-modifying CTE runs even when unreferenced):
        # the lock is held until commit, so this is what bounds one chain's appends per second.
        conn.execute(move.add_cte(ins.cte("appended")))
    else:
        conn.execute(ins)
        conn.execute(move)


def require(p: Principal, perm: domain.Permission) -> None:
    """Refuse a principal whose role does not grant ``perm`` (issue 13); the admin and tenant API keys pass.

    Called first by every write use case, before it reads anything, so a viewer learns nothing from a refused
    write that a read would not have told it.
    """
    if not p.allows(perm):
        raise Forbidden(f"this operation needs the {perm.value!r} permission, which your role "
                        f"({p.role.value if p.role else 'none'}) does not grant", code="FORBIDDEN_ROLE")


def require_admin(p: Principal) -> None:
    if not p.is_admin:
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


def seek(order: Sequence[tuple[sa.ColumnElement[Any], bool]], key: tuple[Any, ...] | None
         ) -> sa.ColumnElement[bool]:
    """Rows strictly after ``key`` in the order ``order`` ((column, descending) pairs): a keyset page's WHERE.

    Spelled as ``c1 beyond v1 OR (c1 = v1 AND c2 beyond v2) ...`` rather than a row-value comparison
    because the columns may sort in different directions and both databases use the index on it.
    """
    if key is None:
        return sa.true()
    terms: list[sa.ColumnElement[bool]] = []
    for i, (col, desc) in enumerate(order):
        equal = [c == v for (c, _), v in zip(order[:i], key[:i], strict=True)]
        terms.append(sa.and_(*equal, col < key[i] if desc else col > key[i]))
    return sa.or_(*terms)


def ordering(order: Sequence[tuple[sa.ColumnElement[Any], bool]]) -> list[sa.ColumnElement[Any]]:
    """The ORDER BY of a keyset listing, the same pairs ``seek`` resumes in."""
    return [c.desc() if desc else c.asc() for c, desc in order]
