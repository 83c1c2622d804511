"""The dashboard's site, VM, plans, plan, execution and audit pages and their live views, against a real control
plane (TLS, UI on) with simulated agents speaking the wire protocol (issue 13, pages 2-5 and 7)."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.cp.helpers import Agent, Tenant, create_action

from .conftest import Browser, Dashboard, EventStream

HOSTILE = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
_POST_FORM = re.compile(r'<form method="post" action="([^"]+)"')
_NEXT = re.compile(r'<a href="([^"]+)" rel="next">')


def post_forms(text: str) -> list[str]:
    return [a for a in _POST_FORM.findall(text) if a != "/ui/logout"]


def enrolled(dash: Dashboard, t: Tenant, tmp: Path, vms: list[dict[str, Any]] | None = None,
             hostname: str | None = None) -> Agent:
    """An agent in the tenant's site that has reported its host facts and ``vms`` once."""
    a = Agent(dash.server, tmp, hostname).enroll(t.token())
    a.heartbeat(heartbeat_seq=1, agent_version="9.9.9", vms=vms or [],
                host_facts={"cpu_cores": 8, "memory_total_bytes": 16 * 2**30, "storage_total_bytes": 500 * 2**30,
                            "kvm_available": True})
    dash.agents.append(a)
    return a


def vm(vm_id: str, state: str = "RUNNING", **over: Any) -> dict[str, Any]:
    return {"vm_id": vm_id, "state": state, "name": vm_id, "vcpus": 2, "memory_mib": 1024, **over}


def signed_in(dash: Dashboard, t: Tenant, role: str = "owner") -> Browser:
    b = dash.browser()
    b.login(dash.user(t, role))
    return b


# --- rendering for each role -------------------------------------------------------------------------------------


