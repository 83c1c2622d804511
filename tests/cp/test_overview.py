"""Issue 13: the dashboard's read models (tenant overview, site status, VM detail, VM state history).

Two levels, both on SQLite and PostgreSQL: the use cases over a real database with a fixed clock (heartbeats
through the real ``Heartbeats`` use case; hosts, agents and plans put in place as rows, since enrolling needs
a CA that is beside the point here), and the JSON routes over real TLS against a control-plane process whose
every response ``openapi_check`` validates against the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from nkudo.cp import models
from nkudo.cp import schema as t
from nkudo.cp.config import Settings
from nkudo.cp.db import Database
from nkudo.cp.domain import AgentState, PlanStatus, PrincipalKind, SiteHealth, VmStateSource
from nkudo.cp.errors import NotFound
from nkudo.cp.metrics import Metrics
from nkudo.cp.records import AgentIdentity, Principal, RequestInfo
from nkudo.cp.usecases.heartbeat import Heartbeats
from nkudo.cp.usecases.overview import HISTORY_KEEP, Overview, VmStateWrite, record_vm_states
from nkudo.cp.usecases.tenancy import Tenancy
from nkudo.vmstate import VmStatus
from nkudo.wire import codec
from nkudo.wire import messages as wm

from .helpers import Agent, ApiCallError, Server, Tenant, create_action, new_tenant

T0 = dt.datetime(2031, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
ADMIN = Principal(PrincipalKind.ADMIN)
INFO = RequestInfo()


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def now(self) -> dt.datetime:
        return self.t


class World:
    """A tenant in a real database, with helpers that write what enrollment and plans would have written."""

    def __init__(self, db: Database, tmp: Path) -> None:
        self.db, self.clock = db, Clock()
        self.tenancy = Tenancy(db, self.clock)
        self.overview = Overview(db, self.clock, dt.timedelta(days=90))  # long-lived: the 7-day horizon applies
        self.hb = Heartbeats(Settings(data_dir=tmp), db, Metrics(), self.clock)

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def tenant(self, slug: str) -> str:
        return str(self.run(self.tenancy.create_tenant(ADMIN, models.TenantCreate(slug=slug, name=slug), INFO)).id)

    def site(self, tenant_id: str, name: str) -> str:
        return str(self.run(self.tenancy.create_site(ADMIN, tenant_id, models.SiteCreate(name=name), INFO)).id)

    def agent(self, tenant_id: str, site_id: str, state: AgentState = AgentState.ONLINE,
              cert_expires_at: dt.datetime | None = None) -> str:
        aid, hid = str(uuid.uuid4()), str(uuid.uuid4())
        with self.db.engine.begin() as conn:
            conn.execute(t.hosts.insert().values(
                id=hid, tenant_id=tenant_id, site_id=site_id, hostname="h-" + aid[:8], fingerprint={},
                current_agent_id=None if state == AgentState.UNENROLLED else aid, created_at=T0))
            conn.execute(t.agents.insert().values(
                id=aid, tenant_id=tenant_id, site_id=site_id, host_id=hid, state=state, cert_serial=aid[:8],
                cert_expires_at=cert_expires_at or T0 + dt.timedelta(days=30), agent_version="1", os="", arch="",
                kernel_version="", heartbeat_seq=0, enrolled_at=T0, last_heartbeat_at=T0))
        return aid

    def heartbeat(self, agent_id: str, seq: int, vms: dict[str, str]) -> None:
        req = wm.HeartbeatRequest(heartbeat_seq=seq, vms=[
            wm.VMSummary(vm_id=k, state=VmStatus(s), vcpus=1, memory_mib=256) for k, s in vms.items()])
        digest = hashlib.sha256(codec.encode(req.vms)).hexdigest()  # as the heartbeat route computes it
        self.run(self.hb.heartbeat(AgentIdentity(agent_id, agent_id[:8]), req, digest, None))

    def plan(self, tenant_id: str, site_id: str, status: PlanStatus, completed_ago: dt.timedelta | None = None) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(t.plans.insert().values(
                id=str(uuid.uuid4()), tenant_id=tenant_id, site_id=site_id, idempotency_key=uuid.uuid4().hex,
                request_digest="0" * 64, status=status, created_at=T0 - dt.timedelta(days=2), updated_at=T0,
                completed_at=None if completed_ago is None else T0 - completed_ago))

    def history(self, site_id: str, vm_id: str) -> list[tuple[str, str | None, str]]:
        """(state, previous, source) newest first, as the VM page shows them."""
        d = self.run(self.overview.vm_detail(ADMIN, site_id, vm_id))
        return [(h.state.value, h.previous_state and h.previous_state.value, h.source.value) for h in d.history]


@pytest.fixture
def world(db: Database, tmp_path: Path) -> World:
    return World(db, tmp_path)


def test_overview_counts_health_plans_and_certificates(world: World) -> None:
    """A degraded site names its reasons; hosts, VMs, plans in flight, recent failures and expiring
    certificates are counted over the tenant's sites, and nothing of another tenant or unenrolled agent."""
    w = world
    tid, other = w.tenant("acme"), w.tenant("other")
    s1, s2, s3 = w.site(tid, "a-main"), w.site(tid, "b-edge"), w.site(tid, "c-empty")
    a1 = w.agent(tid, s1, cert_expires_at=T0 + dt.timedelta(days=3))
    w.agent(tid, s1)
    w.agent(tid, s1, AgentState.OFFLINE, cert_expires_at=T0 - dt.timedelta(hours=1))  # expired: listed first
    w.agent(tid, s1, AgentState.UNENROLLED, cert_expires_at=T0)  # history, not "offline", not expiring
    w.agent(tid, s2, AgentState.OFFLINE)
    w.heartbeat(a1, 1, {"vm-1": "RUNNING", "vm-2": "CRASHED", "vm-3": "RUNNING", "vm-4": "DELETED"})
    fid = w.site(other, "x")
    w.heartbeat(w.agent(other, fid, cert_expires_at=T0), 1, {"vm-9": "UNKNOWN"})
    w.plan(tid, s1, PlanStatus.IN_PROGRESS)
    w.plan(tid, s2, PlanStatus.PENDING)
    w.plan(tid, s2, PlanStatus.FAILED, dt.timedelta(hours=2))
    w.plan(tid, s2, PlanStatus.FAILED, dt.timedelta(hours=25))  # outside the 24 h window
    w.plan(tid, s2, PlanStatus.SUCCEEDED, dt.timedelta(hours=1))
    w.plan(other, fid, PlanStatus.FAILED, dt.timedelta(hours=1))

    o = w.run(w.overview.tenant_overview(ADMIN, tid))
    assert o.at == "2031-02-03T04:05:06Z"
    assert [(s.name, s.health, s.reasons, s.agents_online, s.agents_offline) for s in o.sites] == [
        ("a-main", SiteHealth.DEGRADED, ["1 of 3 agents offline", "1 VM CRASHED"], 2, 1),
        ("b-edge", SiteHealth.OFFLINE, ["all 1 agent offline"], 0, 1),
        ("c-empty", SiteHealth.EMPTY, [], 0, 0)]
    assert [s.site_id for s in o.sites] == [s1, s2, s3]
    assert o.sites[0].vms_by_state == {VmStatus.CRASHED: 1, VmStatus.RUNNING: 2}  # deleted VMs left out
    assert (o.hosts_online, o.hosts_offline) == (2, 2)
    assert o.vms_by_state == {VmStatus.CRASHED: 1, VmStatus.RUNNING: 2}
    assert (o.plans_pending, o.plans_running, o.plans_failed_24h) == (1, 1, 1)
    assert [(c.site_id, c.cert_expires_at) for c in o.expiring_certificates] == [
        (s1, "2031-02-03T03:05:06Z"), (s1, "2031-02-06T04:05:06Z")]
    assert o.expiring_certificates[1].agent_id == a1 and o.expiring_certificates[1].hostname == "h-" + a1[:8]

    status = w.run(w.overview.site_status(ADMIN, s1))
    assert status == o.sites[0]
    # The tenant's own key sees the same; another tenant's key learns nothing (the same 404 as an unknown id).
    key = Principal(PrincipalKind.API_KEY, tenant_id=tid, key_id="k")
    assert w.run(w.overview.tenant_overview(key, tid)) == o
    foreign = Principal(PrincipalKind.API_KEY, tenant_id=other, key_id="k2")
    for call, code in [(w.overview.tenant_overview(foreign, tid), "TENANT_NOT_FOUND"),
                       (w.overview.site_status(foreign, s1), "SITE_NOT_FOUND"),
                       (w.overview.vm_detail(foreign, s1, "vm-1"), "SITE_NOT_FOUND"),
                       (w.overview.vm_detail(key, s1, "vm-404"), "VM_NOT_FOUND"),
                       (w.overview.vm_detail(key, fid, "vm-9"), "SITE_NOT_FOUND")]:
        with pytest.raises(NotFound) as e:
            w.run(call)
        assert e.value.code == code


