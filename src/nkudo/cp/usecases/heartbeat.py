"""Heartbeats and leasing: the agent's "I am here", its VMs and facts, and the plans it is handed.

The one read outside a transaction is the heartbeat's authorisation read: a single statement, batched
across concurrent heartbeats (``nkudo.cp.batching``) and run with ``Transactions.select``; a heartbeat that
changes nothing but "last seen" is buffered (write-behind, flushed every ``flush_interval``), and any
heartbeat that has something to write runs in its own transaction and re-authorises there.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Row

from nkudo.cp import domain, vmcounters
from nkudo.cp import schema as t
from nkudo.cp.batching import Coalescer
from nkudo.cp.config import Settings
from nkudo.cp.domain import ActorType, AgentState, Connectivity, ExecState, PlanStatus, VmStateSource
from nkudo.cp.feed import Change, ChangeKind, publish_all
from nkudo.cp.ports import NO_FEED, Clock, Metrics, Publisher, Transactions
from nkudo.cp.records import Actor, AgentIdentity, AgentRecord, AuditEntry
from nkudo.cp.usecases.agentauth import HAS_WORK, authorized, load_agent
from nkudo.cp.usecases.common import NO_REQUEST, audit, set_site_connectivity
from nkudo.cp.usecases.console import CONSOLE_WANTED, Consoles
from nkudo.cp.usecases.overview import VmStateWrite, record_vm_states
from nkudo.wire import codec
from nkudo.wire import messages as wm

_a, _p = t.agents.c, t.plans.c
_B = sa.bindparam
#: The columns the authorisation and the "does this heartbeat change anything?" decision need, for every
#: agent in a batch of concurrent heartbeats (see ``nkudo.cp.batching``).
_HB_COLUMNS = (_a.id, _a.state, _a.cert_serial, _a.prev_cert_serial, _a.prev_serial_valid_until, _a.vm_digest,
               _a.facts_digest, _a.agent_version, HAS_WORK, CONSOLE_WANTED)
_SEL_AGENTS_HB = sa.select(*_HB_COLUMNS).where(_a.id.in_(_B("agent_ids", expanding=True)))
#: PostgreSQL: ``= ANY(array)`` keeps one SQL text whatever the batch size, so the driver prepares it once.
_SEL_AGENTS_HB_PG = sa.select(*_HB_COLUMNS).where(
    _a.id == sa.any_(_B("agent_ids", type_=postgresql.ARRAY(sa.String()))))
_HB_TOUCH = t.agents.update().where(_a.id == _B("agent_id")).values(
    last_heartbeat_at=_B("now"), heartbeat_seq=_B("seq"))
_v = t.vms.c
#: Issue 13: the stored states of the VMs a heartbeat reports, so only real changes go to their history.
_SEL_VM_STATES = sa.select(_v.vm_id, _v.state).where(
    _v.site_id == _B("site_id"), _v.vm_id.in_(_B("vm_ids", expanding=True)))
_SEL_VM_STATES_PG = sa.select(_v.vm_id, _v.state).where(
    _v.site_id == _B("site_id"), _v.vm_id == sa.any_(_B("vm_ids", type_=postgresql.ARRAY(sa.String()))))
_LEASE_CANDIDATES = (
    sa.select(_p.id, _p.status, _p.leased_by_agent_id)  # status, holder: is this lease news (issue 13)?
    .where(_p.site_id == _B("site_id"),
           sa.or_(_p.status == PlanStatus.PENDING.value, _p.status == PlanStatus.IN_PROGRESS.value),
           sa.or_(_p.leased_by_agent_id.is_(None), _p.leased_by_agent_id == _B("me"), _p.lease_expires_at < _B("now")))
    .order_by(sa.case((_p.leased_by_agent_id == _B("me2"), 0), else_=1), _p.created_at, _p.id)
    .limit(_B("lim"))
)
_LEASE_CANDIDATES_PG = _LEASE_CANDIDATES.with_for_update(of=t.plans, skip_locked=True)


def _vm_upsert(db: Transactions) -> Any:
    """The upsert of an agent's reported VMs, built once per process.

    Building this statement (dialect insert, ``excluded``, four ``CASE``) on every heartbeat that changed a
    VM cost ~1.4 ms of CPU, more than executing it. It is run as an executemany (psycopg pipelines it);
    measured, that is cheaper on PostgreSQL than one multi-row "insertmanyvalues" statement, whose long SQL
    text the driver re-parses on every call.
    """
    ins = db.insert(t.vms)
    ex, v = ins.excluded, t.vms.c
    return ins.on_conflict_do_update(
        index_elements=[v.site_id, v.vm_id],
        set_={
            "host_id": ex.host_id, "state": ex.state, "updated_at": ex.updated_at,
            "name": sa.case((ex.name != ex.vm_id, ex.name), else_=v.name),
            "vcpus": sa.case((ex.vcpus > 0, ex.vcpus), else_=v.vcpus),
            "memory_mib": sa.case((ex.memory_mib > 0, ex.memory_mib), else_=v.memory_mib),
            "last_transition_at": sa.case((v.state != ex.state, ex.last_transition_at), else_=v.last_transition_at),
        },
    )


class Heartbeats:
    def __init__(self, settings: Settings, db: Transactions, metrics: Metrics, clock: Clock,
                 consoles: Consoles | None = None, feed: Publisher = NO_FEED) -> None:
        self.s = settings
        self.feed = feed  # issue 13: only heartbeats that change something are announced
        self.consoles = consoles or Consoles(settings, db, clock)
        self.db = db
        self.metrics = metrics
        self.clock = clock
        # Write-behind of "agent X was seen at T with seq S" for heartbeats that change nothing else:
        # flushed in one batch every ``flush_interval`` (well under the offline threshold) instead of one
        # write transaction per heartbeat.
        self.seen: dict[str, tuple[dt.datetime, int]] = {}
        # Issue 15: the latest per-VM counters of each agent, written by the same periodic flush (never here).
        self.counters: dict[str, tuple[dt.datetime, list[wm.VmCounters]]] = {}
        self.flush_interval = min(1.0, settings.offline_after / 4)
        self._agents: Coalescer[str, Row[Any]] = Coalescer(self._read_agents)
        self._vm_upsert = _vm_upsert(db)
        self._select_batch = _SEL_AGENTS_HB_PG if db.is_pg else _SEL_AGENTS_HB
        self._lease_candidates = _LEASE_CANDIDATES_PG if db.is_pg else _LEASE_CANDIDATES
        self._vm_states = _SEL_VM_STATES_PG if db.is_pg else _SEL_VM_STATES

    async def heartbeat(self, ident: AgentIdentity, req: wm.HeartbeatRequest, vm_digest: str,
                        facts_digest: str | None) -> wm.HeartbeatResponse:
        """Authorise from a fresh read; a heartbeat that changes nothing but "last seen" writes nothing now.

        The read is shared with the heartbeats arriving at the same time (``self._agents``); it still
        starts after this request arrived, so unenroll and revocation by any replica apply at once.
        Everything else (new VM digest or facts, execution updates, an offline agent, work to lease) goes
        through ``_heartbeat_tx``, which re-reads and re-authorises inside its write transaction.
        """
        now = self.clock.now()
        agent = authorized(await self._agents.get(ident.cn), ident, now)
        if req.vm_counters:
            self.counters[agent.id] = (now, req.vm_counters)
        quiet = domain.heartbeat_is_quiet(
            state=agent.state, has_work=agent.has_work, wants_lease=req.lease,
            has_updates=bool(req.execution_updates), vm_digest=vm_digest, stored_vm_digest=agent.vm_digest,
            facts_digest=facts_digest, stored_facts_digest=agent.facts_digest, agent_version=req.agent_version,
            stored_agent_version=agent.agent_version)
        if quiet:
            prev = self.seen.get(agent.id)
            if prev is None or prev[1] <= req.heartbeat_seq:
                self.seen[agent.id] = (self.clock.now(), req.heartbeat_seq)
            plans: list[wm.LeasedPlan] = []
        else:
            changes: list[Change] = []
            plans = await self.db.run(self._heartbeat_tx, ident, req, vm_digest, facts_digest, changes)
            publish_all(self.feed, changes)
        self.metrics.heartbeats.inc()
        resp = wm.HeartbeatResponse(next_heartbeat_seconds=self.s.heartbeat_interval, pending_plans=plans)
        if agent.console_wanted or req.consoles:  # issue 15: tails asked for / shipped (own transaction)
            resp.console_requests = await self.consoles.exchange(agent.id, req.consoles)
        return resp

    async def _read_agents(self, agent_ids: list[str]) -> dict[str, Row[Any]]:
        """Authorisation and change-detection columns of a batch of heartbeating agents (one statement)."""
        return {r.id: r for r in await self.db.select(self._select_batch,
                                                      {"agent_ids": agent_ids, "now": self.clock.now()})}

    @staticmethod
    def _flush_seen_tx(conn: Connection, seen: dict[str, tuple[dt.datetime, int]]) -> None:
        conn.execute(
            t.agents.update().where(_a.id == _B("aid"), _a.state == AgentState.ONLINE.value,
                                    sa.or_(_a.last_heartbeat_at.is_(None), _a.last_heartbeat_at < _B("seen")))
            .values(last_heartbeat_at=_B("seen"),
                    heartbeat_seq=sa.case((_a.heartbeat_seq < _B("seq"), _B("seq2")), else_=_a.heartbeat_seq)),
            [{"aid": k, "seen": v[0], "seq": v[1], "seq2": v[1]} for k, v in seen.items()],
        )

    async def flush_seen(self) -> int:
        """Persist buffered "last seen" times (called periodically, before sweeping and at shutdown)."""
        if not self.seen and not self.counters:
            return 0
        seen, self.seen = self.seen, {}
        counters, self.counters = self.counters, {}
        if seen:
            await self.db.run(self._flush_seen_tx, seen)
        if counters:
            await self.db.run(vmcounters.flush_tx, counters)
        return len(seen)

    def _heartbeat_tx(self, conn: Connection, ident: AgentIdentity, req: wm.HeartbeatRequest, vm_digest: str,
                      facts_digest: str | None, changes: list[Change] | None = None) -> list[wm.LeasedPlan]:
        now = self.clock.now()
        changes = [] if changes is None else changes
        changes.clear()  # a retried transaction starts over
        if self.db.is_pg:
            # Losing the last heartbeat timestamp in a crash is harmless; waiting for a WAL flush 1000x/s is not.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        agent = load_agent(conn, ident, now, heartbeat=True)
        seq = max(agent.heartbeat_seq, req.heartbeat_seq)
        values: dict[str, Any] = {}
        if req.agent_version and req.agent_version != agent.agent_version:
            values["agent_version"] = req.agent_version
        if agent.state != AgentState.ONLINE:
            values["state"] = AgentState.ONLINE
            set_site_connectivity(conn, agent.site_id, Connectivity.ONLINE)
            changes.append(Change(ChangeKind.SITE, agent.tenant_id, agent.site_id, agent.site_id))
            audit(conn, NO_REQUEST, AuditEntry(Actor(ActorType.AGENT, agent.id), "agent.online", agent.tenant_id,
                                               "agent", agent.id), now)
        if facts_digest is not None and facts_digest != agent.facts_digest and req.host_facts is not None:
            values["facts_digest"] = facts_digest
            hv: dict[str, Any] = {"facts": codec.to_builtins(req.host_facts), "last_facts_at": now}
            if req.host_facts.hostname:
                hv["hostname"] = req.host_facts.hostname
            conn.execute(t.hosts.update().where(t.hosts.c.id == agent.host_id).values(**hv))
            if req.host_facts.os:
                values["os"] = req.host_facts.os
            if req.host_facts.arch:
                values["arch"] = req.host_facts.arch
            if req.host_facts.kernel:
                values["kernel_version"] = req.host_facts.kernel
        if vm_digest != agent.vm_digest:
            values["vm_digest"] = vm_digest
            self._sync_vms(conn, agent, req.vms, now)
            changes.append(Change(ChangeKind.VM, agent.tenant_id, agent.site_id))  # no object: the site's VMs
        if values:
            conn.execute(t.agents.update().where(_a.id == agent.id).values(
                last_heartbeat_at=now, heartbeat_seq=seq, **values))
            if values.keys() - {"vm_digest"}:  # state, version or facts: the agent's row as a view shows it
                changes.append(Change(ChangeKind.AGENT, agent.tenant_id, agent.site_id, agent.id))
        else:
            conn.execute(_HB_TOUCH, {"agent_id": agent.id, "now": now, "seq": seq})
        x = t.executions.c
        for up in req.execution_updates:
            if conn.execute(
                t.executions.update()
                .where(x.id == up.execution_id, x.agent_id == agent.id, x.site_id == agent.site_id,
                       x.state.in_([ExecState.LEASED, ExecState.RUNNING]))
                .values(state=ExecState.RUNNING, updated_at=now, started_at=sa.func.coalesce(x.started_at, now))
            ).rowcount:
                changes.append(Change(ChangeKind.EXECUTION, agent.tenant_id, agent.site_id, up.execution_id))
        # A probe (`nkudo-edge verify-heartbeat`) asks not to be leased work it would never run.
        return self._lease(conn, agent, now, changes) if agent.has_work and req.lease else []

    def _sync_vms(self, conn: Connection, agent: AgentRecord, vms: list[wm.VMSummary], now: dt.datetime) -> None:
        """Upsert the VMs an agent reports, keyed by (agent's site, vm id): no agent can touch another site's VM."""
        if not vms:
            return
        rows = [{"site_id": agent.site_id, "vm_id": v.vm_id, "tenant_id": agent.tenant_id, "host_id": agent.host_id,
                 "name": v.name or v.vm_id, "state": v.state, "vcpus": v.vcpus, "memory_mib": v.memory_mib,
                 "updated_at": now, "last_transition_at": now} for v in vms]
        # Issue 13: history of the states that changed (one indexed read; runs only when the VM digest moved).
        stored = dict(conn.execute(self._vm_states, {"site_id": agent.site_id, "vm_ids": [v.vm_id for v in vms]}).all())
        record_vm_states(conn, [
            VmStateWrite(agent.tenant_id, agent.site_id, vm_id, state, prev, VmStateSource.HEARTBEAT)
            for vm_id, state, prev in domain.vm_state_changes(stored, ((v.vm_id, v.state.value) for v in vms))], now)
        conn.execute(self._vm_upsert, rows)

    def _lease(self, conn: Connection, agent: AgentRecord, now: dt.datetime,
               changes: list[Change] | None = None) -> list[wm.LeasedPlan]:
        """Lease up to N plans of the agent's site to it: its own leases first (renewed), then free or expired ones."""
        x = t.executions.c
        found = conn.execute(self._lease_candidates, {
            "site_id": agent.site_id, "me": agent.id, "me2": agent.id, "now": now, "lim": self.s.max_plans_per_lease}
        ).all()
        ids = [r[0] for r in found]
        if not ids:
            return []
        if changes is not None:  # a renewal of this agent's own lease is not news; a new holder or start is
            changes.extend(Change(ChangeKind.PLAN, agent.tenant_id, agent.site_id, r[0], r[0]) for r in found
                           if r[1] == PlanStatus.PENDING or r[2] != agent.id)
        until = now + dt.timedelta(seconds=self.s.lease_ttl)
        conn.execute(t.plans.update().where(_p.id.in_(ids)).values(
            leased_by_agent_id=agent.id, lease_expires_at=until, updated_at=now,
            status=sa.case((_p.status == PlanStatus.PENDING, PlanStatus.IN_PROGRESS), else_=_p.status),
        ))
        # Hand every non-terminal action of these plans to this agent; actions another (expired) holder had are
        # re-offered, so its late results are rejected as lease lost.
        conn.execute(t.executions.update().where(
            x.plan_id.in_(ids),
            sa.or_(x.state == ExecState.PENDING,
                   sa.and_(x.state.in_([ExecState.LEASED, ExecState.RUNNING]), x.agent_id != agent.id)),
        ).values(state=ExecState.LEASED, agent_id=agent.id, attempts=x.attempts + 1, updated_at=now))
        rows = conn.execute(
            sa.select(t.executions).where(x.plan_id.in_(ids), x.state.in_([ExecState.LEASED, ExecState.RUNNING]))
            .order_by(x.plan_id, x.position)
        ).all()
        by_plan: dict[str, list[wm.LeasedAction]] = {i: [] for i in ids}
        for r in rows:
            by_plan[r.plan_id].append(wm.LeasedAction(execution_id=r.id, action_id=r.action_id, type=r.action_type,
                                                      params=r.params, timeout_seconds=r.timeout_seconds))
        return [wm.LeasedPlan(plan_id=i, site_id=agent.site_id, lease_expires_at=until, actions=acts)
                for i, acts in by_plan.items() if acts]

    async def next_plans(self, ident: AgentIdentity) -> wm.PlansNextResponse:
        changes: list[Change] = []

        def tx(conn: Connection) -> list[wm.LeasedPlan]:
            now = self.clock.now()
            changes.clear()  # a retried transaction starts over
            return self._lease(conn, load_agent(conn, ident, now), now, changes)

        plans = await self.db.run(tx)
        publish_all(self.feed, changes)
        return wm.PlansNextResponse(plans=plans)
