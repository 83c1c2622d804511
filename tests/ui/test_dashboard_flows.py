"""The operator's main flows in a real Chromium against a real control plane and real agents (issue 13).

The agents are ``nkudo-edge`` processes with the simulator standing in for Cloud Hypervisor (as in tests/e2e).
Every tab is watched (conftest.py): these flows also prove that no page of theirs logs a console error, breaks
the Content-Security-Policy, fails a request of ours or opens a dialog nobody asked for.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.cp.helpers import Server, Tenant, create_action
from tests.e2e.conftest import EDGE, EdgeHost, wait_for
from tests.ui.conftest import (
    Browsers,
    Tab,
    User,
    edge_host,
    make_tenant,
    online_agent,
    plan_done,
    slug,
    start_agent,
    vm_create,
)

LIVE = 20_000  # ms: a live update must arrive well within this (heartbeats every 0.5 s, offline after 3 s)


def signed_in(ui: Browsers, user: User, path: str, *, strict: bool = True) -> Tab:
    tab = ui.open(strict=strict)
    tab.login(user.email, user.password, next_path=path)
    assert tab.path() == path, tab.page.url
    return tab


def count_navigations(page: Page) -> list[str]:
    """Main-frame navigations from now on (a live update must add none)."""
    navs: list[str] = []
    page.on("framenavigated", lambda frame: navs.append(frame.url) if frame == page.main_frame else None)
    return navs


@pytest.fixture
def host(ui_server: Server) -> Iterator[EdgeHost]:
    with edge_host(ui_server) as h:
        yield h


@dataclass
class Fleet:
    """A tenant with one online agent (real ``nkudo-edge`` on the simulator), shared by flows 3 to 5."""

    tenant: Tenant
    host: EdgeHost
    agent_id: str

    def run_plan(self, actions: list[dict[str, Any]]) -> dict[str, Any]:
        plan = self.tenant.plan(actions)
        done = wait_for(lambda: plan_done(self.tenant, plan["plan_id"]), timeout=60, what="plan done")
        assert done["plan_status"] == "SUCCEEDED", done
        return dict(done)


@pytest.fixture(scope="module")
def fleet(ui_server: Server) -> Iterator[Fleet]:
    t = make_tenant(ui_server, "Fleet Corp", "lab-fleet")
    with edge_host(ui_server) as h:
        yield Fleet(t, h, start_agent(h, t))


def test_login_shows_the_overview(ui: Browsers, ui_server: Server, admin_user: User) -> None:
    """Flow 1: the admin-created user signs in and sees the tenant's overview with its site."""
    t = make_tenant(ui_server, "Flow One Corp", "lab-one")
    tab = ui.open()
    tab.login(admin_user.email, admin_user.password)
    assert tab.path() == "/ui/tenants"  # an admin chooses among all tenants
    tab.page.get_by_role("link", name="Flow One Corp").click()
    assert tab.path() == f"/ui/t/{t.tenant_id}/"
    expect(tab.page.get_by_role("heading", level=1)).to_have_text("Overview of Flow One Corp")
    expect(tab.page.locator("#sites")).to_contain_text("lab-one")
    expect(tab.page.locator("#hosts-online")).to_have_text("0")