def test_overview_statements_do_not_grow_with_sites(world: World) -> None:
    """Aggregates, not a loop of queries per site: 3 sites and 12 sites take the same number of statements."""
    w = world
    counts = []
    for n in (3, 12):
        tid = w.tenant(f"t{n}")
        for i in range(n):
            sid = w.site(tid, f"s{i}")
            w.heartbeat(w.agent(tid, sid), 1, {f"vm-{i}": "RUNNING"})
        statements: list[str] = []

        def count(conn: Any, cursor: Any, stmt: str, *args: Any, _s: list[str] = statements) -> None:
            _s.append(stmt)

        sa.event.listen(w.db.engine, "before_cursor_execute", count)
        try:
            o = w.run(w.overview.tenant_overview(ADMIN, tid))
        finally:
            sa.event.remove(w.db.engine, "before_cursor_execute", count)
        assert len(o.sites) == n and all(s.health == SiteHealth.ONLINE for s in o.sites)
        counts.append(len([s for s in statements if s.lstrip().upper().startswith("SELECT")]))
    assert counts[0] == counts[1] <= 8, counts


def test_history_only_on_changes(world: World) -> None:
    """A heartbeat that reports a new state writes history; a quiet one or one that changes only a VM's
    size does not; a VM's first report is history from nothing."""
    w = world
    tid = w.tenant("acme")
    sid = w.site(tid, "s")
    aid = w.agent(tid, sid)
    w.heartbeat(aid, 1, {"vm-a": "RUNNING", "vm-b": "RUNNING"})
    assert w.history(sid, "vm-a") == [("RUNNING", None, "heartbeat")]
    w.clock.t += dt.timedelta(seconds=5)
    w.heartbeat(aid, 2, {"vm-a": "RUNNING", "vm-b": "RUNNING"})  # quiet: nothing new
    w.heartbeat(aid, 3, {"vm-a": "CRASHED", "vm-b": "RUNNING"})
    w.clock.t += dt.timedelta(seconds=5)
    w.heartbeat(aid, 4, {"vm-a": "CRASHED", "vm-b": "RUNNING", "vm-c": "STOPPED"})  # digest moves, vm-a's state not
    assert w.history(sid, "vm-a") == [("CRASHED", "RUNNING", "heartbeat"), ("RUNNING", None, "heartbeat")]
    assert w.history(sid, "vm-b") == [("RUNNING", None, "heartbeat")]
    d = w.run(w.overview.vm_detail(ADMIN, sid, "vm-a"))
    assert d.vm.state == VmStatus.CRASHED and d.hostname == "h-" + aid[:8] and d.actions == []
    assert [h.at for h in d.history] == ["2031-02-03T04:05:11Z", "2031-02-03T04:05:06Z"]
    with w.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.vm_state_history)).scalar() == 4


