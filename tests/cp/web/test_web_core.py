"""The dashboard's framework and core pages against a real control plane (TLS, UI on): headers, cookies,
CSRF, login, redirects, sessions, roles, escaping, the UI flag, live overview (issue 13)."""

from __future__ import annotations

import json
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from nkudo.cp.web.app import MODULES
from nkudo.cp.web.security import CSP
from tests.cp.helpers import Agent, Tenant, start_server

from .conftest import UI_FAST, Browser, Dashboard, Response

HOSTILE = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
_POST_FORM = re.compile(r'<form method="post" action="([^"]+)"')


def assert_security_headers(r: Response, *, html: bool = True) -> None:
    assert r.header("Content-Security-Policy") == CSP, r.path
    assert "script-src 'self'" in CSP and "unsafe" not in CSP and "frame-ancestors 'none'" in CSP
    assert r.header("X-Frame-Options") == "DENY", r.path
    assert r.header("Referrer-Policy") == "no-referrer", r.path
    assert r.header("X-Content-Type-Options") == "nosniff", r.path
    assert (r.header("Strict-Transport-Security") or "").startswith("max-age="), r.path
    if html:
        assert r.header("Cache-Control") == "no-store", r.path


def audit_count(t: Tenant) -> int:
    return len(t.client.call("GET", f"/tenants/{t.tenant_id}/audit-events?limit=1000")["events"])


def post_forms(r: Response) -> list[str]:
    """The actions of the POST forms of a page, without the sign-out form every page has."""
    return [a for a in _POST_FORM.findall(r.text) if a != "/ui/logout"]


# --- headers, errors, static ----------------------------------------------------------------------------------


