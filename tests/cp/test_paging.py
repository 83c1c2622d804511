"""Issue 13, paging: keyset cursors on every list route, over real TLS against SQLite and PostgreSQL.

The cursor codec is checked on its own first (pure), then through the API: every response below is also
validated against openapi.yaml by the checked client (``tests/cp/openapi_check.py``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from nkudo.cp import models, paging
from nkudo.cp.client import ApiCallError, Client
from nkudo.cp.config import Settings
from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.domain import PrincipalKind
from nkudo.cp.metrics import Metrics
from nkudo.cp.paging import MAX_LIMIT, PageKind
from nkudo.cp.ports import SystemClock
from nkudo.cp.records import Principal, RequestInfo
from nkudo.cp.usecases.executions import Executions
from nkudo.cp.usecases.inventory import Inventory
from nkudo.cp.usecases.plans import Plans
from nkudo.cp.usecases.tenancy import Tenancy
from nkudo.errors import NkudoError

from .helpers import REPO, Agent, Server, Tenant, create_action, new_tenant

_NOW = dt.datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
_KEYS: dict[PageKind, tuple[Any, ...]] = {
    PageKind.VMS: ("vm-0001",), PageKind.AGENTS: (_NOW, str(uuid.uuid4())), PageKind.HOSTS: ("h.example", "x"),
    PageKind.PLANS: (_NOW, str(uuid.uuid4())), PageKind.EXECUTIONS: (_NOW, str(uuid.uuid4()), 3),
    PageKind.AUDIT: (42,), PageKind.ADMIN_AUDIT: (7,),
}


# --- the codec (pure) ----------------------------------------------------------------------------


def _refused(kind: PageKind, cursor: str) -> NkudoError:
    with pytest.raises(NkudoError) as ei:
        paging.decode(kind, cursor)
    assert (ei.value.code, ei.value.field) == ("INVALID_CURSOR", "cursor")
    return ei.value


def test_cursor_round_trips_every_kind() -> None:
    assert set(_KEYS) == set(PageKind)
    for kind, key in _KEYS.items():
        c = paging.encode(kind, key)
        assert c.isascii() and all(ch.isalnum() or ch in "-_" for ch in c), c  # url-safe as it is
        assert paging.decode(kind, c) == key


def test_cursor_of_another_list_is_refused() -> None:
    for kind, key in _KEYS.items():
        c = paging.encode(kind, key)
        for other in PageKind:
            if other != kind:
                assert "not a cursor of this" in _refused(other, c).message


@pytest.mark.parametrize("mangle", [
    lambda c: c[:-1], lambda c: c[:10], lambda c: c + "A", lambda c: c[:5] + ("B" if c[5] != "B" else "C") + c[6:],
    lambda c: "", lambda c: "not a cursor!", lambda c: "A" * 2000, lambda c: c + "\n", lambda c: "12345",
])
def test_altered_truncated_or_garbage_cursor_is_refused(mangle: Any) -> None:
    _refused(PageKind.PLANS, mangle(paging.encode(PageKind.PLANS, _KEYS[PageKind.PLANS])))


def test_edited_key_or_tag_is_refused() -> None:
    """A cursor whose key was edited into another valid key, or whose check bytes were, is refused."""
    raw = base64.urlsafe_b64decode(paging.encode(PageKind.VMS, ("vm-00002",)) + "==")
    body, tag = raw[:-8], raw[-8:]
    edited = body.replace(b"vm-00002", b"vm-00003")
    for forged in (edited + tag, body + bytes([tag[0] ^ 1]) + tag[1:]):
        assert "altered" in _refused(PageKind.VMS, base64.urlsafe_b64encode(forged).rstrip(b"=").decode()).message


def test_well_formed_payload_of_wrong_shape_is_refused() -> None:
    """A payload that passes the checksum but holds other types is still a 400, never a 500 in a query."""
    for parts in (["vms"], ["vms", 1], ["vms", "a", "b"], ["agents", "yesterday", "x"], ["agents", "2026-01-01", "x"],
                  ["audit", "1"], ["audit", True], ["executions", "2026-01-01T00:00:00Z", "p", "3"], {"k": 1}):
        body = json.dumps(parts).encode()
        forged = base64.urlsafe_b64encode(body + paging._tag(body)).rstrip(b"=").decode()
        kind = PageKind(parts[0]) if isinstance(parts, list) else PageKind.VMS
        _refused(kind, forged)


def test_limit_bounds_and_last_page() -> None:
    for bad in (0, -1, MAX_LIMIT + 1, True):
        with pytest.raises(NkudoError) as ei:
            paging.check_limit(bad)
        assert ei.value.field == "limit"
    assert paging.check_limit(MAX_LIMIT) == MAX_LIMIT
    rows = list(range(5))
    assert paging.cut(PageKind.AUDIT, rows, 5, lambda r: (r,)) == (rows, None)
    page, nxt = paging.cut(PageKind.AUDIT, rows, 4, lambda r: (r,))
    assert page == rows[:4] and nxt is not None and paging.decode(PageKind.AUDIT, nxt) == (3,)
    assert paging.log_seq("17") == 17
    for bad_seq in ("-1", "1e3", "", "٣", "9" * 20):
        with pytest.raises(NkudoError):
            paging.log_seq(bad_seq)


def test_use_cases_check_limit_and_cursor_whoever_calls(tmp_path: Path) -> None:
    """The dashboard and the CLI call the use cases too: the limit and cursor checks are theirs, not only HTTP's."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        admin = Principal(PrincipalKind.ADMIN)
        clock = SystemClock()
        inv, plans, execs = Inventory(db), Plans(Settings(data_dir=tmp_path), db, clock), Executions(db, Metrics(), clock)

        async def scenario() -> None:
            tenancy = Tenancy(db, clock)
            tid = (await tenancy.create_tenant(admin, models.TenantCreate(slug="pg", name="P"), RequestInfo())).id
            sid = (await tenancy.create_site(admin, tid, models.SiteCreate(name="s"), RequestInfo())).id
            calls = [lambda **kw: inv.list_vms(admin, sid, **kw), lambda **kw: inv.list_hosts(admin, sid, **kw),
                     lambda **kw: inv.list_agents(admin, sid, **kw), lambda **kw: plans.list_plans(admin, sid, **kw),
                     lambda **kw: execs.list_executions(admin, sid, None, **kw)]
            for call in calls:
                assert (await call()).next is None
                for bad in (0, MAX_LIMIT + 1):
                    with pytest.raises(NkudoError) as ei:
                        await call(limit=bad)
                    assert ei.value.field == "limit"
                with pytest.raises(NkudoError) as ei:
                    await call(cursor=paging.encode(PageKind.AUDIT, (1,)))
                assert (ei.value.code, ei.value.field) == ("INVALID_CURSOR", "cursor")

        asyncio.run(scenario())
    finally:
        db.close()