def test_history_keeps_the_newest_per_vm(world: World) -> None:
    """Each VM keeps its newest HISTORY_KEEP changes; pruning one VM leaves its neighbour's rows alone."""
    w = world
    tid = w.tenant("acme")
    sid = w.site(tid, "s")
    states = [VmStatus.RUNNING.value, VmStatus.STOPPED.value]
    with w.db.engine.begin() as conn:
        record_vm_states(conn, [VmStateWrite(tid, sid, "other", "RUNNING", None, VmStateSource.HEARTBEAT)], T0)
    for i in range(HISTORY_KEEP + 5):
        with w.db.engine.begin() as conn:
            record_vm_states(conn, [VmStateWrite(tid, sid, "vm", states[i % 2], states[(i + 1) % 2],
                                                 VmStateSource.HEARTBEAT)], T0 + dt.timedelta(seconds=i))
    with w.db.engine.connect() as conn:
        h = t.vm_state_history.c
        rows = conn.execute(sa.select(h.vm_id, sa.func.count(), sa.func.min(h.at)).group_by(h.vm_id)
                            .order_by(h.vm_id)).all()
    assert [(r[0], r[1]) for r in rows] == [("other", 1), ("vm", HISTORY_KEEP)]
    assert rows[1][2].replace(tzinfo=dt.UTC) == T0 + dt.timedelta(seconds=5)  # the 5 oldest went


# --- the JSON routes, over TLS ---------------------------------------------------------------------------------


def _wait(pred: Any, timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.2)
    return pred()