def test_security_headers_on_every_kind_of_response(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    assert_security_headers(b.get("/ui/login"))  # a page, before login
    r = b.get(f"/ui/t/{t.tenant_id}/")  # a redirect
    assert r.status == 303
    assert_security_headers(r)
    r = b.get("/ui/no/such/page")  # 404
    assert r.status == 404 and "text/html" in (r.header("Content-Type") or "")
    assert_security_headers(r)
    r = b.request("DELETE", "/ui/login")  # 405 (method not allowed: an HTML page too)
    assert r.status == 405 and "text/html" in (r.header("Content-Type") or "")
    assert_security_headers(r)
    r = b.post("/ui/login", {"email": "a@example.com", "password": "x" * 12}, csrf="wrong")  # 403
    assert r.status == 403
    assert_security_headers(r)
    r = b.get("/ui/static/app.css")
    assert r.status == 200
    assert_security_headers(r, html=False)
    assert r.header("Cache-Control") == "no-cache"
    r = b.get("/ui/static/vendor/htmx-2.0.11.min.js")
    assert r.status == 200
    assert_security_headers(r, html=False)
    assert "immutable" in (r.header("Cache-Control") or "")
    b.login(dashboard.user(t, "owner"))
    r = b.get(f"/ui/t/{t.tenant_id}/")  # a signed-in page
    assert r.status == 200
    assert_security_headers(r)
    assert 'name="htmx-config"' in r.text and '"allowEval": false' in r.text
    assert "<script>" not in r.text and " style=" not in r.text and " onclick=" not in r.text  # nothing inline
    stream = b.stream(f"/ui/t/{t.tenant_id}/events/overview")  # an event stream
    try:
        assert stream.status == 200 and stream.header("Content-Security-Policy") == CSP
        assert stream.header("Cache-Control") == "no-store"
    finally:
        stream.close()


def test_unknown_ui_path_is_an_html_404_and_the_api_404_stays_json(dashboard: Dashboard) -> None:
    b = dashboard.browser()
    r = b.get("/ui/nothing-here")
    assert r.status == 404 and r.text.lstrip().startswith("<!doctype html>") and "Not found" in r.text
    r = b.get("/no-such-api-route")
    assert r.status == 404 and r.header("Content-Type") == "application/json"
    assert json.loads(r.body)["error"]["code"] == "NOT_FOUND"
    assert r.header("Content-Security-Policy") is None  # the API is not the dashboard


# --- login, cookies, redirects, logout ------------------------------------------------------------------------


def test_login_sets_a_strict_session_cookie_and_wrong_logins_say_nothing_more(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    user = dashboard.user(t, "operator")
    b = dashboard.browser()
    page = b.get("/ui/login")
    pre = [c for c in page.set_cookies if c.startswith("nkudo_prelogin=")]
    assert pre and all(f in pre[0] for f in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/ui/"))
    wrong = b.post("/ui/login", {"email": user.email, "password": "not-the-password"})
    unknown = b.post("/ui/login", {"email": "nobody-" + uuid.uuid4().hex[:6] + "@example.com",
                                   "password": user.password}, csrf=b.csrf(page))
    for r in (wrong, unknown):
        assert r.status == 401 and "Sign-in failed: the email or password is wrong." in r.text
        assert not [c for c in r.set_cookies if c.startswith("nkudo_session=")]
    assert "nkudo_session" not in b.cookies
    ok = b.login(user)
    assert ok.location == "/ui/"
    session = [c for c in ok.set_cookies if c.startswith("nkudo_session=")]
    assert session, ok.set_cookies
    flags = [f.strip() for f in session[0].split(";")]
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/ui/"} <= set(flags)
    max_age = next(int(f.split("=")[1]) for f in flags if f.lower().startswith("max-age="))
    # Until the absolute timeout (7 days), never beyond it, and not just the idle one (8 h): the cookie is set
    # once, at sign-in, so a cookie of 8 h signed out a user who had been active all day.
    assert 7 * 24 * 3600 - 60 < max_age <= 7 * 24 * 3600
    assert "nkudo_prelogin" not in b.cookies  # spent
    r = b.get("/ui/", follow=True)
    assert r.status == 200 and r.path == f"/ui/t/{t.tenant_id}/" and user.email in r.text


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "/ui//evil.example",
                                    "/ui/../x", "javascript:alert(1)", "/elsewhere", "/ui/\r\nSet-Cookie:x=1"])
def test_login_next_is_a_local_dashboard_path_only(dashboard: Dashboard, target: str) -> None:
    t = dashboard.tenant()
    r = dashboard.browser().login(dashboard.user(t, "viewer"), next_path=target)
    assert r.location == "/ui/"


def test_htmx_request_without_a_session_sends_the_whole_page_to_login(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    page = f"/ui/t/{t.tenant_id}/plans?status=FAILED"
    r = dashboard.browser().get(f"/ui/t/{t.tenant_id}/", headers={
        "HX-Request": "true", "HX-Current-URL": f"{dashboard.url}{page}"})
    assert r.status == 204 and r.header("HX-Redirect") == f"/ui/login?next={page.replace('?', '%3F').replace('=', '%3D')}"
    r = dashboard.browser().get(f"/ui/t/{t.tenant_id}/", headers={
        "HX-Request": "true", "HX-Current-URL": "https://evil.example//evil.example/"})
    assert r.status == 204 and r.header("HX-Redirect") == "/ui/login?next=/ui/"


def test_login_next_to_a_dashboard_page_is_kept(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    r = b.get(f"/ui/t/{t.tenant_id}/access")
    assert r.status == 303 and r.location == f"/ui/login?next=/ui/t/{t.tenant_id}/access"
    r = b.login(dashboard.user(t, "viewer"), next_path=f"/ui/t/{t.tenant_id}/access")
    assert r.location == f"/ui/t/{t.tenant_id}/access"


def test_logout_ends_the_session_on_the_server(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    b.login(dashboard.user(t, "owner"))
    stolen = b.cookies["nkudo_session"]
    b.get(f"/ui/t/{t.tenant_id}/")
    r = b.post("/ui/logout")
    assert r.status == 303 and (r.location or "").startswith("/ui/login")
    assert any(c.startswith("nkudo_session=") and "Max-Age=0" in c for c in r.set_cookies)
    replay = dashboard.browser()
    replay.cookies["nkudo_session"] = stolen  # the old cookie, kept by someone: no longer a session
    r = replay.get(f"/ui/t/{t.tenant_id}/")
    assert r.status == 303 and (r.location or "").startswith("/ui/login?next=")


def test_revoked_session_is_sent_to_login_on_its_next_request(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    owner, victim = dashboard.browser(), dashboard.browser()
    owner.login(dashboard.user(t, "owner"))
    victim.login(dashboard.user(t, "operator"))
    assert victim.get(f"/ui/t/{t.tenant_id}/").status == 200
    page = owner.get(f"/ui/t/{t.tenant_id}/access")
    revoke = [a for a in post_forms(page) if "/sessions/" in a]
    assert len(revoke) == 1, revoke  # the victim's session; the owner's own (current) one has no button
    r = owner.post(revoke[0], csrf=owner.csrf(page))
    assert r.status == 303
    r = victim.get(f"/ui/t/{t.tenant_id}/plans")
    assert r.status == 303 and r.location == f"/ui/login?next=/ui/t/{t.tenant_id}/plans"


def test_login_rate_limit_is_a_readable_page(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "cp", extra=[*UI_FAST, "--rate-limit-login", "2/min:2"])
    try:
        b = Browser(srv)
        b.get("/ui/login")
        statuses = [b.post("/ui/login", {"email": "a@example.com", "password": "x" * 12}, csrf=b.csrf(b.get(
            "/ui/login"))).status for _ in range(3)]
        r = b.last
        assert r is not None and statuses[-1] == 429, statuses
        assert r.header("Retry-After") and "text/html" in (r.header("Content-Type") or "")
        assert "Too many requests" in r.text and re.search(r"Try again in \d+ seconds", r.text)
        assert_security_headers(r)
    finally:
        srv.stop()


# --- CSRF -----------------------------------------------------------------------------------------------------


def _post_routes() -> list[str]:
    return sorted({path for module in MODULES for method, path, _h, _n in module.ROUTES if method == "POST"})


def _fill(path: str, ids: dict[str, str]) -> str:
    return "/ui" + re.sub(r"\{(\w+)\}", lambda m: ids.get(m.group(1), str(uuid.uuid4())), path)


def test_every_post_route_refuses_a_missing_or_wrong_csrf_token(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    owner_user, member = dashboard.user(t, "owner"), dashboard.user(t, "viewer")
    owner, other = dashboard.browser(), dashboard.browser()
    owner.login(owner_user)
    other.login(member)
    other_token = other.csrf(other.get(f"/ui/t/{t.tenant_id}/"))
    key = t.client.call("POST", f"/tenants/{t.tenant_id}/api-keys", {"name": "csrf"})["id"]
    page = owner.post(f"/ui/t/{t.tenant_id}/access/invitations", {"email": "inv@example.com", "role": "viewer"},
                      csrf=owner.csrf(owner.get(f"/ui/t/{t.tenant_id}/access")))
    invite_token = re.search(r"/ui/invite/([A-Za-z0-9_-]+)", page.text)
    invitation = re.search(r"/access/invitations/([0-9a-f-]{36})/revoke", page.text)
    session = re.search(r"/access/sessions/([0-9a-f-]{36})/revoke", page.text)
    assert invite_token and invitation and session
    ids = {"tenant_id": t.tenant_id, "key_id": key, "user_id": member.user_id, "session_id": session.group(1),
           "invitation_id": invitation.group(1), "token": invite_token.group(1), "site_id": t.site_id}
    form = {"email": owner_user.email, "password": owner_user.password, "role": "owner", "name": "forged",
            "site_id": t.site_id, "password_confirm": owner_user.password, "api_key": t.api_key}
    before = audit_count(t)
    routes = _post_routes()
    assert len(routes) >= 9
    for route in routes:
        path = _fill(route, ids)
        for token in ("", "forged-" + "0" * 58, other_token):  # none, a guess, another session's token
            r = owner.post(path, form, csrf=token)
            assert r.status == 403 and "CSRF_INVALID" in r.text, (route, token, r.status)
            assert_security_headers(r)
            assert not [c for c in r.set_cookies if c.startswith("nkudo_session=")]
    assert audit_count(t) == before  # nothing changed
    assert owner.get(f"/ui/t/{t.tenant_id}/").status == 200  # the owner's session survived the forged logout
    assert other.get(f"/ui/t/{t.tenant_id}/").status == 200
    assert dashboard.browser().get(f"/ui/invite/{invite_token.group(1)}").status == 200  # still unused


def test_login_form_without_the_pre_session_token_is_refused(dashboard: Dashboard) -> None:
    """Login CSRF: a cross-site form that signs the victim in (as the attacker) carries no matching token."""
    t = dashboard.tenant()
    user = dashboard.user(t, "viewer")
    b = dashboard.browser()
    b.get("/ui/login")
    r = b.post("/ui/login", {"email": user.email, "password": user.password}, csrf="")
    assert r.status == 403 and "nkudo_session" not in b.cookies
    attacker = dashboard.browser()
    attacker_token = attacker.csrf(attacker.get("/ui/login"))  # a real token, but of another browser's cookie
    r = b.post("/ui/login", {"email": user.email, "password": user.password}, csrf=attacker_token)
    assert r.status == 403 and "nkudo_session" not in b.cookies


def test_a_token_counts_only_where_it_belongs(dashboard: Dashboard) -> None:
    """A pre-session token is no token on session routes, and a session's token none on the login form."""
    t = dashboard.tenant()
    user = dashboard.user(t, "owner")
    b = dashboard.browser()
    b.login(user)
    session_token = b.csrf(b.get(f"/ui/t/{t.tenant_id}/"))
    pre = "p" * 43
    b.cookies["nkudo_prelogin"] = pre  # as if left over from the login page
    before = audit_count(t)
    for route in _post_routes():
        if route in ("/login", "/invite/{token}"):
            continue
        r = b.post(_fill(route, {"tenant_id": t.tenant_id}), {"name": "x", "email": "x@example.com",
                                                              "role": "owner", "site_id": t.site_id}, csrf=pre)
        assert r.status == 403 and "CSRF_INVALID" in r.text, route
    assert audit_count(t) == before
    r = b.post("/ui/login", {"email": user.email, "password": user.password}, csrf=session_token)
    assert r.status == 403 and "CSRF_INVALID" in r.text


def test_flash_shows_only_fixed_sentences(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    b.login(dashboard.user(t, "viewer"))
    r = b.get(f"/ui/t/{t.tenant_id}/?flash=saved")
    assert '<p class="flash" role="status">Saved.</p>' in r.text
    r = b.get(f"/ui/t/{t.tenant_id}/?flash=Your+account+is+locked%2C+call+555")
    assert "call 555" not in r.text and 'class="flash"' not in r.text


# --- roles ----------------------------------------------------------------------------------------------------


def test_viewer_sees_no_forms_and_a_forged_post_is_refused_by_the_use_case(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    viewer = dashboard.browser()
    viewer.login(dashboard.user(t, "viewer"))
    for path in ("/", "/enroll", "/access"):
        r = viewer.get(f"/ui/t/{t.tenant_id}{path}")
        assert r.status == 200 and post_forms(r) == [], (path, post_forms(r))
    assert "can look at this tenant but not enroll hosts" in viewer.get(f"/ui/t/{t.tenant_id}/enroll").text
    token = viewer.csrf()
    before = audit_count(t)
    forged = {f"/ui/t/{t.tenant_id}/enroll": {"site_id": t.site_id, "expires_in_seconds": "900"},
              f"/ui/t/{t.tenant_id}/access/api-keys": {"name": "viewer-key"},
              f"/ui/t/{t.tenant_id}/access/invitations": {"email": "x@example.com", "role": "owner"}}
    for path, form in forged.items():
        r = viewer.post(path, form, csrf=token)
        assert r.status == 403 and "FORBIDDEN_ROLE" in r.text, (path, r.status, r.text[-400:])
    assert audit_count(t) == before


def test_owner_sees_forms_and_creates_an_api_key_shown_once(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    b.login(dashboard.user(t, "owner"))
    page = b.get(f"/ui/t/{t.tenant_id}/access")
    assert f"/ui/t/{t.tenant_id}/access/api-keys" in post_forms(page)
    r = b.post(f"/ui/t/{t.tenant_id}/access/api-keys", {"name": "from-the-ui"})
    assert r.status == 200
    key = re.search(r'<pre id="api-key" class="copyable">([^<]+)</pre>', r.text)
    assert key
    names = [k["name"] for k in dashboard.server.client(api_key=key.group(1))
             .call("GET", f"/tenants/{t.tenant_id}/api-keys")["api_keys"]]
    assert "from-the-ui" in names  # the key works against the API
    assert key.group(1) not in b.get(f"/ui/t/{t.tenant_id}/access").text  # and is never shown again


def test_api_key_sign_in_is_read_only(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    b.get("/ui/login")
    r = b.post("/ui/login", {"api_key": "wrong-" + uuid.uuid4().hex})
    assert r.status == 401 and "API key is wrong" in r.text
    r = b.post("/ui/login", {"api_key": t.api_key})
    assert r.status == 303
    assert b.get(f"/ui/t/{t.tenant_id}/").status == 200
    enroll = b.get(f"/ui/t/{t.tenant_id}/enroll")
    assert post_forms(enroll) == []
    r = b.post(f"/ui/t/{t.tenant_id}/enroll", {"site_id": t.site_id, "expires_in_seconds": "900"})
    assert r.status == 403 and "FORBIDDEN_ROLE" in r.text


def test_foreign_tenant_is_a_404_page(dashboard: Dashboard) -> None:
    mine, theirs = dashboard.tenant(), dashboard.tenant()
    b = dashboard.browser()
    b.login(dashboard.user(mine, "owner"))
    for path in ("/", "/enroll", "/access"):
        r = b.get(f"/ui/t/{theirs.tenant_id}{path}")
        assert r.status == 404 and "TENANT_NOT_FOUND" in r.text
    assert b.get("/ui/t/not-a-uuid/").status == 404


# --- invitations ----------------------------------------------------------------------------------------------


def test_invitation_link_signs_up_once(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    owner = dashboard.browser()
    owner.login(dashboard.user(t, "owner"))
    owner.get(f"/ui/t/{t.tenant_id}/access")
    email = f"new-{uuid.uuid4().hex[:6]}@example.com"
    r = owner.post(f"/ui/t/{t.tenant_id}/access/invitations", {"email": email, "role": "operator"})
    link = re.search(r"https://[^<\s]+/ui/invite/([A-Za-z0-9_-]+)", r.text)
    assert r.status == 200 and link
    path = f"/ui/invite/{link.group(1)}"
    guest = dashboard.browser()
    form = guest.get(path)
    assert form.status == 200 and email in form.text and "operator" in form.text
    r = guest.post(path, {"password": "a-long-password-1", "password_confirm": "a-different-password"})
    assert r.status == 400 and "The two passwords differ." in r.text
    r = guest.post(path, {"password": "a-long-password-1", "password_confirm": "a-long-password-1"}, csrf=guest.csrf(r))
    assert r.status == 303 and "nkudo_session" in guest.cookies
    page = guest.get(f"/ui/t/{t.tenant_id}/enroll")
    assert page.status == 200 and f"/ui/t/{t.tenant_id}/enroll" in post_forms(page)  # an operator may enroll
    again = dashboard.browser().get(path)
    assert again.status == 404  # single use


# --- escaping, the overview, the enroll page --------------------------------------------------------------------


def test_hostile_names_are_escaped_on_overview_and_enroll(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant(site_name=HOSTILE)
    dashboard.agent(t, tmp_path, hostname="h-" + uuid.uuid4().hex[:6])
    b = dashboard.browser()
    b.login(dashboard.user(t, "owner"))
    for path in ("/", "/enroll"):
        r = b.get(f"/ui/t/{t.tenant_id}{path}")
        assert r.status == 200 and HOSTILE not in r.text and ESCAPED in r.text, path
    r = b.post(f"/ui/t/{t.tenant_id}/enroll", {"site_id": t.site_id, "expires_in_seconds": "900"})
    assert r.status == 200 and HOSTILE not in r.text and ESCAPED in r.text


def test_enroll_page_issues_a_token_that_enrolls_a_host(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    b.login(dashboard.user(t, "operator"))
    page = b.get(f"/ui/t/{t.tenant_id}/enroll")
    assert dashboard.url in page.text  # the control plane URL the command will use
    r = b.post(f"/ui/t/{t.tenant_id}/enroll", {"site_id": t.site_id, "expires_in_seconds": "900"})
    cmd = re.search(r"nkudo-edge enroll --control-plane (\S+) --token (\S+) --ca-file ca\.crt", r.text)
    assert r.status == 200 and cmd and cmd.group(1) == dashboard.url
    st, out = Agent(dashboard.server, tmp_path).enroll_raw(cmd.group(2))
    assert st == 200, out
    ca = b.get(f"/ui/t/{t.tenant_id}/enroll/ca.crt")
    assert ca.status == 200 and ca.body == dashboard.server.ca_file.read_bytes()
    r = b.post(f"/ui/t/{t.tenant_id}/enroll", {"site_id": str(uuid.uuid4()), "expires_in_seconds": "900"})
    assert r.status == 404 and 'id="site_id-error"' in r.text
    r = b.post(f"/ui/t/{t.tenant_id}/enroll", {"site_id": t.site_id, "expires_in_seconds": "99999999"},
               csrf=b.csrf(page))
    assert r.status == 400 and 'id="expires_in_seconds-error"' in r.text


def test_enroll_command_ignores_an_odd_host_header(dashboard: Dashboard) -> None:
    t = dashboard.tenant()
    b = dashboard.browser()
    b.login(dashboard.user(t, "owner"))
    b.get(f"/ui/t/{t.tenant_id}/enroll")
    r = b.post(f"/ui/t/{t.tenant_id}/enroll", {"site_id": t.site_id}, headers={"Host": "evil.example/x?y=1 --insecure"})
    cmd = re.search(r"nkudo-edge enroll --control-plane (\S+) --token", r.text)
    assert r.status == 200 and cmd and cmd.group(1) == f"https://localhost:{dashboard.server.port}"


def _overview_numbers(text: str) -> tuple[int, int]:
    online = re.search(r'id="hosts-online">(\d+)<', text)
    offline = re.search(r'id="hosts-offline">(\d+)<', text)
    assert online and offline
    return int(online.group(1)), int(offline.group(1))


def test_login_and_live_overview_on_both_backends(dashboard_any: Dashboard, tmp_path: Path) -> None:
    """Log in, see the overview, and see a newly enrolled host arrive over SSE without reloading."""
    dash = dashboard_any
    t = dash.tenant(site_name="edge-1")
    b = dash.browser()
    b.login(dash.user(t, "owner"))
    r = b.get("/ui/", follow=True)
    assert r.status == 200 and "edge-1" in r.text and _overview_numbers(r.text) == (0, 0)
    assert f'sse-connect="/ui/t/{t.tenant_id}/events/overview"' in r.text
    stream = b.stream(f"/ui/t/{t.tenant_id}/events/overview")
    events: list[Any] = []
    reader = threading.Thread(target=lambda: events.append(stream.next_event()), daemon=True)
    reader.start()
    try:
        dash.agent(t, tmp_path, hostname="fresh-host")
        reader.join(10)
        assert events and events[0] is not None and events[0].event == "overview"
        assert _overview_numbers(events[0].data)[0] >= 1 or "ONLINE" in events[0].data
    finally:
        stream.close()
    assert _overview_numbers(b.get(f"/ui/t/{t.tenant_id}/").text) == (1, 0)
    admin = dash.browser()
    admin.login(dash.admin)
    r = admin.get("/ui/", follow=True)
    assert r.path == "/ui/tenants" and f"/ui/t/{t.tenant_id}/" in r.text
    assert admin.get(f"/ui/t/{t.tenant_id}/").status == 200  # an admin sees every tenant


def test_live_overview_ends_when_the_session_is_revoked(dashboard: Dashboard, tmp_path: Path) -> None:
    t = dashboard.tenant()
    owner_user = dashboard.user(t, "owner")
    watcher, owner = dashboard.browser(), dashboard.browser()
    watcher.login(dashboard.user(t, "viewer"))
    owner.login(owner_user)
    stream = watcher.stream(f"/ui/t/{t.tenant_id}/events/overview")
    try:
        page = owner.get(f"/ui/t/{t.tenant_id}/access")
        [revoke] = [a for a in post_forms(page) if "/sessions/" in a]
        assert owner.post(revoke, csrf=owner.csrf(page)).status == 303
        dashboard.agent(t, tmp_path)  # a change: the stream re-checks the session before sending, and ends
        assert stream.next_event() is None
    finally:
        stream.close()


# --- the UI flag ----------------------------------------------------------------------------------------------


def test_ui_off_serves_no_dashboard_and_the_api_is_unchanged(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "cp", extra=[*UI_FAST, "--no-ui"])
    try:
        b = Browser(srv)
        for path in ("/ui/", "/ui/login", "/ui/static/app.css"):
            r = b.get(path)
            assert r.status == 404 and r.header("Content-Type") == "application/json", path
        admin = srv.client(admin=True)
        tid = admin.call("POST", "/tenants", {"slug": "t-" + uuid.uuid4().hex[:8], "name": "x"})["id"]
        assert any(x["id"] == tid for x in admin.call("GET", "/tenants")["tenants"])
        admin.close()
    finally:
        srv.stop()