def test_every_page_renders_for_an_owner(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    agent = enrolled(dashboard, t, tmp_path, [vm("vm-a"), vm("vm-b", "PAUSED")], hostname="host-one")
    plan = t.plan([create_action("vm-c")])
    eid = plan["executions"][0]["id"]
    b = signed_in(dashboard, t)
    base = f"/ui/t/{t.tenant_id}"
    site = b.get(f"{base}/sites/{t.site_id}")
    assert site.status == 200, site.text[:500]
    assert "host-one" in site.text and "9.9.9" in site.text and "16.0 GiB" in site.text and "vm-a" in site.text
    assert 'sse-connect="' + f"{base}/events/sites/{t.site_id}" in site.text
    r = b.get(f"{base}/sites/{t.site_id}/vms/vm-a")
    assert r.status == 200 and "vm-a" in r.text and "host-one" in r.text
    assert {f"{base}/sites/{t.site_id}/vms/vm-a/actions"} == set(post_forms(r.text))
    r = b.get(f"{base}/plans")
    assert r.status == 200 and plan["plan_id"][:8] in r.text and 'name="body"' in r.text
    r = b.get(f"{base}/plans/{plan['plan_id']}")
    assert r.status == 200 and "vm-c" in r.text and f"{base}/plans/{plan['plan_id']}/cancel" in post_forms(r.text)
    assert f"{base}/events/plans/{plan['plan_id']}" in r.text
    r = b.get(f"{base}/executions/{eid}")
    assert r.status == 200 and "MicroVMCreate" in r.text and f"{base}/events/executions/{eid}?after=-1" in r.text
    r = b.get(f"{base}/audit")
    assert r.status == 200 and "plan.create" in r.text
    agent.close()


def test_viewer_sees_no_action_forms_and_a_forged_post_is_refused(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    enrolled(dashboard, t, tmp_path, [vm("vm-v")])
    plan = t.plan([create_action("vm-w")])
    b = signed_in(dashboard, t, "viewer")
    base = f"/ui/t/{t.tenant_id}"
    for path in (f"{base}/sites/{t.site_id}", f"{base}/sites/{t.site_id}/vms/vm-v", f"{base}/plans",
                 f"{base}/plans/{plan['plan_id']}", f"{base}/audit"):
        r = b.get(path)
        assert r.status == 200, (path, r.status)
        assert post_forms(r.text) == [], (path, post_forms(r.text))
    r = b.get(f"{base}/sites/{t.site_id}/vms/vm-v/confirm?action=delete")
    assert r.status == 200 and post_forms(r.text) == []
    csrf = b.csrf()
    r = b.post(f"{base}/sites/{t.site_id}/vms/vm-v/actions",
               {"action": "stop", "confirmed": "yes", "idempotency_key": "ui-forged-1"}, csrf=csrf)
    assert r.status == 403 and "FORBIDDEN_ROLE" in r.text
    r = b.post(f"{base}/plans/{plan['plan_id']}/cancel", {}, csrf=csrf)
    assert r.status == 403 and "FORBIDDEN_ROLE" in r.text
    r = b.post(f"{base}/plans", {"site_id": t.site_id, "body": json.dumps(
        {"idempotency_key": "ui-forged-2", "actions": [create_action("vm-x")]})}, csrf=csrf)
    assert r.status == 403
    listed = t.client.call("GET", f"/sites/{t.site_id}/plans")["plans"]
    assert [p["plan_id"] for p in listed] == [plan["plan_id"]]  # nothing was submitted
    assert t.client.call("GET", f"/plans/{plan['plan_id']}")["plan_status"] == "PENDING"  # nor cancelled


# --- VM buttons ----------------------------------------------------------------------------------------------------


def test_vm_stop_button_confirms_then_submits_a_plan_the_api_shows(dashboard_any: Dashboard, tmp_path: Path) -> None:
    t = dashboard_any.tenant()
    enrolled(dashboard_any, t, tmp_path, [vm("vm-s")])
    b = signed_in(dashboard_any, t, "operator")
    vm_path = f"/ui/t/{t.tenant_id}/sites/{t.site_id}/vms/vm-s"
    page = b.get(vm_path)
    key = re.search(r'name="idempotency_key" value="([^"]+-stop)"', page.text)
    assert key
    # Without JavaScript a destructive button leads to a confirmation page first: nothing is submitted yet.
    r = b.post(f"{vm_path}/actions", {"action": "stop", "idempotency_key": key.group(1)})
    assert r.status == 303 and r.location == f"{vm_path}/confirm?action=stop"
    assert t.client.call("GET", f"/sites/{t.site_id}/plans")["plans"] == []
    confirm = b.get(r.location)
    assert confirm.status == 200 and 'name="confirmed" value="yes"' in confirm.text
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', confirm.text))
    r = b.post(f"{vm_path}/actions", {k: v for k, v in form.items() if k != "csrf_token"})
    assert r.status == 303 and r.location
    plan_id = r.location.split("/plans/")[1].split("?")[0]
    plan = t.client.call("GET", f"/plans/{plan_id}")
    assert [(x["type"], x["params"]) for x in plan["executions"]] == [("MicroVMStop", {"vm_id": "vm-s"})]
    # The same form again (a double click): the same plan, not a second one.
    r2 = b.post(f"{vm_path}/actions", {k: v for k, v in form.items() if k != "csrf_token"}, csrf=b.csrf(confirm))
    assert r2.location == r.location
    assert len(t.client.call("GET", f"/sites/{t.site_id}/plans")["plans"]) == 1
    # The JavaScript path: htmx asked already; the answer tells it where to go.
    r3 = b.post(f"{vm_path}/actions", {"action": "delete", "idempotency_key": "ui-js-delete"},
                csrf=b.csrf(page), headers={"HX-Request": "true"})
    assert r3.status == 200 and (r3.header("HX-Redirect") or "").startswith(f"/ui/t/{t.tenant_id}/plans/")
    page = b.get(r.location)
    assert page.status == 200 and "MicroVMStop" in page.text


def test_vm_snapshot_name_error_is_shown_next_to_the_field(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    enrolled(dashboard, t, tmp_path, [vm("vm-n")])
    b = signed_in(dashboard, t)
    vm_path = f"/ui/t/{t.tenant_id}/sites/{t.site_id}/vms/vm-n"
    b.get(vm_path)
    r = b.post(f"{vm_path}/actions", {"action": "snapshot", "idempotency_key": "ui-snap-1",
                                      "snapshot_name": "bad name!"})
    assert r.status == 400
    assert 'id="snapshot_name-error"' in r.text and 'value="bad name!"' in r.text
    r = b.post(f"{vm_path}/actions", {"action": "snapshot", "idempotency_key": "ui-snap-2",
                                      "snapshot_name": "nightly-1"}, csrf=b.csrf(b.get(vm_path)))
    assert r.status == 303
    plan = t.client.call("GET", "/plans/" + (r.location or "").split("/plans/")[1].split("?")[0])
    assert plan["executions"][0]["params"] == {"vm_id": "vm-n", "snapshot_name": "nightly-1"}


def test_vm_console_tail_is_requested_then_shown_escaped(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    agent = enrolled(dashboard, t, tmp_path, [vm("vm-k")])
    b = signed_in(dashboard, t, "viewer")
    vm_path = f"/ui/t/{t.tenant_id}/sites/{t.site_id}/vms/vm-k"
    assert "?console=1" in b.get(vm_path).text  # not asked for until the reader wants it
    r = b.get(f"{vm_path}?console=1")
    assert r.status == 200 and "Requested from the host" in r.text
    asked = agent.heartbeat(heartbeat_seq=2, vms=[vm("vm-k")])["console_requests"]
    assert [c["vm_id"] for c in asked] == ["vm-k"]
    agent.heartbeat(heartbeat_seq=3, vms=[vm("vm-k")],
                    consoles=[{"vm_id": "vm-k", "lines": asked[0].get("lines", 100), "text": f"login: {HOSTILE}\n"}])
    r = b.get(f"{vm_path}?console=1")
    assert '<pre id="console">login: ' + ESCAPED in r.text and HOSTILE not in r.text


# --- plans ---------------------------------------------------------------------------------------------------------


def test_plan_editor_errors_name_the_field_and_keep_the_text(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = signed_in(dashboard, t, "operator")
    plans = f"/ui/t/{t.tenant_id}/plans"
    b.get(plans)
    bad = json.dumps({"idempotency_key": "k-1", "actions": [create_action("vm-1", vcpus=0)]})
    r = b.post(plans, {"site_id": t.site_id, "body": bad})
    assert r.status == 400
    assert '<code class="error-field">actions[0].params.vcpus</code>' in r.text
    kept = re.search(r'<textarea id="body"[^>]*>(.*?)</textarea>', r.text, re.S)
    assert kept and html.unescape(kept.group(1)) == bad  # the submitted text is kept in the editor
    r = b.post(plans, {"site_id": t.site_id, "body": '{"idempotency_key": "k-2", "actions": [], "x": 1}'},
               csrf=b.csrf(r))
    assert r.status == 400 and 'class="error-field"' in r.text
    r = b.post(plans, {"site_id": t.site_id, "body": "{not json"}, csrf=b.csrf(r))
    assert r.status == 400 and "malformed JSON" in r.text
    other = dashboard.tenant()
    r = b.post(plans, {"site_id": other.site_id, "body": bad}, csrf=b.csrf(r))
    assert r.status == 400 and 'id="site_id-error"' in r.text
    good = json.dumps({"idempotency_key": "k-3", "actions": [create_action("vm-1")]})
    r = b.post(plans, {"site_id": t.site_id, "body": good}, csrf=b.csrf(r))
    assert r.status == 303 and r.location
    plan_id = r.location.split("/plans/")[1].split("?")[0]
    assert t.client.call("GET", f"/plans/{plan_id}")["idempotency_key"] == "k-3"
    # The API refuses exactly what the editor refused (same decoding, same use case).
    st, _, body = t.client.raw("POST", f"/sites/{t.site_id}/plans", bad.encode())
    assert st == 400 and json.loads(body)["error"]["field"] == "actions[0].params.vcpus"


def test_plans_status_filter_and_next_page_links(dashboard_any: Dashboard, tmp_path: Path) -> None:
    t = dashboard_any.tenant()
    created = [t.plan([create_action(f"vm-{i}")])["plan_id"] for i in range(103)]
    t.client.call("POST", f"/plans/{created[0]}/cancel", {})
    b = signed_in(dashboard_any, t, "viewer")
    r = b.get(f"/ui/t/{t.tenant_id}/plans?site={t.site_id}")
    shown = set(re.findall(r'/plans/([0-9a-f-]{36})"', r.text))
    assert len(shown) == 100
    m = _NEXT.search(r.text)
    assert m
    r2 = b.get(html.unescape(m.group(1)))
    assert r2.status == 200
    rest = set(re.findall(r'/plans/([0-9a-f-]{36})"', r2.text))
    assert len(rest) == 3 and not rest & shown and shown | rest == set(created)
    assert not _NEXT.search(r2.text)
    r = b.get(f"/ui/t/{t.tenant_id}/plans?site={t.site_id}&status=CANCELLED")
    assert set(re.findall(r'/plans/([0-9a-f-]{36})"', r.text)) == {created[0]}
    assert b.get(f"/ui/t/{t.tenant_id}/plans?status=NOPE").status == 400
    assert b.get(f"/ui/t/{t.tenant_id}/plans?site={t.site_id}&cursor=forged-cursor-xyz").status == 400


def test_site_filter_sort_and_paging_links(dashboard_any: Dashboard, tmp_path: Path) -> None:
    t = dashboard_any.tenant()
    vms = [vm(f"vm-{i:03d}", "STOPPED" if i % 10 == 0 else "RUNNING", vcpus=1 + i % 7) for i in range(120)]
    enrolled(dashboard_any, t, tmp_path, vms)
    b = signed_in(dashboard_any, t, "viewer")
    site = f"/ui/t/{t.tenant_id}/sites/{t.site_id}"
    r = b.get(site)
    rows = re.findall(r'/vms/(vm-\d+)">', r.text)
    assert rows == [f"vm-{i:03d}" for i in range(100)]
    m = _NEXT.search(r.text)
    assert m
    r2 = b.get(html.unescape(m.group(1)))
    assert re.findall(r'/vms/(vm-\d+)">', r2.text) == [f"vm-{i:03d}" for i in range(100, 120)]
    r = b.get(f"{site}?state=STOPPED")
    assert re.findall(r'/vms/(vm-\d+)">', r.text) == [f"vm-{i:03d}" for i in range(0, 120, 10)]
    r = b.get(f"{site}?state=STOPPED&sort=vcpus")
    ordered = re.findall(r'/vms/(vm-\d+)">', r.text)
    by_vcpus = sorted(range(0, 120, 10), key=lambda i: (-(1 + i % 7), i))
    assert ordered == [f"vm-{i:03d}" for i in by_vcpus]
    assert 'aria-sort="descending"' in r.text
    assert f'href="{site}?sort=name&amp;state=STOPPED"' in r.text  # sort links keep the filter
    assert b.get(f"{site}?state=BOGUS").status == 400
    assert b.get(f"{site}?sort=BOGUS").status == 400


# --- live views ----------------------------------------------------------------------------------------------------


def read_until(stream: EventStream, name: str, needle: str = "") -> str:
    """The data of the first event called ``name`` (containing ``needle``); fails on the stream's end."""
    while True:
        ev = stream.next_event()
        assert ev is not None, f"stream ended before a {name!r} event"
        if ev.event == name and needle in ev.data:
            return ev.data


def test_plan_stream_emits_after_a_result_and_ends_when_done(dashboard_any: Dashboard, tmp_path: Path) -> None:
    t = dashboard_any.tenant()
    agent = enrolled(dashboard_any, t, tmp_path)
    plan = t.plan([create_action("vm-live")])
    eid = plan["executions"][0]["id"]
    b = signed_in(dashboard_any, t, "viewer")
    stream = b.stream(f"/ui/t/{t.tenant_id}/events/plans/{plan['plan_id']}")
    try:
        assert stream.status == 200 and "text/event-stream" in (stream.header("Content-Type") or "")
        first = read_until(stream, "plan")
        assert "badge-pending" in first
        agent.heartbeat(heartbeat_seq=2)  # leases the plan
        agent.results([{"execution_id": eid, "status": "SUCCEEDED"}])
        data = read_until(stream, "plan", "badge-succeeded")
        assert "vm-live" in data
        assert read_until(stream, "done") == ""
    finally:
        stream.close()
    # Once the plan is done the stream is not reopened (204 tells EventSource to stop).
    assert b.request("GET", f"/ui/t/{t.tenant_id}/events/plans/{plan['plan_id']}").status == 204
    page = b.get(f"/ui/t/{t.tenant_id}/plans/{plan['plan_id']}")
    assert "sse-connect" not in page.text and "badge-succeeded" in page.text


def test_execution_stream_tails_only_new_log_lines(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    agent = enrolled(dashboard, t, tmp_path)
    plan = t.plan([create_action("vm-log")])
    eid = plan["executions"][0]["id"]
    agent.heartbeat(heartbeat_seq=2, execution_updates=[{"execution_id": eid}])
    st, _ = agent.post("/v1/logs", {"execution_id": eid, "lines": [{"seq": 0, "message": "first line"}]})
    assert st in (200, 202)
    b = signed_in(dashboard, t, "viewer")
    page = b.get(f"/ui/t/{t.tenant_id}/executions/{eid}")
    assert "first line" in page.text and f"events/executions/{eid}?after=0" in page.text
    stream = b.stream(f"/ui/t/{t.tenant_id}/events/executions/{eid}?after=0")
    try:
        assert "badge-" in read_until(stream, "exec")
        agent.heartbeat(heartbeat_seq=3, execution_updates=[{"execution_id": eid}])  # keeps the lease (2 s here)
        st, _ = agent.post("/v1/logs", {"execution_id": eid, "lines": [
            {"seq": 1, "message": HOSTILE, "level": "WARN"}, {"seq": 2, "message": "third line"}]})
        assert st in (200, 202)
        data = read_until(stream, "log")
        assert "first line" not in data  # only lines after the last one shown
        assert ESCAPED in data and HOSTILE not in data and 'id="log-2"' in data
        agent.results([{"execution_id": eid, "status": "FAILED", "message": "disk full"}])
        assert "disk full" in read_until(stream, "exec", "badge-failed")
        read_until(stream, "done")
    finally:
        stream.close()


def test_site_stream_rerenders_after_a_heartbeat_changes_a_vm(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    agent = enrolled(dashboard, t, tmp_path, [vm("vm-1")])
    b = signed_in(dashboard, t, "viewer")
    stream = b.stream(f"/ui/t/{t.tenant_id}/events/sites/{t.site_id}?state=CRASHED")
    got: dict[str, str] = {}

    def reader() -> None:
        try:
            got["vms"] = read_until(stream, "site-vms", "vm-1")
        except Exception as exc:  # reported by the assertion below
            got["error"] = repr(exc)

    th = threading.Thread(target=reader, daemon=True)
    try:
        th.start()
        agent.heartbeat(heartbeat_seq=2, vms=[vm("vm-1", "CRASHED")])
        th.join(15)
        assert "vms" in got, got
        assert "badge-crashed" in got["vms"]  # rendered with the page's filter (state=CRASHED)
    finally:
        stream.close()


def test_site_streams_of_two_viewers_share_a_render_that_carries_neither_ones_token(dashboard: Dashboard,
                                                                                    tmp_path: Path) -> None:
    """Two viewers on the same site view get the same fragments from one shared render (web/renders.py: the
    render metric moves by one for the two streams), and what is shared holds nothing of either viewer: neither
    CSRF token appears in it."""
    admin = dashboard.server.client(admin=True)

    def site_renders() -> float:
        st, _, body = admin.raw("GET", "/metrics")
        assert st == 200
        m = re.search(r'^nkudo_cp_ui_live_renders_total\{view="site"\} ([0-9.e+]+)$', body.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    t = dashboard.tenant()
    agent = enrolled(dashboard, t, tmp_path, [vm("vm-1")])
    viewers = [signed_in(dashboard, t, "viewer") for _ in range(2)]
    tokens = []
    for b in viewers:
        b.get(f"/ui/t/{t.tenant_id}/sites/{t.site_id}")
        tokens.append(b.csrf())
    streams = [b.stream(f"/ui/t/{t.tenant_id}/events/sites/{t.site_id}") for b in viewers]
    got: dict[int, dict[str, str]] = {}

    def reader(i: int) -> None:
        try:
            got[i] = {name: read_until(streams[i], name, needle)
                      for name, needle in (("site-status", ""), ("site-agents", ""), ("site-vms", "vm-1"))}
        except Exception as exc:  # reported by the assertion below
            got[i] = {"error": repr(exc)}

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
    try:
        for th in threads:
            th.start()
        time.sleep(0.3)  # both subscribed before the change
        before = site_renders()
        agent.heartbeat(heartbeat_seq=2, vms=[vm("vm-1", "CRASHED")])
        for th in threads:
            th.join(15)
        assert set(got) == {0, 1} and "error" not in got[0] and "error" not in got[1], got
        assert got[0] == got[1]
        assert site_renders() - before == 1  # one render served both streams
        for html in got[0].values():
            assert tokens[0] not in html and tokens[1] not in html
    finally:
        for st in streams:
            st.close()


# --- scoping, escaping, audit ------------------------------------------------------------------------------------


def test_foreign_tenant_ids_are_404_pages(dashboard_any: Dashboard, tmp_path: Path) -> None:
    mine, other = dashboard_any.tenant(), dashboard_any.tenant()
    enrolled(dashboard_any, other, tmp_path, [vm("vm-o")])
    plan = other.plan([create_action("vm-p")])
    eid = plan["executions"][0]["id"]
    b = signed_in(dashboard_any, mine, "owner")
    base = f"/ui/t/{mine.tenant_id}"
    for path in (f"{base}/sites/{other.site_id}", f"{base}/sites/{other.site_id}/vms/vm-o",
                 f"{base}/plans/{plan['plan_id']}", f"{base}/executions/{eid}",
                 f"{base}/plans?site={other.site_id}", f"{base}/events/plans/{plan['plan_id']}",
                 f"{base}/events/sites/{other.site_id}", f"{base}/events/executions/{eid}",
                 f"{base}/sites/not-a-uuid", f"/ui/t/{other.tenant_id}/audit"):
        r = b.get(path)
        assert r.status == 404, (path, r.status)
        assert "text/html" in (r.header("Content-Type") or ""), path
    # An admin sees every tenant, but a page keeps objects under their own tenant's URL.
    admin = dashboard_any.browser()
    admin.login(dashboard_any.admin)
    assert admin.get(f"{base}/plans/{plan['plan_id']}").status == 404
    assert admin.get(f"/ui/t/{other.tenant_id}/plans/{plan['plan_id']}").status == 200


def test_hostile_names_are_escaped(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    hostile_site = t.client.call("POST", f"/tenants/{t.tenant_id}/sites", {"name": HOSTILE})["id"]
    a = Agent(dashboard.server, tmp_path).enroll(t.token())
    dashboard.agents.append(a)
    a.heartbeat(heartbeat_seq=1, agent_version="1.0", vms=[vm("vm-h")],
                host_facts={"cpu_cores": 2, "os": HOSTILE, "kernel": HOSTILE})
    b = signed_in(dashboard, t, "owner")
    for path in (f"/ui/t/{t.tenant_id}/sites/{hostile_site}", f"/ui/t/{t.tenant_id}/plans?site={hostile_site}"):
        r = b.get(path)
        assert r.status == 200 and ESCAPED in r.text and HOSTILE not in r.text, path
    # A filter value is echoed into its input, escaped (an object id may be any printable ASCII).
    r = b.get(f"/ui/t/{t.tenant_id}/audit?object_id=" + quote("<img/src=x/onerror=alert(1)>"))
    assert r.status == 200 and 'value="&lt;img/src=x/onerror=alert(1)&gt;"' in r.text and "<img/" not in r.text


def test_audit_filters_paging_and_verification(dashboard_any: Dashboard) -> None:
    t = dashboard_any.tenant()
    for i in range(3):
        t.plan([create_action(f"vm-{i}")])
    b = signed_in(dashboard_any, t, "owner")
    audit = f"/ui/t/{t.tenant_id}/audit"
    r = b.get(f"{audit}?action=plan.create&actor_type=&object_type=&since=&until=")
    assert r.status == 200 and r.text.count("<code>plan.create</code>") == 3
    assert "site.create" not in r.text
    r = b.get(f"{audit}?action=plan.create&limit=2")
    assert r.text.count("<code>plan.create</code>") == 2
    m = _NEXT.search(r.text)
    assert m and "action=plan.create" in html.unescape(m.group(1))
    assert b.get(html.unescape(m.group(1))).text.count("<code>plan.create</code>") == 1
    r = b.get(f"{audit}?since=yesterday")
    assert r.status == 400 and 'id="since-error"' in r.text and 'value="yesterday"' in r.text
    # Members are told who verifies; an admin can run it and sees the result.
    assert f"{audit}/verify" not in post_forms(r.text)
    r = b.post(f"{audit}/verify", {}, csrf=b.csrf(b.get(audit)))
    assert r.status == 401 and "ADMIN_REQUIRED" in r.text  # the use case's refusal (require_admin)
    admin = dashboard_any.browser()
    admin.login(dashboard_any.admin)
    r = admin.get(audit)
    assert f"{audit}/verify" in post_forms(r.text)
    r = admin.post(f"{audit}/verify", {})
    assert r.status == 200 and "audit chain is intact" in r.text


def test_page_forms_need_the_session_token_not_the_pre_login_one(dashboard: Dashboard, tmp_path: Path) -> None:
    """The middleware lets a pre-session token through (login forms); the page's forms bind to the session."""
    t = dashboard.tenant()
    enrolled(dashboard, t, tmp_path, [vm("vm-c")])
    b = signed_in(dashboard, t)
    guest = dashboard.browser()
    pre = guest.csrf(guest.get("/ui/login"))
    b.cookies["nkudo_prelogin"] = guest.cookies["nkudo_prelogin"]  # now a valid pre-session token of b too
    r = b.post(f"/ui/t/{t.tenant_id}/sites/{t.site_id}/vms/vm-c/actions",
               {"action": "start", "idempotency_key": "ui-pre-1"}, csrf=pre)
    assert r.status == 403 and "CSRF_INVALID" in r.text
    assert t.client.call("GET", f"/sites/{t.site_id}/plans")["plans"] == []


def test_plan_stream_ends_when_the_session_is_signed_out(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    agent = enrolled(dashboard, t, tmp_path)
    plan = t.plan([create_action("vm-out")])
    b = signed_in(dashboard, t, "viewer")
    stream = b.stream(f"/ui/t/{t.tenant_id}/events/plans/{plan['plan_id']}")
    try:
        read_until(stream, "plan")
        token = b.csrf(b.get(f"/ui/t/{t.tenant_id}/plans/{plan['plan_id']}"))
        assert b.post("/ui/logout", {}, csrf=token).status == 303
        agent.heartbeat(heartbeat_seq=2)  # leases the plan: a change the stream would otherwise render
        agent.results([{"execution_id": plan["executions"][0]["id"], "status": "SUCCEEDED"}])
        while (ev := stream.next_event()) is not None:
            assert ev.event != "plan", "a signed-out stream rendered the plan"
    finally:
        stream.close()