def test_status_and_overview_routes(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """An agent online with a crashed VM and one gone silent: the site is DEGRADED with both reasons."""
    live, silent = Agent(server, agent_dir).enroll(tenant.token()), Agent(server, agent_dir).enroll(tenant.token())
    vms = [{"vm_id": "ok-1", "state": "RUNNING"}, {"vm_id": "bad-1", "state": "CRASHED"}]
    silent.heartbeat(heartbeat_seq=1)
    live.heartbeat(heartbeat_seq=1, vms=vms)
    c = tenant.client

    def degraded() -> Any:
        live.heartbeat(heartbeat_seq=2, vms=vms)  # stays online while the other goes offline (after 2 s)
        st = c.call("GET", f"/sites/{tenant.site_id}/status")
        return st if st["agents_offline"] == 1 else None

    status = _wait(degraded)
    assert status == {"site_id": tenant.site_id, "tenant_id": tenant.tenant_id, "name": status["name"],
                      "connectivity_state": "ONLINE", "health": "DEGRADED",
                      "reasons": ["1 of 2 agents offline", "1 VM CRASHED"], "agents_online": 1, "agents_offline": 1,
                      "vms_by_state": {"CRASHED": 1, "RUNNING": 1}}
    o = c.call("GET", f"/tenants/{tenant.tenant_id}/overview")
    assert o["sites"] == [status] and (o["hosts_online"], o["hosts_offline"]) == (1, 1)
    assert o["vms_by_state"] == {"CRASHED": 1, "RUNNING": 1}
    # Agent certificates live 24 h by default and were just issued: both are within 7 days of expiry but not
    # past their renewal point, so neither is listed (a plain 7-day list would name every healthy agent).
    assert o["expiring_certificates"] == []
    assert server.client(admin=True).call("GET", f"/tenants/{tenant.tenant_id}/overview")["sites"] == [status]

    stranger = new_tenant(server)
    for path, code in [(f"/tenants/{tenant.tenant_id}/overview", "TENANT_NOT_FOUND"),
                       (f"/sites/{tenant.site_id}/status", "SITE_NOT_FOUND"),
                       (f"/sites/{tenant.site_id}/vms/ok-1", "SITE_NOT_FOUND")]:
        with pytest.raises(ApiCallError) as e:
            stranger.client.call("GET", path)
        assert (e.value.status, e.value.code) == (404, code), path
    live.close()
    silent.close()


def test_vm_detail_route(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """A VM created by a plan, then stopped behind the control plane's back: both changes in its history,
    the create action listed; a quiet heartbeat adds nothing."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    vm = "vm-" + uuid.uuid4().hex[:6]
    plan = tenant.plan([create_action(vm)])
    [leased] = agent.heartbeat(heartbeat_seq=1)["pending_plans"]
    [ex] = leased["actions"]
    agent.results([{"execution_id": ex["execution_id"], "status": "SUCCEEDED"}])
    agent.heartbeat(heartbeat_seq=2, vms=[{"vm_id": vm, "state": "RUNNING"}])  # agrees: no history
    agent.heartbeat(heartbeat_seq=3, vms=[{"vm_id": vm, "state": "STOPPED"}])
    agent.heartbeat(heartbeat_seq=4, vms=[{"vm_id": vm, "state": "STOPPED"}])  # quiet
    stop = tenant.plan([{"type": "MicroVMStop", "params": {"vm_id": vm}}])  # already STOPPED: no change to record
    [leased] = agent.heartbeat(heartbeat_seq=5, vms=[{"vm_id": vm, "state": "STOPPED"}])["pending_plans"]
    [stop_ex] = leased["actions"]
    agent.results([{"execution_id": stop_ex["execution_id"], "status": "SUCCEEDED"}])
    d = tenant.client.call("GET", f"/sites/{tenant.site_id}/vms/{vm}")
    assert d["vm"]["vm_id"] == vm and d["vm"]["state"] == "STOPPED" and d["hostname"] == agent.hostname
    assert [(h["state"], h["previous_state"], h["source"], h["execution_id"]) for h in d["history"]] == [
        ("STOPPED", "RUNNING", "heartbeat", None), ("RUNNING", None, "execution", ex["execution_id"])]
    assert [(a["execution_id"], a["plan_id"], a["type"], a["state"]) for a in d["actions"]] == [
        (stop_ex["execution_id"], stop["plan_id"], "MicroVMStop", "SUCCEEDED"),
        (ex["execution_id"], plan["plan_id"], "MicroVMCreate", "SUCCEEDED")]
    for path in (f"/sites/{tenant.site_id}/vms/nope", f"/sites/{tenant.site_id}/vms/..%2Fx"):
        with pytest.raises(ApiCallError) as e:
            tenant.client.call("GET", path)
        assert (e.value.status, e.value.code) == (404, "VM_NOT_FOUND"), path
    agent.close()
