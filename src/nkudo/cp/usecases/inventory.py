"""Inventory views of a site: its hosts, VMs and agents as the agents last reported them."""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp import vmcounters
from nkudo.cp.ports import Transactions
from nkudo.cp.records import Principal, iso, stamp
from nkudo.cp.usecases.common import site_scope
from nkudo.vmstate import VmStatus

#: A host with no agent enrolled on it.
NO_AGENT: Final = "NONE"


class Inventory:
    def __init__(self, db: Transactions) -> None:
        self.db = db

    async def list_hosts(self, p: Principal, site_id: str) -> v.HostList:
        def tx(conn: Connection) -> v.HostList:
            site_scope(conn, p, site_id)
            h, a = t.hosts.c, t.agents.c
            rows = conn.execute(
                sa.select(t.hosts, a.state.label("agent_state"), a.last_heartbeat_at)
                .outerjoin(t.agents, a.id == h.current_agent_id)
                .where(h.site_id == site_id).order_by(h.hostname)
            )
            return v.HostList(hosts=[v.HostView(
                id=r.id, tenant_id=r.tenant_id, site_id=r.site_id, hostname=r.hostname, facts=r.facts,
                fingerprint=r.fingerprint, agent_id=r.current_agent_id, agent_state=r.agent_state or NO_AGENT,
                agent_last_heartbeat_at=iso(r.last_heartbeat_at), last_facts_at=iso(r.last_facts_at),
                created_at=stamp(r.created_at),
            ) for r in rows])

        return await self.db.run(tx)

    async def list_vms(self, p: Principal, site_id: str) -> v.VmList:
        def tx(conn: Connection) -> v.VmList:
            site_scope(conn, p, site_id)
            vm = t.vms.c
            rows = conn.execute(sa.select(t.vms).where(vm.site_id == site_id, vm.state != VmStatus.DELETED.value)
                                .order_by(vm.updated_at.desc(), vm.vm_id))
            return v.VmList(vms=[v.VmView(
                vm_id=r.vm_id, tenant_id=r.tenant_id, site_id=r.site_id, host_id=r.host_id, name=r.name,
                state=r.state, vcpus=r.vcpus, memory_mib=r.memory_mib, updated_at=stamp(r.updated_at),
                last_transition_at=iso(r.last_transition_at),
                counters=vmcounters.view(r.counters, r.counters_prev),  # issue 15
            ) for r in rows])

        return await self.db.run(tx)

    async def list_agents(self, p: Principal, site_id: str) -> v.AgentList:
        def tx(conn: Connection) -> v.AgentList:
            site_scope(conn, p, site_id)
            a, h = t.agents.c, t.hosts.c
            rows = conn.execute(sa.select(t.agents, h.hostname).join(t.hosts, h.id == a.host_id)
                                .where(a.site_id == site_id).order_by(a.enrolled_at.desc(), a.id))
            return v.AgentList(agents=[v.AgentStatusView(
                id=r.id, site_id=r.site_id, host_id=r.host_id, hostname=r.hostname, state=r.state,
                agent_version=r.agent_version, enrolled_at=stamp(r.enrolled_at),
                last_heartbeat_at=iso(r.last_heartbeat_at), cert_expires_at=iso(r.cert_expires_at),
            ) for r in rows])

        return await self.db.run(tx)
