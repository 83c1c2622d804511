"""The dashboard's browser-side security (issue 13): the CSP is enforced, stored and agent-supplied text is inert.

Every test here runs with the watched tabs of conftest.py: a console error, a CSP violation, a failed request of
ours or any JavaScript dialog fails it, so "no script ran" is checked by the browser itself, not by reading HTML.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.cp.helpers import Server
from tests.ui.conftest import XSS_IMG, XSS_SCRIPT, Browsers, Tab, User, create_user, seed_site, slug


def test_csp_blocks_inline_script_eval_and_foreign_hosts(ui: Browsers, ui_server: Server) -> None:
    """What the policy promises, proven by the browser: an injected inline script, ``eval`` and a request to
    another host are all refused, and each refusal is reported (so the watcher the other tests rely on works)."""
    tab = ui.open(strict=False)
    tab.goto("/ui/login")
    page = tab.page
    page.evaluate("""() => {
        const s = document.createElement('script');
        s.textContent = 'window.__inlineRan = true';
        document.body.appendChild(s);
        const img = document.createElement('img');
        img.src = 'https://example.invalid/pixel.png';
        document.body.appendChild(img);
    }""")
    # eval from the page's own task (the protocol's evaluate itself runs outside the CSP, a timer does not)
    evaluated = page.evaluate("""() => new Promise((done) => setTimeout(() => {
        try { done(String((0, eval)('1 + 1'))); } catch (e) { done(String(e)); }
    }, 0))""")
    assert evaluated.startswith("EvalError"), evaluated
    page.wait_for_timeout(300)
    assert page.evaluate("window.__inlineRan") is None
    violations = " | ".join(tab.watch.csp_violations)
    assert "script-src" in violations and "inline" in violations, violations
    assert "img-src" in violations and "example.invalid" in violations, violations
    headers = tab.goto("/ui/login").headers  # type: ignore[union-attr]
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"]


@pytest.mark.parametrize("path", ["/ui/login"])
def test_login_page_is_clean(ui: Browsers, path: str) -> None:
    """The login page loads its script and styles with no console error, violation or failed request."""
    tab = ui.open()
    tab.goto(path)
    tab.page.wait_for_load_state("networkidle")
    assert tab.page.title()


def test_login_wrong_password_is_refused(ui: Browsers, admin_user: User) -> None:
    tab = ui.open()
    tab.goto("/ui/login")
    tab.expect_status(401)  # the refusal, on purpose
    tab.page.fill("input[name=email]", admin_user.email)
    tab.page.fill("input[name=password]", admin_user.password + "x")
    with tab.page.expect_navigation():
        tab.page.press("input[name=password]", "Enter")
    assert "/ui/login" in tab.page.url
    assert "wrong" in tab.page.inner_text("[role=alert]")


def test_pages_name_their_icon(ui: Browsers, admin_user: User) -> None:
    """A page without ``<link rel="icon">`` makes the browser fetch /favicon.ico, a 404 and a console error on
    every page load; the other tests set that one aside so that it fails here, once."""
    tab = ui.open()
    tab.login(admin_user.email, admin_user.password)
    tab.page.wait_for_load_state("networkidle")
    tab.page.wait_for_timeout(500)  # the icon is fetched after load
    assert tab.page.locator("link[rel~=icon]").count() >= 1
    assert not tab.watch.icon_missing


def _no_injected_markup(tab: Tab) -> None:
    """Nothing the payloads could have become exists in the DOM: no ``<img src=x>``, no inline script."""
    injected = tab.page.evaluate("""() => [...document.querySelectorAll('img, script:not([src]), [onerror]')]
        .map(e => e.outerHTML.slice(0, 80))""")
    assert injected == [], injected


def test_hostile_names_facts_and_log_lines_are_shown_literally(ui: Browsers, ui_server: Server,
                                                              tmp_path: Path) -> None:
    """Flow 7 (XSS): the payloads go in through the API (tenant, site and API key names, a plan's execution)
    and through an agent (its version and labels at enrollment; host facts, a progress message, log lines and a
    result message in heartbeats and reports). Every page showing them shows the text; no script runs, no dialog
    opens, and pages updated live over SSE are as inert as pages loaded whole."""
    seeded = seed_site(ui_server, tmp_path, tenant_name=f"Tenant {XSS_IMG}", site_name=f"Site {XSS_SCRIPT}",
                       texts=[XSS_IMG, XSS_SCRIPT])
    t = seeded.tenant
    admin = create_user(ui_server, f"{slug('owner')}@example.test", tenant_id=t.tenant_id, role="owner")
    tab = ui.open()
    tab.login(admin.email, admin.password, next_path=f"/ui/t/{t.tenant_id}/")
    base = f"/ui/t/{t.tenant_id}"
    expected = {  # page -> (where, the texts that must appear there literally)
        f"{base}/": ("main", [f"Tenant {XSS_IMG}", f"Site {XSS_SCRIPT}"]),
        f"{base}/sites/{t.site_id}": ("main", [f"Site {XSS_SCRIPT}", XSS_IMG]),
        f"{base}/sites/{t.site_id}/vms/{seeded.vm_id}": ("main", [f"Site {XSS_SCRIPT}"]),
        f"{base}/plans": ("main", [f"Site {XSS_SCRIPT}"]),
        f"{base}/plans/{seeded.plan_id}": ("main", [f"Site {XSS_SCRIPT}"]),
        f"{base}/executions/{seeded.execution_id}": ("#log", [XSS_IMG, XSS_SCRIPT]),
        f"{base}/enroll": ("main", [f"Site {XSS_SCRIPT}"]),
        f"{base}/audit": ("main", []),
        f"{base}/access": ("#api-keys", [f"{XSS_IMG} 0", f"{XSS_SCRIPT} 1"]),
    }
    for path, (where, texts) in expected.items():
        tab.goto(path)
        tab.page.wait_for_load_state("networkidle")
        shown = tab.page.inner_text(where)
        for text in texts:
            assert text in shown, (path, text, shown[:2000])
        assert f"Tenant {XSS_IMG}" in tab.page.title() or path != f"{base}/"
        _no_injected_markup(tab)
    tab.goto(f"/ui/t/{t.tenant_id}/executions/{seeded.execution_id}")
    expect(tab.page.locator("main")).to_contain_text(XSS_SCRIPT)  # the result message

    # The plan editor echoes a refused body and the decoder's message: a payload closing the textarea stays text.
    tab.goto(f"{base}/plans")
    breakout = f"</textarea>{XSS_IMG}"
    tab.page.fill("#body", json.dumps({"idempotency_key": "xss-1", "actions": [
        {"type": "MicroVMCreate", "params": {"vm_id": "vm-x", "name": breakout, "vcpus": 1, "memory_mib": 128,
                                             "nics": []}}]}))
    tab.expect_status(400)
    with tab.page.expect_navigation():
        tab.page.get_by_role("button", name="Submit plan").click()
    expect(tab.page.locator("#body-error")).to_contain_text("name")
    assert breakout in tab.page.input_value("#body")
    _no_injected_markup(tab)

    # Live: the site page is open; the agent reports new hostile facts; the swapped-in fragment is inert too.
    tab.goto(f"{base}/sites/{t.site_id}")
    live = f"{XSS_SCRIPT} live"
    seeded.agent.heartbeat(heartbeat_seq=10, agent_version=live, host_facts={"os": XSS_IMG, "kernel": live})
    expect(tab.page.locator("#agents")).to_contain_text(live, timeout=20_000)
    _no_injected_markup(tab)
    assert tab.watch.dialogs == []
