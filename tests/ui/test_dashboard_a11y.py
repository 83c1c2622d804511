"""Accessibility of every dashboard page (issue 13): axe-core in Chromium, keyboard-only use, and screenshots.

One tenant with real content (a real agent on the simulator, VMs in two states, finished plans with log lines,
an API key) is made once for the module; each page is then opened signed in, checked by axe (no serious or
critical violation) and photographed for desktop (1280x800) and phone (390x844) into artifacts/screenshots/.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.cp.helpers import Server, Tenant
from tests.e2e.conftest import EdgeHost, wait_for
from tests.ui.conftest import (
    Browsers,
    Tab,
    User,
    edge_host,
    make_tenant,
    plan_done,
    start_agent,
    vm_create,
)


@dataclass
class Showcase:
    tenant: Tenant
    host: EdgeHost
    plan_id: str
    execution_id: str
    storage: dict[str, Any]  # a signed-in admin's cookies, so each page test need not sign in again

    def paths(self) -> dict[str, str]:
        t = self.tenant
        base = f"/ui/t/{t.tenant_id}"
        return {"tenants": "/ui/tenants", "overview": f"{base}/", "site": f"{base}/sites/{t.site_id}",
                "vm": f"{base}/sites/{t.site_id}/vms/web-1",
                "vm-confirm": f"{base}/sites/{t.site_id}/vms/web-1/confirm?action=delete",
                "plans": f"{base}/plans", "plan": f"{base}/plans/{self.plan_id}",
                "execution": f"{base}/executions/{self.execution_id}", "enroll": f"{base}/enroll",
                "audit": f"{base}/audit", "access": f"{base}/access"}


def _run(t: Tenant, actions: list[dict[str, Any]]) -> dict[str, Any]:
    plan = t.plan(actions)
    done = wait_for(lambda: plan_done(t, plan["plan_id"]), timeout=60, what="plan done")
    assert done["plan_status"] == "SUCCEEDED", done
    return dict(done)


@pytest.fixture(scope="module")
def showcase(ui_server: Server, browser: Browser, admin_user: User) -> Iterator[Showcase]:
    t = make_tenant(ui_server, "Acme Edge", "berlin-1")
    t.client.call("POST", f"/tenants/{t.tenant_id}/sites", {"name": "munich-2"})  # a site with no host yet
    with edge_host(ui_server) as h:
        start_agent(h, t)
        _run(t, [vm_create(h, "web-1"), vm_create(h, "db-1", vcpus=4, memory_mib=2048)])
        done = _run(t, [{"action_id": "snapshot-web", "type": "MicroVMSnapshot",
                         "params": {"vm_id": "web-1", "snapshot_name": "nightly"}},
                        {"action_id": "stop-db", "type": "MicroVMStop", "params": {"vm_id": "db-1"}}])
        context = browser.new_context(ignore_https_errors=True)  # see Browsers.open for why
        try:
            page = context.new_page()
            page.goto(ui_server.url + "/ui/login")
            page.fill("input[name=email]", admin_user.email)
            page.fill("input[name=password]", admin_user.password)
            with page.expect_navigation():
                page.press("input[name=password]", "Enter")
            storage = context.storage_state()
        finally:
            context.close()
        yield Showcase(t, h, done["plan_id"], done["executions"][0]["id"], dict(storage))


def _signed_in(ui: Browsers, showcase: Showcase) -> Tab:
    return ui.open(storage_state=showcase.storage)


PAGES = ["tenants", "overview", "site", "vm", "vm-confirm", "plans", "plan", "execution", "enroll", "audit",
         "access"]


@pytest.mark.parametrize("name", PAGES)
def test_page_has_no_serious_axe_violations(ui: Browsers, showcase: Showcase, name: str) -> None:
    tab = _signed_in(ui, showcase)
    tab.goto(showcase.paths()[name])
    tab.page.wait_for_load_state("networkidle")
    found = tab.axe()
    tab.shoot(name)
    assert found == [], "\n".join(found)


def test_login_page_has_no_serious_axe_violations(ui: Browsers, admin_user: User) -> None:
    tab = ui.open()
    tab.goto("/ui/login")
    found = tab.axe()
    tab.shoot("login")
    assert found == [], "\n".join(found)
    # a refused sign-in shows its error, linked to the field, and stays accessible
    tab.page.fill("input[name=email]", admin_user.email)
    tab.page.fill("input[name=password]", "not the password")
    tab.expect_status(401)
    with tab.page.expect_navigation():
        tab.page.press("input[name=password]", "Enter")
    expect(tab.page.locator("#email")).to_have_attribute("aria-describedby", "login-error")
    found = tab.axe()
    tab.shoot("login-error")
    assert found == [], "\n".join(found)


def test_forms_with_results_have_no_serious_axe_violations(ui: Browsers, showcase: Showcase) -> None:
    """The states a form leads to: an issued enrollment command, a created invitation and API key, the
    invitation page a new person sees, and a plan refused with its error next to the editor."""
    t = showcase.tenant
    tab = _signed_in(ui, showcase)
    page = tab.page
    tab.goto(f"/ui/t/{t.tenant_id}/enroll")
    with page.expect_navigation():
        page.get_by_role("button", name="Issue token").click()
    expect(page.locator("#enroll-command")).to_contain_text("nkudo-edge enroll")
    problems = [f"enroll-issued: {v}" for v in tab.axe()]
    tab.shoot("enroll-issued")

    tab.goto(f"/ui/t/{t.tenant_id}/access")
    page.fill("#invite-email", f"viewer-{uuid.uuid4().hex[:6]}@example.test")
    with page.expect_navigation():
        page.get_by_role("button", name="Create invitation").click()
    url = page.inner_text("#invitation-url").strip()
    page.fill("#key-name", "ci-pipeline")
    with page.expect_navigation():
        page.get_by_role("button", name="Create API key").click()
    expect(page.locator("#api-key")).not_to_be_empty()
    problems += [f"access-created: {v}" for v in tab.axe()]
    tab.shoot("access-created")

    tab.goto(f"/ui/t/{t.tenant_id}/plans")
    page.fill("#body", json.dumps({"idempotency_key": "k1", "actions": [{"type": "MicroVMStop", "params": {}}]}))
    tab.expect_status(400)
    with page.expect_navigation():
        page.get_by_role("button", name="Submit plan").click()
    expect(page.locator("#body-error")).to_be_visible()
    problems += [f"plans-error: {v}" for v in tab.axe()]
    tab.shoot("plans-error")

    newcomer = ui.open()
    newcomer.goto(url[url.index("/ui/invite/"):])
    problems += [f"invite: {v}" for v in newcomer.axe()]
    newcomer.shoot("invite")
    assert problems == [], "\n".join(problems)


# --- keyboard ---------------------------------------------------------------------------------------------

def _focused(page: Page) -> str:
    """The focused element, described: ``tag#id "text"``."""
    return str(page.evaluate("""() => { const e = document.activeElement;
        return `${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''} "${(e.innerText || e.value || '').trim().slice(0, 40)}"`; }"""))