def test_enroll_with_the_shown_command_and_see_the_host_come_online_live(
        ui: Browsers, ui_server: Server, admin_user: User, host: EdgeHost) -> None:
    """Flow 2: issue a token on the Enroll page, run the exact command shown, start the agent: the host comes
    online on the open overview without a reload (SSE)."""
    t = make_tenant(ui_server, "Flow Two Corp", "lab-two")
    tab = signed_in(ui, admin_user, f"/ui/t/{t.tenant_id}/enroll")
    page = tab.page
    page.select_option("#site_id", t.site_id)
    with page.expect_navigation():
        page.get_by_role("button", name="Issue token").click()
    command = page.inner_text("#enroll-command").strip()
    with page.expect_download() as dl:
        page.get_by_role("link", name="download ca.crt").click()
    workdir = host.root / "operator"
    workdir.mkdir()
    dl.value.save_as(workdir / "ca.crt")

    # The command as a person would paste it; only where the agent keeps its files is redirected (tmp dirs).
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["nkudo-edge", "enroll"], command
    assert ui_server.url in argv and "ca.crt" in argv, command
    r = subprocess.run([EDGE, "--state-dir", str(host.state), *argv[1:], "--pki-dir", str(host.pki)], cwd=workdir,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    tab.goto(f"/ui/t/{t.tenant_id}/")
    # Enrolled but not running: not online (or no longer, once the sweeper has seen no heartbeat for 3 s).
    expect(page.locator("#hosts-online")).to_have_text("0", timeout=LIVE)
    navs = count_navigations(page)
    host.start()
    expect(page.locator("#hosts-online")).to_have_text("1", timeout=LIVE)
    expect(page.locator("#sites")).to_contain_text("ONLINE")
    assert navs == [], navs  # it came live, not by a reload
    agent_id = online_agent(t, host)

    page.get_by_role("link", name="lab-two").click()
    expect(page.locator("#agents")).to_contain_text(host_name(t, agent_id))
    expect(page.locator("#agents")).to_contain_text("ONLINE")


def host_name(t: Tenant, agent_id: str) -> str:
    [a] = [a for a in t.client.call("GET", f"/sites/{t.site_id}/agents")["agents"] if a["id"] == agent_id]
    return str(a["hostname"])


def test_revoke_a_session_from_the_access_page(ui: Browsers, ui_server: Server, admin_user: User) -> None:
    """Flow 6: an owner revokes another person's session: that person's live stream ends and their next
    navigation lands on the login page."""
    t = make_tenant(ui_server, "Flow Six Corp", "lab-six")
    owner = signed_in(ui, admin_user, f"/ui/t/{t.tenant_id}/access")
    email = f"{slug('op')}@example.test"
    owner.page.fill("#invite-email", email)
    owner.page.select_option("#invite-role", "operator")
    with owner.page.expect_navigation():
        owner.page.get_by_role("button", name="Create invitation").click()
    url = owner.page.inner_text("#invitation-url").strip()
    invite_path = url[url.index("/ui/invite/"):]

    # The invited operator: a browser of their own. Not strict: when their session is revoked the stream's
    # reconnection is refused, which the browser reports as an error (that is the point of the test).
    other = ui.open(strict=False)
    other.goto(invite_path)
    password = "pw-" + uuid.uuid4().hex
    other.page.fill("#password", password)
    other.page.fill("#password_confirm", password)
    stream = f"/ui/t/{t.tenant_id}/events/overview"
    # Signed in, on the live overview, with its event stream open (the server subscribed before answering).
    with other.page.expect_response(lambda r: r.url.endswith(stream) and r.status == 200, timeout=LIVE):
        other.page.get_by_role("button", name="Accept and sign in").click()
    assert other.path() == f"/ui/t/{t.tenant_id}/", other.page.url

    owner.goto(f"/ui/t/{t.tenant_id}/access")
    row = owner.page.locator("#sessions tbody tr", has_text=email)
    expect(row).to_have_count(1)
    owner.expect_confirm()
    with owner.page.expect_navigation():
        row.get_by_role("button", name="Revoke").click()
    assert owner.watch.confirmed and email in owner.watch.confirmed[0]
    expect(owner.page.locator("#sessions tbody tr", has_text=email)).to_have_count(0)

    # A change in the tenant makes the server re-check the stream's session before sending: the stream ends.
    with other.page.expect_event("requestfinished", lambda r: r.url.endswith(stream), timeout=LIVE):
        t.plan([create_action("vm-after-revoke")])
    other.nav("Plans").click()
    other.page.wait_for_url("**/ui/login**")
    expect(other.page.get_by_role("heading", level=1)).to_have_text("Sign in")


def test_submit_a_plan_and_watch_its_executions_finish_live(ui: Browsers, admin_user: User, fleet: Fleet) -> None:
    """Flow 3: the JSON editor submits a plan creating a VM; its plan page follows the executions to the end
    without a reload. A refused plan comes back with the error next to the editor, naming the field."""
    t, vm = fleet.tenant, "web-" + uuid.uuid4().hex[:6]
    tab = signed_in(ui, admin_user, f"/ui/t/{t.tenant_id}/plans")
    page = tab.page
    page.select_option("#site_id", t.site_id)
    bad = {"idempotency_key": uuid.uuid4().hex, "actions": [vm_create(fleet.host, vm, vcpus=0)]}
    page.fill("#body", json.dumps(bad, indent=2))
    tab.expect_status(400)
    with page.expect_navigation():
        page.get_by_role("button", name="Submit plan").click()
    expect(page.locator("#body-error")).to_contain_text("vcpus")
    expect(page.locator("#body")).to_have_attribute("aria-invalid", "true")

    # Slow boots (the simulator's delay) so that the plan is still running when its page opens.
    fleet.host.set_sim_flags("--sim-delay", "vm.boot=2")
    try:
        good = {"idempotency_key": uuid.uuid4().hex, "actions": [
            vm_create(fleet.host, vm), {"type": "MicroVMPause", "params": {"vm_id": vm}},
            {"type": "MicroVMResume", "params": {"vm_id": vm}}]}
        page.fill("#body", json.dumps(good, indent=2))
        with page.expect_navigation():
            page.get_by_role("button", name="Submit plan").click()
        assert re.fullmatch(rf"/ui/t/{t.tenant_id}/plans/[0-9a-f-]{{36}}\?flash=submitted", tab.path()), tab.path()
        first = page.inner_text("#plan-status").strip()
        navs = count_navigations(page)
        expect(page.locator("#plan-status")).to_have_text("SUCCEEDED", timeout=LIVE)
    finally:
        fleet.host.set_sim_flags()
    assert first in ("PENDING", "IN_PROGRESS"), first  # it was not done when the page opened: it came live
    assert navs == [], navs
    rows = page.locator("#executions tbody tr")
    expect(rows).to_have_count(3)
    for i in range(3):
        expect(rows.nth(i)).to_contain_text("SUCCEEDED")
    expect(rows.nth(0)).to_contain_text(vm)


def test_stop_a_vm_from_its_page(ui: Browsers, admin_user: User, fleet: Fleet) -> None:
    """Flow 4: Stop on the VM page asks for confirmation, submits a one-action plan, and that plan succeeds."""
    t, vm = fleet.tenant, "db-" + uuid.uuid4().hex[:6]
    fleet.run_plan([vm_create(fleet.host, vm)])
    tab = signed_in(ui, admin_user, f"/ui/t/{t.tenant_id}/sites/{t.site_id}/vms/{vm}")
    page = tab.page
    expect(page.locator("dl.facts")).to_contain_text("RUNNING")
    tab.expect_confirm()
    with page.expect_navigation():
        page.get_by_role("button", name="Stop", exact=True).click()
    assert tab.watch.confirmed == [f"Stop VM {vm}?"], tab.watch.confirmed
    assert re.fullmatch(rf"/ui/t/{t.tenant_id}/plans/[0-9a-f-]{{36}}\?flash=submitted", tab.path()), tab.path()
    expect(page.locator("#plan-status")).to_have_text("SUCCEEDED", timeout=LIVE)
    expect(page.locator("#executions tbody tr")).to_have_count(1)
    expect(page.locator("#executions")).to_contain_text("MicroVMStop")
    page.locator("#executions").get_by_role("link", name=vm).click()
    expect(page.locator("dl.facts")).to_contain_text("STOPPED")
    expect(page.locator("#vm-actions")).to_contain_text("MicroVMStop")


def test_open_an_execution_and_see_its_log_lines(ui: Browsers, admin_user: User, fleet: Fleet) -> None:
    """Flow 5: an execution's page shows its state and the agent's log lines, tailed live while it runs."""
    t, vm = fleet.tenant, "log-" + uuid.uuid4().hex[:6]
    fleet.host.set_sim_flags("--sim-delay", "vm.boot=3")
    try:
        plan = t.plan([vm_create(fleet.host, vm), {"type": "MicroVMSnapshot",
                                                   "params": {"vm_id": vm, "snapshot_name": "s1"}}])
        create, snap = (e["id"] for e in plan["executions"])
        wait_for(lambda: t.client.call("GET", f"/executions/{create}")["state"] == "RUNNING", what="create running")
        tab = signed_in(ui, admin_user, f"/ui/t/{t.tenant_id}/executions/{create}")
        page = tab.page
        first = page.inner_text("#exec-state").strip()
        navs = count_navigations(page)
        expect(page.locator("#exec-state")).to_have_text("SUCCEEDED", timeout=LIVE)
        expect(page.locator("#log")).to_contain_text("result: ", timeout=LIVE)
    finally:
        fleet.host.set_sim_flags()
    assert first == "RUNNING", first  # it was running when the page opened: the rest came live
    assert navs == [], navs

    wait_for(lambda: plan_done(t, plan["plan_id"]), timeout=60, what="plan done")
    tab.goto(f"/ui/t/{t.tenant_id}/plans/{plan['plan_id']}")
    page.locator("#executions").get_by_role("link", name=plan["executions"][1]["action_id"]).click()
    assert tab.path() == f"/ui/t/{t.tenant_id}/executions/{snap}"
    expect(page.locator("#exec-state")).to_have_text("SUCCEEDED")
    expect(page.locator("#log")).to_contain_text("snapshot written")
