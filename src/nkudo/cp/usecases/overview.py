"""Read models of the dashboard (issue 13): a tenant's overview, a site's health, a VM's page; VM state history.

Why a use case of its own: the overview and the site status are aggregates over several tables (sites, agents,
hosts, VMs, plans), answered with a fixed number of ``GROUP BY`` statements per request however many sites a
tenant has, so a page never loops queries per site. The health rule itself is ``domain.site_health`` (pure).

The history of VM states is written here too (``record_vm_states``), by the heartbeat that reports a changed
state and by the result of the action that changed it, in their transactions; each VM keeps its newest
``HISTORY_KEEP`` rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from nkudo.cp import domain, vmcounters
from nkudo.cp import readviews as rv
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.domain import AgentState, Connectivity, ExecState, PlanStatus, VmStateSource
from nkudo.cp.errors import NotFound
from nkudo.cp.ports import Clock, Transactions
from nkudo.cp.records import Principal, iso, stamp
from nkudo.cp.usecases.common import site_scope, tenant_scope
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType

#: State changes kept per VM (older ones are pruned when a new one is written).
HISTORY_KEEP: Final = 200
#: Actions listed on a VM's page, newest first.
ACTIONS_SHOWN: Final = 50
#: At most this many expiring certificates are listed (how soon counts as expiring: domain.cert_warning_window).
CERTS_SHOWN: Final = 100
#: "Plans failed recently" on the overview.
FAILED_WINDOW: Final = dt.timedelta(hours=24)

_a, _h, _vm, _p, _x, _hist = t.agents.c, t.hosts.c, t.vms.c, t.plans.c, t.executions.c, t.vm_state_history.c
#: Enrolled agents: unenrolled ones are history, not "offline".
_ENROLLED = (AgentState.ONLINE.value, AgentState.OFFLINE.value)
_newer = t.vm_state_history.alias("newer")
#: Delete a VM's history rows older than its ``HISTORY_KEEP``-th newest (none while it has fewer: the subquery
#: is then NULL). Rows sharing that time are all kept, so "newest 200" may keep a few more on ties.
_PRUNE = t.vm_state_history.delete().where(
    _hist.site_id == sa.bindparam("s"), _hist.vm_id == sa.bindparam("v"),
    _hist.at < sa.select(_newer.c.at).where(_newer.c.site_id == sa.bindparam("s2"), _newer.c.vm_id == sa.bindparam("v2"))
    .order_by(_newer.c.at.desc()).offset(HISTORY_KEEP - 1).limit(1).scalar_subquery())


@dataclass(frozen=True, slots=True)
class VmStateWrite:
    """One VM state change to record (``previous`` is ``None`` when the VM was not known before)."""

    tenant_id: str
    site_id: str
    vm_id: str
    state: str
    previous: str | None
    source: VmStateSource
    execution_id: str | None = None


def record_vm_states(conn: Connection, changes: Sequence[VmStateWrite], now: dt.datetime) -> None:
    """Append the changes to the VMs' histories and keep each VM's newest ``HISTORY_KEEP`` rows.

    Two statements whatever the number of changes, both executemany with one SQL text: the insert, and the
    prune of each changed VM (``_PRUNE``, a range delete below the VM's ``HISTORY_KEEP``-th newest time,
    found by walking the (site, vm, at) index). Callers pass only real changes, so a quiet heartbeat costs
    nothing here. Measured: a window-function delete over the changed VMs cost ten times more.
    """
    if not changes:
        return
    conn.execute(t.vm_state_history.insert(), [
        {"tenant_id": c.tenant_id, "site_id": c.site_id, "vm_id": c.vm_id, "state": c.state,
         "previous_state": c.previous, "source": c.source.value, "execution_id": c.execution_id, "at": now}
        for c in changes])
    conn.execute(_PRUNE, [{"s": s, "v": vm, "s2": s, "v2": vm} for s, vm in sorted({(c.site_id, c.vm_id)
                                                                                     for c in changes})])


def _by_state(rows: Iterable[Row[Any, Any, Any]]) -> dict[str, dict[str, int]]:
    """``{site_id: {state: count}}`` from ``(site_id, state, count)`` rows."""
    out: dict[str, dict[str, int]] = {}
    for site_id, state, n in rows:
        out.setdefault(site_id, {})[state] = n
    return out


def _vm_counts(counts: dict[str, int]) -> dict[VmStatus, int]:
    return {VmStatus(s): n for s, n in sorted(counts.items())}


def _statuses(conn: Connection, sites: Sequence[Any]) -> list[rv.SiteStatus]:
    """The status of each site (rows of id, tenant_id, name, connectivity_state): two grouped statements for
    all of them together (agents by state, VMs by state), whatever their number."""
    ids = [s.id for s in sites]
    if not ids:
        return []
    agents = _by_state(conn.execute(
        sa.select(_a.site_id, _a.state, sa.func.count()).where(_a.site_id.in_(ids), _a.state.in_(_ENROLLED))
        .group_by(_a.site_id, _a.state)))
    vms = _by_state(conn.execute(
        sa.select(_vm.site_id, _vm.state, sa.func.count()).where(_vm.site_id.in_(ids),
                                                                 _vm.state != VmStatus.DELETED.value)
        .group_by(_vm.site_id, _vm.state)))
    out = []
    for s in sites:
        ag, vm = agents.get(s.id, {}), vms.get(s.id, {})
        online, offline = ag.get(AgentState.ONLINE.value, 0), ag.get(AgentState.OFFLINE.value, 0)
        health, reasons = domain.site_health(online, online + offline, vm)
        out.append(rv.SiteStatus(site_id=s.id, tenant_id=s.tenant_id, name=s.name,
                                connectivity_state=Connectivity(s.connectivity_state), health=health, reasons=reasons,
                                agents_online=online, agents_offline=offline, vms_by_state=_vm_counts(vm)))
    return out


def _vm_view(r: Any) -> v.VmView:
    """A ``vms`` row (with any extra columns joined to it) as the VM list shows it."""
    return v.VmView(vm_id=r.vm_id, tenant_id=r.tenant_id, site_id=r.site_id, host_id=r.host_id, name=r.name,
                    state=VmStatus(r.state), vcpus=r.vcpus, memory_mib=r.memory_mib, updated_at=stamp(r.updated_at),
                    last_transition_at=iso(r.last_transition_at),
                    counters=vmcounters.view(r.counters, r.counters_prev))


class Overview:
    def __init__(self, db: Transactions, clock: Clock, cert_lifetime: dt.timedelta = dt.timedelta(days=1)) -> None:
        self.db = db
        self.clock = clock
        #: The agent certificates' configured lifetime decides which of them count as expiring.
        self.cert_warning = domain.cert_warning_window(cert_lifetime)

    async def tenant_overview(self, p: Principal, tenant_id: str, now: dt.datetime | None = None
                              ) -> rv.TenantOverview:
        """The tenant's sites with their health, hosts and VMs counted, plans in flight or failed, expiring
        certificates: seven statements whatever the size of the tenant."""
        at = now or self.clock.now()

        def tx(conn: Connection) -> rv.TenantOverview:
            tenant_scope(conn, p, tenant_id)
            s = t.sites.c
            sites = conn.execute(sa.select(s.id, s.tenant_id, s.name, s.connectivity_state)
                                 .where(s.tenant_id == tenant_id).order_by(s.name, s.id)).all()
            ids = [r.id for r in sites]
            statuses = _statuses(conn, sites)
            hosts: dict[str, int] = dict(conn.execute(  # a host is online while its current agent is
                sa.select(_a.state, sa.func.count()).select_from(t.hosts).join(t.agents, _a.id == _h.current_agent_id)
                .where(_h.site_id.in_(ids), _a.state.in_(_ENROLLED)).group_by(_a.state)).all())
            plans: dict[str, int] = dict(conn.execute(
                sa.select(_p.status, sa.func.count()).where(
                    _p.site_id.in_(ids), sa.or_(_p.status.in_([PlanStatus.PENDING.value, PlanStatus.IN_PROGRESS.value]),
                                                sa.and_(_p.status == PlanStatus.FAILED.value,
                                                        _p.completed_at >= at - FAILED_WINDOW)))
                .group_by(_p.status)).all())
            certs = conn.execute(
                sa.select(_a.id, _a.site_id, _h.hostname, _a.cert_expires_at).join(t.hosts, _h.id == _a.host_id)
                .where(_a.site_id.in_(ids), _a.state.in_(_ENROLLED), _a.cert_expires_at <= at + self.cert_warning)
                .order_by(_a.cert_expires_at, _a.id).limit(CERTS_SHOWN)).all()
            total: dict[str, int] = {}
            for st in statuses:
                for state, n in st.vms_by_state.items():
                    total[state.value] = total.get(state.value, 0) + n
            return rv.TenantOverview(
                tenant_id=tenant_id, at=stamp(at), sites=statuses,
                hosts_online=hosts.get(AgentState.ONLINE.value, 0), hosts_offline=hosts.get(AgentState.OFFLINE.value, 0),
                vms_by_state=_vm_counts(total), plans_pending=plans.get(PlanStatus.PENDING.value, 0),
                plans_running=plans.get(PlanStatus.IN_PROGRESS.value, 0),
                plans_failed_24h=plans.get(PlanStatus.FAILED.value, 0),
                expiring_certificates=[rv.ExpiringCertificate(agent_id=r.id, site_id=r.site_id, hostname=r.hostname,
                                                             cert_expires_at=stamp(r.cert_expires_at)) for r in certs])

        return await self.db.run(tx)

    async def site_status(self, p: Principal, site_id: str) -> rv.SiteStatus:
        def tx(conn: Connection) -> rv.SiteStatus:
            site_scope(conn, p, site_id)
            s = t.sites.c
            site = conn.execute(sa.select(s.id, s.tenant_id, s.name, s.connectivity_state).where(s.id == site_id)).one()
            return _statuses(conn, [site])[0]

        return await self.db.run(tx)

    async def vm_detail(self, p: Principal, site_id: str, vm_id: str) -> rv.VmDetail:
        """The VM (deleted ones too: their history is what is left), its host's name, its newest
        ``HISTORY_KEEP`` state changes and ``ACTIONS_SHOWN`` actions, newest first."""
        def tx(conn: Connection) -> rv.VmDetail:
            site_scope(conn, p, site_id)
            row = conn.execute(sa.select(t.vms, _h.hostname).outerjoin(t.hosts, _h.id == _vm.host_id)
                               .where(_vm.site_id == site_id, _vm.vm_id == vm_id)).first()
            if row is None:
                raise NotFound("VM not found", code="VM_NOT_FOUND")
            hist = conn.execute(sa.select(t.vm_state_history).where(_hist.site_id == site_id, _hist.vm_id == vm_id)
                                .order_by(_hist.at.desc(), _hist.id.desc()).limit(HISTORY_KEEP))
            acts = conn.execute(sa.select(t.executions).where(_x.site_id == site_id, _x.vm_id == vm_id)
                                .order_by(_x.created_at.desc(), _x.position.desc()).limit(ACTIONS_SHOWN))
            return rv.VmDetail(
                vm=_vm_view(row), hostname=row.hostname,
                history=[rv.VmStateChange(
                    state=VmStatus(h.state), previous_state=VmStatus(h.previous_state) if h.previous_state else None,
                    source=VmStateSource(h.source), execution_id=h.execution_id, at=stamp(h.at)) for h in hist],
                actions=[rv.VmAction(
                    execution_id=x.id, plan_id=x.plan_id, action_id=x.action_id, type=ActionType(x.action_type),
                    state=ExecState(x.state), created_at=stamp(x.created_at), started_at=iso(x.started_at),
                    finished_at=iso(x.finished_at), error_code=x.error_code, error_message=x.error_message)
                    for x in acts])

        return await self.db.run(tx)