def _tab_to(page: Page, selector: str, limit: int = 80) -> list[str]:
    """Press Tab until the element matching ``selector`` has the focus; the focus path (fails if never)."""
    path = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        path.append(_focused(page))
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
            assert outline != "none", f"{selector} has focus but no visible outline"
            return path
    raise AssertionError(f"Tab never reached {selector}; focus went: {path}")


def test_keyboard_skip_link_and_login(ui: Browsers, admin_user: User) -> None:
    """The first Tab lands on the skip link; Enter moves into the content; the login form is filled and
    submitted with the keyboard alone."""
    tab = ui.open()
    tab.goto("/ui/login")
    page = tab.page
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('skip-link')"), _focused(page)
    expect(page.locator(".skip-link")).to_be_in_viewport()  # visible when focused
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main", _focused(page)
    _tab_to(page, "#email", limit=5)
    page.keyboard.type(admin_user.email)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "password", _focused(page)
    page.keyboard.type(admin_user.password)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert tab.path() == "/ui/tenants", page.url


def test_keyboard_reaches_the_nav_and_submits_a_plan(ui: Browsers, showcase: Showcase) -> None:
    """From the skip link, Tab reaches every main navigation link in order; Enter follows one; on the plans
    page Tab reaches the editor, the plan is typed, and Enter on the submit button sends it."""
    t = showcase.tenant
    tab = _signed_in(ui, showcase)
    tab.goto(f"/ui/t/{t.tenant_id}/")
    page = tab.page
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('skip-link')"), _focused(page)
    seen = []
    for name in ("Overview", "Plans", "Enroll a host", "Audit", "Access"):
        path = _tab_to(page, "nav[aria-label=Main] a", limit=10)
        seen.append(path[-1])
        assert f'"{name}"' in path[-1], (name, path)
    assert len(seen) == 5
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert '"Plans"' in _focused(page), _focused(page)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert tab.path() == f"/ui/t/{t.tenant_id}/plans"

    _tab_to(page, "#site_id")
    page.keyboard.type("berlin")  # a focused select picks the option typed
    assert page.input_value("#site_id") == t.site_id
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "body", _focused(page)
    page.keyboard.press("Control+A")
    plan = {"idempotency_key": uuid.uuid4().hex, "actions": [vm_create(showcase.host, "kbd-1")]}
    page.keyboard.insert_text(json.dumps(plan))
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.type") == "submit", _focused(page)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert tab.path().startswith(f"/ui/t/{t.tenant_id}/plans/"), page.url
    expect(page.locator("#executions")).to_contain_text("kbd-1")
    expect(page.locator("#plan-status")).to_have_text("SUCCEEDED", timeout=20_000)