# --- through the API ---------------------------------------------------------------------------


def _vms(n: int, start: int = 0, step: int = 2) -> list[dict[str, Any]]:
    return [{"vm_id": f"vm-{i:05d}", "state": "RUNNING", "vcpus": 1, "memory_mib": 64}
            for i in range(start, start + n * step, step)]


def _all_pages(c: Client, path: str, rows_key: str, limit: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Follow ``next`` from the first page to the end; returns every row and each page's size."""
    sep = "&" if "?" in path else "?"
    rows: list[dict[str, Any]] = []
    sizes: list[int] = []
    cursor = None
    while True:
        out = c.call("GET", f"{path}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
        rows += out[rows_key]
        sizes.append(len(out[rows_key]))
        cursor = out.get("next")
        if cursor is None:
            return rows, sizes
        assert len(sizes) < 1000


def _error(c: Client, path: str) -> ApiCallError:
    with pytest.raises(ApiCallError) as ei:
        c.call("GET", path)
    return ei.value


@pytest.fixture
def site_with_vms(server: Server, tenant: Tenant, agent_dir: Path) -> tuple[Tenant, Agent]:
    agent = Agent(server, agent_dir).enroll(tenant.token())
    agent.heartbeat(vms=_vms(250))  # vm-00000, vm-00002, ... vm-00498
    return tenant, agent


def test_250_vms_in_three_pages_of_100(site_with_vms: tuple[Tenant, Agent]) -> None:
    tenant, agent = site_with_vms
    c, path = tenant.client, f"/sites/{tenant.site_id}/vms"
    rows, sizes = _all_pages(c, path, "vms", 100)
    ids = [r["vm_id"] for r in rows]
    assert sizes == [100, 100, 50]
    assert len(set(ids)) == len(ids) == 250 and set(ids) == {v["vm_id"] for v in _vms(250)}
    assert ids == sorted(ids)  # vm_id order: immutable, so a cursor can never be overtaken by an update
    assert "next" not in c.call("GET", f"{path}?limit=250")  # a full last page has no next either
    first = c.call("GET", path)  # the default limit is 100
    assert len(first["vms"]) == 100 and first["next"]
    # Filter by state: only the VMs in it, paged the same way.
    agent.heartbeat(vms=[{"vm_id": f"vm-{i:05d}", "state": "STOPPED"} for i in range(0, 60, 2)])
    stopped, sizes = _all_pages(c, f"{path}?state=STOPPED", "vms", 7)
    assert [r["vm_id"] for r in stopped] == [f"vm-{i:05d}" for i in range(0, 60, 2)]
    assert sizes == [7, 7, 7, 7, 2] and {r["state"] for r in stopped} == {"STOPPED"}
    assert _error(c, f"{path}?state=RUNNING,STOPPED").field == "state"
    agent.close()


def test_small_list_body_is_unchanged(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Below the default limit the body is what it always was: no ``next`` key at all."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    agent.heartbeat(vms=_vms(3))
    for route, key in (("vms", "vms"), ("hosts", "hosts"), ("agents", "agents"), ("executions", "executions"),
                       ("plans", "plans")):
        out = tenant.client.call("GET", f"/sites/{tenant.site_id}/{route}")
        assert list(out) == [key], (route, out)
    assert [v["vm_id"] for v in tenant.client.call("GET", f"/sites/{tenant.site_id}/vms")["vms"]] == \
        ["vm-00000", "vm-00002", "vm-00004"]
    agent.close()


def test_paging_is_stable_under_concurrent_inserts(site_with_vms: tuple[Tenant, Agent]) -> None:
    """Rows inserted or updated while a client pages never make it see an existing row twice or miss one.

    Between every two pages another client inserts VMs with ids between the existing ones (before and after
    the reader's position), changes the state (and so ``updated_at``) of existing VMs on both sides, and
    submits newer plans, which sort in front of a newest-first listing.
    """
    tenant, agent = site_with_vms
    c = tenant.client
    plans_before = [tenant.plan([create_action(f"p{i}")])["plan_id"] for i in range(12)]
    other = tenant.server.client(api_key=tenant.api_key)
    writer = Tenant(tenant.server, tenant.tenant_id, tenant.api_key, tenant.site_id, other)
    rounds = iter(range(1, 10_000, 2))

    def write() -> None:
        i = next(rounds)
        flip = [{"vm_id": f"vm-{(i * 37) % 500 // 2 * 2:05d}", "state": "PAUSED" if i % 4 == 1 else "RUNNING"},
                {"vm_id": f"vm-{(i * 91) % 500 // 2 * 2:05d}", "state": "STOPPED"}]
        agent.heartbeat(vms=_vms(2, start=(i * 53) % 498 | 1) + flip)  # odd ids: new rows between old ones
        writer.plan([create_action(f"new{i}")])

    seen_vms = _pages_while(c, f"/sites/{tenant.site_id}/vms", "vms", 9, write)
    seen_plans = _pages_while(c, f"/sites/{tenant.site_id}/plans", "plans", 2, write)
    vm_ids = [v["vm_id"] for v in seen_vms]
    assert len(vm_ids) == len(set(vm_ids)) and vm_ids == sorted(vm_ids)
    assert {v["vm_id"] for v in _vms(250)} <= set(vm_ids)
    assert len(vm_ids) > 250  # some inserts landed after the reader's position and were seen
    plan_ids = [p["plan_id"] for p in seen_plans]
    assert len(plan_ids) == len(set(plan_ids)) and set(plans_before) <= set(plan_ids)
    assert [p["created_at"] for p in seen_plans] == sorted((p["created_at"] for p in seen_plans), reverse=True)
    other.close()
    agent.close()


def _pages_while(c: Client, path: str, rows_key: str, limit: int, write: Any) -> list[dict[str, Any]]:
    """Like ``_all_pages``, with ``write()`` run between every two pages."""
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        out = c.call("GET", f"{path}?limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
        rows += out[rows_key]
        if (cursor := out.get("next")) is None:
            return rows
        write()


def test_every_list_route_pages_and_filters(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    c, sid = tenant.client, tenant.site_id
    agents = [Agent(server, agent_dir, hostname=f"h{i}").enroll(tenant.token()) for i in range(5)]
    # Hosts by hostname, agents newest enrolment first.
    hosts, sizes = _all_pages(c, f"/sites/{sid}/hosts", "hosts", 2)
    assert [h["hostname"] for h in hosts] == ["h0", "h1", "h2", "h3", "h4"] and sizes == [2, 2, 1]
    seen, _ = _all_pages(c, f"/sites/{sid}/agents", "agents", 2)
    assert [a["id"] for a in seen] == [a.id for a in reversed(agents)]
    online, _ = _all_pages(c, f"/sites/{sid}/agents?state=ONLINE", "agents", 1)
    assert {a["state"] for a in online} <= {"ONLINE"}
    assert _all_pages(c, f"/sites/{sid}/agents?state=UNENROLLED", "agents", 3)[0] == []
    # Plans newest first, filtered by status; executions newest plan first, in plan order.
    plans = [tenant.plan([create_action(f"a{i}"), create_action(f"b{i}")]) for i in range(3)]
    c.call("POST", f"/plans/{plans[0]['plan_id']}/cancel")
    listed, _ = _all_pages(c, f"/sites/{sid}/plans", "plans", 2)
    assert [p["plan_id"] for p in listed] == [p["plan_id"] for p in reversed(plans)]
    assert {p["actions"] for p in listed} == {2}
    cancelled, _ = _all_pages(c, f"/sites/{sid}/plans?status=CANCELLED", "plans", 2)
    assert [p["plan_id"] for p in cancelled] == [plans[0]["plan_id"]]
    execs, sizes = _all_pages(c, f"/sites/{sid}/executions", "executions", 4)
    assert [e["id"] for e in execs] == [e["id"] for p in reversed(plans) for e in p["executions"]]
    assert sizes == [4, 2]
    one, _ = _all_pages(c, f"/sites/{sid}/executions?plan_id={plans[1]['plan_id']}", "executions", 1)
    assert [e["id"] for e in one] == [e["id"] for e in plans[1]["executions"]]
    vm, _ = _all_pages(c, f"/sites/{sid}/executions?vm_id=b2&state=PENDING", "executions", 1)
    assert [e["vm_id"] for e in vm] == ["b2"]
    assert _error(c, f"/sites/{sid}/executions?vm_id=no%20such").field == "vm_id"
    assert _error(c, f"/sites/{sid}/executions?plan_id=x").field == "plan_id"
    assert _error(c, f"/sites/{sid}/plans?status=DONE").field == "status"
    # Audit: the tenant's events newest first, by cursor (the admin listing too).
    events, _ = _all_pages(c, f"/tenants/{tenant.tenant_id}/audit-events", "events", 3)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True) and len(ids) >= 5
    admin = server.client(admin=True)
    first = admin.call("GET", "/admin/audit/events?limit=2")
    second = admin.call("GET", f"/admin/audit/events?limit=2&cursor={first['next']}")
    assert second["events"][0]["id"] < first["events"][-1]["id"]
    assert second["events"][0]["id"] == admin.call(
        "GET", f"/admin/audit/events?limit=2&before_id={first['next_before_id']}")["events"][0]["id"]
    # A tenant audit cursor is not an admin one, and the reverse.
    assert _error(admin, f"/admin/audit/events?cursor={_first_next(c, tenant)}").code == "INVALID_CURSOR"
    assert _error(c, f"/tenants/{tenant.tenant_id}/audit-events?cursor={first['next']}").code == "INVALID_CURSOR"
    admin.close()
    for a in agents:
        a.close()


def _first_next(c: Client, tenant: Tenant) -> str:
    return str(c.call("GET", f"/tenants/{tenant.tenant_id}/audit-events?limit=1")["next"])


def test_execution_logs_next_is_a_cursor(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    agent = Agent(server, agent_dir).enroll(tenant.token())
    plan = tenant.plan([create_action("vm-log")])
    [leased] = agent.heartbeat()["pending_plans"]
    assert leased["plan_id"] == plan["plan_id"]
    eid = plan["executions"][0]["id"]
    st, out = agent.post("/v1/logs", {"execution_id": eid, "lines": [{"seq": i, "message": f"l{i}"} for i in range(7)]})
    assert st == 202, out
    lines, sizes = _all_pages(tenant.client, f"/executions/{eid}/logs", "logs", 3)
    assert [ln["seq"] for ln in lines] == list(range(7)) and sizes == [3, 3, 1]
    assert _error(tenant.client, f"/executions/{eid}/logs?cursor=abc").code == "INVALID_CURSOR"
    agent.close()


def test_cursors_cannot_cross_lists_or_tenants(site_with_vms: tuple[Tenant, Agent], agent_dir: Path) -> None:
    a, agent_a = site_with_vms
    server = a.server
    b = new_tenant(server)
    agent_b = Agent(server, agent_dir).enroll(b.token())
    agent_b.heartbeat(vms=_vms(5, start=1))  # vm-00001 ... vm-00009: ids that A's site does not have
    cursor_a = a.client.call("GET", f"/sites/{a.site_id}/vms?limit=2")["next"]
    # B replaying A's cursor on its own site sees its own VMs after that position, never A's.
    seen = b.client.call("GET", f"/sites/{b.site_id}/vms?cursor={cursor_a}")["vms"]
    assert [v["vm_id"] for v in seen] == ["vm-00003", "vm-00005", "vm-00007", "vm-00009"]
    assert {v["site_id"] for v in seen} == {b.site_id}
    # ... and on A's site, with its own or A's cursor, it is the same 404 as without one.
    assert _error(b.client, f"/sites/{a.site_id}/vms?cursor={cursor_a}").status == 404
    assert _error(b.client, f"/sites/{a.site_id}/plans").status == 404  # the new route: same visibility
    # Another list's cursor, an altered one, a truncated one: 400 INVALID_CURSOR naming the field.
    hosts_cursor = paging.encode(PageKind.HOSTS, ("h", "x"))
    for bad in (hosts_cursor, cursor_a[:-2], cursor_a[:8] + ("x" if cursor_a[8] != "x" else "y") + cursor_a[9:],
                "%00", "a" * 5000):
        err = _error(a.client, f"/sites/{a.site_id}/vms?cursor={bad}")
        assert (err.status, err.code, err.field) == (400, "INVALID_CURSOR", "cursor"), bad
    for route in ("hosts", "agents", "plans", "executions"):
        err = _error(a.client, f"/sites/{a.site_id}/{route}?cursor={cursor_a}")
        assert (err.status, err.code, err.field) == (400, "INVALID_CURSOR", "cursor"), route
    err = _error(a.client, f"/tenants/{a.tenant_id}/audit-events?cursor={cursor_a}")
    assert (err.status, err.code, err.field) == (400, "INVALID_CURSOR", "cursor")
    for bad_limit in ("0", "1001", "-5", "x"):
        err = _error(a.client, f"/sites/{a.site_id}/vms?limit={bad_limit}")
        assert (err.status, err.field) == (400, "limit")
        assert _error(a.client, f"/tenants/{a.tenant_id}/audit-events?limit={bad_limit}").field == "limit"
    assert len(a.client.call("GET", f"/sites/{a.site_id}/vms?limit=1000")["vms"]) == 250
    agent_a.close()
    agent_b.close()


def _cli(server: Server, tenant: Tenant, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NKUDO_CP_SERVER": server.url, "NKUDO_CP_CA_FILE": str(server.ca_file),
           "NKUDO_CP_API_KEY": tenant.api_key}
    return subprocess.run([sys.executable, "-m", "nkudo.cp.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_cli_lists_page_and_follow_next(site_with_vms: tuple[Tenant, Agent]) -> None:
    tenant, agent = site_with_vms
    server = tenant.server
    out = _cli(server, tenant, "vm", "list", "--site", tenant.site_id, "--limit", "100", "--all", "--json")
    assert out.returncode == 0, out.stderr
    vms = json.loads(out.stdout)["vms"]
    assert [v["vm_id"] for v in vms] == [v["vm_id"] for v in _vms(250)]
    page = _cli(server, tenant, "vm", "list", "--site", tenant.site_id, "--limit", "100")
    assert page.returncode == 0, page.stderr
    lines = page.stdout.splitlines()
    assert lines[0].split()[:2] == ["VM_ID", "NAME"] and len(lines) == 1 + 100 + 1
    hint = lines[-1]
    assert hint.startswith("more: --cursor "), hint
    nxt = _cli(server, tenant, "vm", "list", "--site", tenant.site_id, "--limit", "100", "--json",
               "--cursor", hint.split()[2])
    assert json.loads(nxt.stdout)["vms"][0]["vm_id"] == "vm-00200"
    last = _cli(server, tenant, "vm", "list", "--site", tenant.site_id, "--state", "RUNNING", "--all")
    assert last.returncode == 0 and len(last.stdout.splitlines()) == 251 and "more:" not in last.stdout
    for cmd in (["host", "list"], ["agent", "list"], ["plan", "list"], ["execution", "list"]):
        res = _cli(server, tenant, *cmd, "--site", tenant.site_id, "--all", "--json")
        assert res.returncode == 0, (cmd, res.stderr)
    res = _cli(server, tenant, "audit", "list", "--tenant", tenant.tenant_id, "--limit", "2", "--all", "--json")
    assert res.returncode == 0 and len(json.loads(res.stdout)["events"]) >= 3, res.stderr
    bad = _cli(server, tenant, "vm", "list", "--site", tenant.site_id, "--cursor", "garbage-cursor")
    assert bad.returncode == 1 and "cursor" in bad.stderr and "HTTP 400" in bad.stderr
    agent.close()
