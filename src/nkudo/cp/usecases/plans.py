"""Plans (tenant side): validate and submit (idempotently), read and cancel."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.config import Settings
from nkudo.cp.domain import ExecState, Permission, PlanStatus
from nkudo.cp.errors import Conflict, NotFound
from nkudo.cp.feed import Change, ChangeKind
from nkudo.cp.models import PlanCreate
from nkudo.cp.paging import DEFAULT_LIMIT, PageKind, after, check_limit, cut
from nkudo.cp.ports import NO_FEED, Clock, Publisher, Transactions
from nkudo.cp.records import ActionSpec, AuditEntry, Principal, RequestInfo, Scope, iso, stamp
from nkudo.cp.usecases import quotas
from nkudo.cp.usecases.common import audit, new_id, ordering, require, rollup, seek, site_scope
from nkudo.wire import actions as wa
from nkudo.wire import codec
from nkudo.wire.vocab import ActionType


def execution_view(r: Row[Any]) -> v.ExecutionView:
    return v.ExecutionView(
        id=r.id, plan_id=r.plan_id, tenant_id=r.tenant_id, site_id=r.site_id, position=r.position,
        action_id=r.action_id, type=r.action_type, params=r.params, timeout_seconds=r.timeout_seconds,
        vm_id=r.vm_id, state=r.state, agent_id=r.agent_id, attempts=r.attempts, error_code=r.error_code,
        error_message=r.error_message, created_at=stamp(r.created_at), updated_at=stamp(r.updated_at),
        started_at=iso(r.started_at), finished_at=iso(r.finished_at),
    )


def validate_plan(body: PlanCreate) -> list[ActionSpec]:
    """Check every action with the agent's own schemas.

    ``parse_params`` and ``check_action_ids`` are the functions the agent's plan parser calls, so a plan
    the agent would refuse is a 400 naming the field here, not a failure on a host later.
    """
    out = []
    for i, act in enumerate(body.actions):
        parsed = wa.parse_params(act.type, act.params, prefix=f"actions[{i}].params")
        timeout = act.timeout_seconds or wa.DEFAULT_TIMEOUTS.get(act.type, wa.DEFAULT_TIMEOUT)
        out.append(ActionSpec(action_id=act.action_id or f"action-{i + 1}", type=act.type,
                              params=codec.to_builtins(parsed), timeout_seconds=timeout, vm_id=wa.vm_id_of(parsed)))
    wa.check_action_ids([a.action_id for a in out])
    return out


def vm_changes(actions: list[ActionSpec]) -> tuple[set[str], set[str]]:
    """The VM ids a plan creates and deletes (what the VMs-per-agent quota is checked on)."""
    creates = {a.vm_id for a in actions if a.type == ActionType.MICROVM_CREATE and a.vm_id}
    deletes = {a.vm_id for a in actions if a.type == ActionType.MICROVM_DELETE and a.vm_id}
    return creates, deletes


def request_digest(site_id: str, actions: list[ActionSpec]) -> str:
    """What an idempotency key is bound to: the site and the validated actions (same encoding as ever)."""
    return hashlib.sha256(codec.encode([site_id, [a.as_list() for a in actions]])).hexdigest()


def plan_view(conn: Connection, plan_id: str, deduplicated: bool = False) -> v.PlanView:
    """The plan and its executions in order, as the API shows them."""
    p = conn.execute(sa.select(t.plans).where(t.plans.c.id == plan_id)).one()
    execs = conn.execute(sa.select(t.executions).where(t.executions.c.plan_id == plan_id)
                         .order_by(t.executions.c.position))
    return v.PlanView(
        plan_id=p.id, tenant_id=p.tenant_id, site_id=p.site_id, idempotency_key=p.idempotency_key,
        plan_status=p.status, deduplicated=deduplicated, created_at=stamp(p.created_at),
        updated_at=stamp(p.updated_at), completed_at=iso(p.completed_at), leased_by_agent_id=p.leased_by_agent_id,
        lease_expires_at=iso(p.lease_expires_at), executions=[execution_view(e) for e in execs],
    )


def plan_scope(conn: Connection, p: Principal, plan_id: str) -> Scope:
    row = conn.execute(sa.select(t.plans.c.id, t.plans.c.tenant_id).where(t.plans.c.id == plan_id)).first()
    if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
        raise NotFound("plan not found", code="PLAN_NOT_FOUND")
    return Scope(id=row.id, tenant_id=row.tenant_id)


class Plans:
    def __init__(self, settings: Settings, db: Transactions, clock: Clock, feed: Publisher = NO_FEED) -> None:
        self.s = settings
        self.db = db
        self.clock = clock
        self.feed = feed  # issue 13: live views learn of submitted and cancelled plans

    def _announce(self, plan: v.PlanView) -> v.PlanView:
        """Publish a committed plan change (its executions changed with it)."""
        if not plan.deduplicated:
            self.feed.publish(Change(ChangeKind.PLAN, plan.tenant_id, plan.site_id, plan.plan_id, plan.plan_id))
        return plan

    async def create_plan(self, p: Principal, site_id: str, body: PlanCreate, info: RequestInfo
                          ) -> v.PlanView:
        require(p, Permission.OPERATE)
        actions = validate_plan(body)
        digest = request_digest(site_id, actions)
        try:
            return self._announce(
                await self.db.run(self._create_plan_tx, p, site_id, body.idempotency_key, actions, digest, info))
        except sa.exc.IntegrityError:
            # A concurrent request (maybe on another replica) created the plan for this key first: return it.
            return await self.db.run(self._create_plan_tx, p, site_id, body.idempotency_key, actions, digest, info)

    def _create_plan_tx(self, conn: Connection, p: Principal, site_id: str, key: str, actions: list[ActionSpec],
                        digest: str, info: RequestInfo) -> v.PlanView:
        now = self.clock.now()
        site = site_scope(conn, p, site_id)
        quotas.lock_tenant(conn, site.tenant_id)  # first: concurrent submits at the quota must not both pass
        ik = t.idempotency_keys.c
        prior = conn.execute(sa.select(t.idempotency_keys).where(ik.tenant_id == site.tenant_id, ik.key == key)
                             .with_for_update()).first()
        if prior is not None:
            if prior.created_at > now - dt.timedelta(seconds=self.s.idempotency_window):
                if prior.request_digest != digest:
                    raise Conflict("idempotency_key was used for a different request within 24 h",
                                   code="IDEMPOTENCY_KEY_REUSED", field="idempotency_key")
                return plan_view(conn, prior.plan_id, deduplicated=True)
            conn.execute(t.idempotency_keys.delete().where(ik.tenant_id == site.tenant_id, ik.key == key))
        # Issue 12: max_concurrent_plans and max_vms_per_agent (after the replay check: a replay adds nothing).
        quotas.check_plan(conn, site.tenant_id, site.id, *vm_changes(actions))
        plan_id = new_id()
        conn.execute(t.plans.insert().values(
            id=plan_id, tenant_id=site.tenant_id, site_id=site.id, idempotency_key=key, request_digest=digest,
            status=PlanStatus.PENDING, created_at=now, updated_at=now))
        conn.execute(t.executions.insert(), [
            {"id": new_id(), "tenant_id": site.tenant_id, "site_id": site.id, "plan_id": plan_id, "position": i,
             "action_id": a.action_id, "action_type": a.type, "params": a.params, "timeout_seconds": a.timeout_seconds,
             "vm_id": a.vm_id, "state": ExecState.PENDING, "agent_id": None, "attempts": 0, "created_at": now,
             "updated_at": now}
            for i, a in enumerate(actions)
        ])
        conn.execute(t.idempotency_keys.insert().values(tenant_id=site.tenant_id, key=key, plan_id=plan_id,
                                                        request_digest=digest, created_at=now))
        audit(conn, info, AuditEntry(p.actor, "plan.create", site.tenant_id, "plan", plan_id,
                                     {"site_id": site.id, "actions": [a.type for a in actions]}), now)
        return plan_view(conn, plan_id, deduplicated=False)

    async def list_plans(self, p: Principal, site_id: str, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None,
                         status: PlanStatus | None = None) -> v.PlanList:
        """A page of the site's plans, newest first, without their executions (issue 13: the plans page)."""
        check_limit(limit)
        key = after(PageKind.PLANS, cursor)

        def tx(conn: Connection) -> v.PlanList:
            site_scope(conn, p, site_id)
            pl, x = t.plans.c, t.executions.c
            actions = sa.select(sa.func.count()).where(x.plan_id == pl.id).scalar_subquery()
            order = [(pl.created_at, True), (pl.id, False)]
            q = sa.select(t.plans, actions.label("actions")).where(pl.site_id == site_id, seek(order, key))
            if status is not None:
                q = q.where(pl.status == status.value)
            found = conn.execute(q.order_by(*ordering(order)).limit(limit + 1)).all()
            rows, nxt = cut(PageKind.PLANS, found, limit, lambda r: (r.created_at, r.id))
            return v.PlanList(next=nxt, plans=[v.PlanSummaryView(
                plan_id=r.id, tenant_id=r.tenant_id, site_id=r.site_id, idempotency_key=r.idempotency_key,
                plan_status=r.status, actions=r.actions, created_at=stamp(r.created_at),
                updated_at=stamp(r.updated_at), completed_at=iso(r.completed_at),
                leased_by_agent_id=r.leased_by_agent_id, lease_expires_at=iso(r.lease_expires_at),
            ) for r in rows])

        return await self.db.run(tx)

    async def get_plan(self, p: Principal, plan_id: str) -> v.PlanView:
        def tx(conn: Connection) -> v.PlanView:
            plan_scope(conn, p, plan_id)
            return plan_view(conn, plan_id)

        return await self.db.run(tx)

    async def cancel_plan(self, p: Principal, plan_id: str, info: RequestInfo) -> v.PlanView:
        require(p, Permission.OPERATE)

        def tx(conn: Connection) -> v.PlanView:
            now = self.clock.now()
            plan = plan_scope(conn, p, plan_id)
            x = t.executions.c
            # Only actions no agent has started can be cancelled; running ones finish and report normally.
            conn.execute(t.executions.update().where(
                x.plan_id == plan_id, x.state.in_([ExecState.PENDING, ExecState.LEASED])
            ).values(state=ExecState.CANCELLED, updated_at=now, finished_at=now, error_code="CANCELLED",
                     error_message="plan cancelled"))
            rollup(conn, plan_id, now)
            audit(conn, info, AuditEntry(p.actor, "plan.cancel", plan.tenant_id, "plan", plan_id), now)
            return plan_view(conn, plan_id)

        return self._announce(await self.db.run(tx))
