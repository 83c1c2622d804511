"""Inventory views of a site: its hosts, VMs and agents as the agents last reported them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import domain, vmcounters
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.domain import AgentState
from nkudo.cp.paging import DEFAULT_LIMIT, PageKind, after, check_limit, cut
from nkudo.cp.ports import Transactions
from nkudo.cp.records import Principal, iso, stamp
from nkudo.cp.usecases.common import ordering, seek, site_scope
from nkudo.vmstate import VmStatus

#: A host with no agent enrolled on it.
NO_AGENT: Final = "NONE"


@dataclass(frozen=True, slots=True)
class HostLabel:
    """A host as a row of another table names it."""

    hostname: str
    facts: domain.FactsSummary | None


class Inventory:
    def __init__(self, db: Transactions) -> None:
        self.db = db

    async def list_hosts(self, p: Principal, site_id: str, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None
                         ) -> v.HostList:
        """A page of the site's hosts by hostname (unique within a site, so the order is a keyset)."""
        check_limit(limit)
        key = after(PageKind.HOSTS, cursor)

        def tx(conn: Connection) -> v.HostList:
            site_scope(conn, p, site_id)
            h, a = t.hosts.c, t.agents.c
            order = [(h.hostname, False), (h.id, False)]
            found = conn.execute(
                sa.select(t.hosts, a.state.label("agent_state"), a.last_heartbeat_at)
                .outerjoin(t.agents, a.id == h.current_agent_id)
                .where(h.site_id == site_id, seek(order, key)).order_by(*ordering(order)).limit(limit + 1)
            ).all()
            rows, nxt = cut(PageKind.HOSTS, found, limit, lambda r: (r.hostname, r.id))
            return v.HostList(next=nxt, hosts=[v.HostView(
                id=r.id, tenant_id=r.tenant_id, site_id=r.site_id, hostname=r.hostname, facts=r.facts,
                fingerprint=r.fingerprint, agent_id=r.current_agent_id, agent_state=r.agent_state or NO_AGENT,
                agent_last_heartbeat_at=iso(r.last_heartbeat_at), last_facts_at=iso(r.last_facts_at),
                created_at=stamp(r.created_at),
            ) for r in rows])

        return await self.db.run(tx)

    async def host_labels(self, p: Principal, site_id: str, ids: Collection[str]) -> dict[str, HostLabel]:
        """The name and facts summary of each of the site's hosts in ``ids`` (unknown or foreign ids are left
        out): what a page of agents and VMs shows of their hosts, in one narrow query (issue 13's site page)."""

        def tx(conn: Connection) -> dict[str, HostLabel]:
            site_scope(conn, p, site_id)
            h = t.hosts.c
            rows = conn.execute(sa.select(h.id, h.hostname, h.facts)
                                .where(h.site_id == site_id, h.id.in_(sorted(ids)))).all()
            return {r.id: HostLabel(r.hostname, domain.facts_summary(r.facts)) for r in rows}

        return await self.db.run(tx) if ids else {}

    async def list_vms(self, p: Principal, site_id: str, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None,
                       state: VmStatus | None = None) -> v.VmList:
        """A page of the site's VMs by ``vm_id`` (issue 13; before, every VM by ``updated_at``, which moves)."""
        check_limit(limit)
        key = after(PageKind.VMS, cursor)

        def tx(conn: Connection) -> v.VmList:
            site_scope(conn, p, site_id)
            vm = t.vms.c
            shown = vm.state == state.value if state is not None else vm.state != VmStatus.DELETED.value
            order = [(vm.vm_id, False)]
            found = conn.execute(sa.select(t.vms).where(vm.site_id == site_id, shown, seek(order, key))
                                 .order_by(*ordering(order)).limit(limit + 1)).all()
            rows, nxt = cut(PageKind.VMS, found, limit, lambda r: (r.vm_id,))
            return v.VmList(next=nxt, vms=[v.VmView(
                vm_id=r.vm_id, tenant_id=r.tenant_id, site_id=r.site_id, host_id=r.host_id, name=r.name,
                state=r.state, vcpus=r.vcpus, memory_mib=r.memory_mib, updated_at=stamp(r.updated_at),
                last_transition_at=iso(r.last_transition_at),
                counters=vmcounters.view(r.counters, r.counters_prev),  # issue 15
            ) for r in rows])

        return await self.db.run(tx)

    async def list_agents(self, p: Principal, site_id: str, *, limit: int = DEFAULT_LIMIT, cursor: str | None = None,
                          state: AgentState | None = None) -> v.AgentList:
        """A page of the site's agents, newest enrolment first (``enrolled_at`` never changes)."""
        check_limit(limit)
        key = after(PageKind.AGENTS, cursor)

        def tx(conn: Connection) -> v.AgentList:
            site_scope(conn, p, site_id)
            a, h = t.agents.c, t.hosts.c
            order = [(a.enrolled_at, True), (a.id, False)]
            # The view's columns only (an agent row also holds digests, token hashes and labels).
            q = (sa.select(a.id, a.site_id, a.host_id, a.state, a.agent_version, a.enrolled_at, a.last_heartbeat_at,
                           a.cert_expires_at, h.hostname)
                 .join(t.hosts, h.id == a.host_id).where(a.site_id == site_id))
            if state is not None:
                q = q.where(a.state == state.value)
            found = conn.execute(q.where(seek(order, key)).order_by(*ordering(order)).limit(limit + 1)).all()
            rows, nxt = cut(PageKind.AGENTS, found, limit, lambda r: (r.enrolled_at, r.id))
            return v.AgentList(next=nxt, agents=[v.AgentStatusView(
                id=r.id, site_id=r.site_id, host_id=r.host_id, hostname=r.hostname, state=r.state,
                agent_version=r.agent_version, enrolled_at=stamp(r.enrolled_at),
                last_heartbeat_at=iso(r.last_heartbeat_at), cert_expires_at=iso(r.cert_expires_at),
            ) for r in rows])

        return await self.db.run(tx)
