"""Connectivity: agents silent for too long go OFFLINE (their work back to the site); state gauges."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import schema as t
from nkudo.cp.config import Settings
from nkudo.cp.domain import ActorType, AgentState, ExecState, PlanStatus
from nkudo.cp.feed import Change, ChangeKind, publish_all
from nkudo.cp.ports import NO_FEED, Clock, Metrics, Publisher, Transactions
from nkudo.cp.records import Actor, AuditEntry
from nkudo.cp.usecases.common import NO_REQUEST, audit, recompute_sites, release_work
from nkudo.log import get_logger

log = get_logger("cp.service")
SWEEPER = Actor(ActorType.SYSTEM, "sweeper")


class ConnectivitySweep:
    def __init__(self, settings: Settings, db: Transactions, metrics: Metrics, clock: Clock,
                 feed: Publisher = NO_FEED) -> None:
        self.s = settings
        self.feed = feed  # issue 13: agents going offline change what the live views show
        self.db = db
        self.metrics = metrics
        self.clock = clock

    def _sweep_tx(self, conn: Connection, changes: list[Change] | None = None) -> int:
        now = self.clock.now()
        changes = [] if changes is None else changes
        changes.clear()  # a retried transaction starts over
        cutoff = now - dt.timedelta(seconds=self.s.offline_after)
        a = t.agents.c
        # Only ONLINE agents can go OFFLINE (an UNENROLLED agent stays UNENROLLED: the original flipped it).
        # RETURNING names exactly the rows this replica changed, so a concurrent sweep or heartbeat cannot
        # make us release, count or audit an agent twice.
        stale = conn.execute(t.agents.update().where(a.state == AgentState.ONLINE, a.last_heartbeat_at < cutoff)
                             .values(state=AgentState.OFFLINE).returning(a.id, a.site_id, a.tenant_id)).all()
        if not stale:
            return 0
        # Give their work back to the site now (the original kept it until lease expiry), so the next
        # heartbeat of another agent of the site gets it.
        release_work(conn, [r.id for r in stale], now)
        recompute_sites(conn, sorted({r.site_id for r in stale}))
        for r in stale:
            audit(conn, NO_REQUEST, AuditEntry(SWEEPER, "agent.offline", r.tenant_id, "agent", r.id), now)
            changes.append(Change(ChangeKind.AGENT, r.tenant_id, r.site_id, r.id))
        changes.extend(Change(ChangeKind.SITE, r.tenant_id, r.site_id, r.site_id) for r in stale)
        return len(stale)

    async def sweep_offline(self) -> int:
        """Mark agents silent for longer than ``offline_after`` OFFLINE (and their sites); idempotent per replica.

        The caller flushes buffered heartbeats first, so a quiet but live agent is never swept.
        """
        changes: list[Change] = []
        n = await self.db.run(self._sweep_tx, changes)
        publish_all(self.feed, changes)
        if n:
            self.metrics.swept.inc(n)
            log.info("agents marked offline", count=n)
        return n

    async def refresh_gauges(self) -> None:
        def tx(conn: Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for name, col in (("agents", t.agents.c.state), ("plans", t.plans.c.status),
                              ("executions", t.executions.c.state)):
                out[name] = {r[0]: r[1] for r in conn.execute(sa.select(col, sa.func.count()).group_by(col))}
            return out

        counts = await self.db.run(tx)
        for st in AgentState:
            self.metrics.agents.labels(st.value).set(counts["agents"].get(st.value, 0))
        for ps in PlanStatus:
            self.metrics.plans.labels(ps.value).set(counts["plans"].get(ps.value, 0))
        for es in ExecState:
            self.metrics.executions.labels(es.value).set(counts["executions"].get(es.value, 0))
