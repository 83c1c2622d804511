"""The dashboard in a real browser (issue 13): Debian's Chromium driven by Playwright, against a real control plane.

Why it is shaped like this:
- One private network namespace for the whole package (entered by the test thread, left after the last test
  here): the control plane, the agents (which attach TAPs to the namespace's own ``br0``) and the browser, which
  the Playwright driver starts from this thread, all live in it, so nothing touches the machine's network and
  the browser reaches the server on the namespace's loopback.
- One browser per run (starting Chromium costs about a second), one control plane for the package (each test
  uses its own tenant), and a fresh browser context per test (its own cookies: one context is one person).
- Every page a test opens is watched: a console error, an uncaught exception, a Content-Security-Policy
  violation, a failed or 4xx/5xx request to our own origin, or a JavaScript dialog fails the test at teardown
  (unless the tab was opened with ``strict=False`` because the test provokes one on purpose). The CSP listener
  is an init script: Playwright injects those through the DevTools protocol, which the page's CSP does not
  govern, so watching cannot weaken what is watched.
- Nothing is downloaded: the browser is ``/usr/bin/chromium`` (``scripts/ci-chromium.sh`` installs it), axe-core
  is vendored under ``tests/ui/vendor`` and checked against its SHA256SUMS before use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    Playwright,
    Request,
    Response,
    ViewportSize,
    sync_playwright,
)

from tests.conftest import entered_netns, skip_or_fail
from tests.cp.helpers import REPO, Agent, Server, Tenant, create_action, start_server
from tests.e2e.conftest import EdgeHost, wait_for

CHROMIUM = Path("/usr/bin/chromium")
#: Root needs --no-sandbox; the rest keep Chromium from calling Google hosts (this network refuses them, and a
#: test must not depend on the outside world) and from doing work a test does not need.
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
VENDOR = Path(__file__).resolve().parent / "vendor"
AXE = VENDOR / "axe-4.14.1.min.js"
SHOTS = REPO / "artifacts" / "screenshots"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
#: axe impacts that fail a page (issue 13: "no serious or critical violations").
FAILING_IMPACTS = frozenset({"serious", "critical"})
#: The two payloads every place that shows stored or agent-supplied text must display literally.
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = '"><script>alert(1)</script>'

#: Asked for by the browser itself when a page has no ``<link rel="icon">``: reported on its own
#: (test_dashboard_security.test_pages_name_their_icon), so that one missing link fails one test, not every one.
FAVICON = "/favicon.ico"
CSP_WATCH = """
document.addEventListener('securitypolicyviolation', (e) => {
  window.__nkudoCspViolation(`${e.violatedDirective} blocked ${e.blockedURI || '(inline)'} in ${e.sourceFile}:${e.lineNumber}`);
});
"""

# Short timings so agents go ONLINE/OFFLINE and leases expire within seconds; limits out of the way of a suite
# that enrolls and signs in many times from 127.0.0.1 (the limits have their own tests in tests/cp).
SERVER_FLAGS = ["--lease-ttl", "3", "--offline-after", "3", "--sweep-interval", "0.5", "--heartbeat-interval", "1",
                "--renew-grace", "1", "--rate-limit-enroll", "6000/min:1000", "--rate-limit-login", "6000/min:1000",
                "--lockout-threshold", "1000"]


@functools.cache
def axe_source() -> str:
    """The vendored axe-core, after checking it is the file SHA256SUMS names (a swapped file is a failure)."""
    want = {}
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        want[name.strip()] = digest.strip()
    data = AXE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == want[AXE.name], f"{AXE} does not match {VENDOR / 'SHA256SUMS'}"
    return data.decode()


@dataclass
class Watch:
    """Everything that went wrong in one browser context, as readable lines."""

    origin: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    #: confirm() dialogs the test announced (``Tab.expect_confirm``) are accepted and listed here instead
    confirms_expected: int = 0
    confirmed: list[str] = field(default_factory=list)
    #: refusals the test provokes on purpose (``Tab.expect_status``): a response with one of these statuses
    #: (and the console's note about it) is expected once per entry, not a failure
    statuses_expected: list[int] = field(default_factory=list)
    expected_urls: set[str] = field(default_factory=set)
    #: the browser asked for /favicon.ico and got an error (a page without an icon link)
    icon_missing: bool = False

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("requestfailed", self._request_failed)
        page.on("response", self._response)
        page.on("dialog", self._dialog)

    def csp_violation(self, text: str) -> None:
        self.csp_violations.append(text)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error" and msg.location.get("url", "").endswith(FAVICON):
            self.icon_missing = True  # the browser's own request when a page names no icon: one test owns it
        elif msg.type == "error" and msg.location.get("url", "") in self.expected_urls:
            pass
        elif msg.type == "error":
            self.console_errors.append(f"{msg.text} ({msg.location.get('url', '')})")

    def _request_failed(self, request: Request) -> None:
        # A request the browser itself abandons (an event stream or a fetch when the page navigates away) is
        # ERR_ABORTED: not a failure of the server. Anything else of ours (refused, reset, blocked, and
        # ERR_NETWORK_CHANGED, which ui_netns prevents) is a failure.
        failure = request.failure or ""
        if request.url.startswith(self.origin) and "ERR_ABORTED" not in failure:
            self.failed_requests.append(f"{request.method} {request.url}: {failure}")

    def _response(self, response: Response) -> None:
        if response.url == self.origin + FAVICON:
            self.icon_missing = self.icon_missing or response.status >= 400
        elif response.url.startswith(self.origin) and response.status in self.statuses_expected:
            self.statuses_expected.remove(response.status)
            self.expected_urls.add(response.url)
        elif response.url.startswith(self.origin) and response.status >= 400:
            self.failed_requests.append(f"{response.request.method} {response.url}: HTTP {response.status}")

    def _dialog(self, dialog: Dialog) -> None:
        if dialog.type == "confirm" and self.confirms_expected > 0:
            self.confirms_expected -= 1
            self.confirmed.append(dialog.message)
            dialog.accept()
            return
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def problems(self) -> list[str]:
        return [*(f"console error: {x}" for x in self.console_errors),
                *(f"uncaught exception: {x}" for x in self.page_errors),
                *(f"CSP violation: {x}" for x in self.csp_violations),
                *(f"failed request: {x}" for x in self.failed_requests),
                *(f"dialog: {x}" for x in self.dialogs)]


@dataclass
class Tab:
    """One person in the browser: a context (its own cookies) with one page, watched."""

    context: BrowserContext
    page: Page
    watch: Watch
    base: str
    strict: bool

    def url(self, path: str) -> str:
        return self.base + path

    def goto(self, path: str) -> Response | None:
        """Open a dashboard path; a page that does not answer 200 (after redirects) fails the test."""
        response = self.page.goto(self.url(path))
        assert response is not None and response.status == 200, (path, response and response.status)
        return response

    def login(self, email: str, password: str, *, next_path: str = "") -> None:
        """Sign in through the login form (submitted with Enter, as a person would)."""
        self.goto("/ui/login" + (f"?next={next_path}" if next_path else ""))
        self.page.fill("input[name=email]", email)
        self.page.fill("input[name=password]", password)
        with self.page.expect_navigation():
            self.page.press("input[name=password]", "Enter")
        assert "/ui/login" not in self.page.url, self.page.inner_text("main")

    def nav(self, name: str) -> Locator:
        """A link of the main navigation."""
        return self.page.get_by_role("navigation", name="Main").get_by_role("link", name=name, exact=True)

    def expect_status(self, status: int) -> None:
        """The next response with ``status`` is a refusal the test provokes (e.g. a form with an error)."""
        self.watch.statuses_expected.append(status)

    def expect_confirm(self) -> None:
        """The next confirm() (a destructive button asking first) is the person saying yes."""
        self.watch.confirms_expected += 1

    def path(self) -> str:
        return self.page.url.removeprefix(self.base).split("#")[0]

    def shoot(self, name: str) -> None:
        """Desktop (1280x800) and phone (390x844) screenshots of the current page, as test artefacts."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        for suffix, size in (("desktop", DESKTOP), ("phone", PHONE)):
            self.page.set_viewport_size(size)
            self.page.screenshot(path=str(SHOTS / f"{name}-{suffix}.png"))
        self.page.set_viewport_size(DESKTOP)

    def axe(self) -> list[str]:
        """axe-core's serious and critical violations on the current page (empty: none).

        Why ``evaluate`` and not ``add_script_tag``: the latter inserts an inline ``<script>``, which our own
        CSP rightly blocks (and reports as a violation); evaluating through the DevTools protocol is not
        subject to the page's CSP and leaves no trace in the page.
        """
        if not self.page.evaluate("typeof window.axe !== 'undefined'"):
            self.page.evaluate(axe_source())
        found: list[dict[str, Any]] = self.page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
            " nodes: v.nodes.slice(0, 5).map(n => n.target.join(' '))}))")
        return [f"{v['id']} ({v['impact']}): {v['help']} at {v['nodes']}" for v in found
                if v["impact"] in FAILING_IMPACTS]

    def problems(self) -> list[str]:
        return self.watch.problems()


class Browsers:
    """Opens watched tabs on one browser; the fixture closes them and checks the strict ones."""

    def __init__(self, browser: Browser, server: Server) -> None:
        self.browser = browser
        self.server = server
        self.tabs: list[Tab] = []

    def open(self, *, strict: bool = True, storage_state: dict[str, Any] | None = None) -> Tab:
        """A new person (``storage_state``: already signed in, with that state's cookies)."""
        # ignore_https_errors: the server's certificate is issued by the control plane's own CA, made when the
        # server first started, for 127.0.0.1; teaching Chromium that CA would need an NSS database per run.
        # Trust is not what these tests are about (tests/cp covers TLS); every request still goes over TLS.
        context = self.browser.new_context(ignore_https_errors=True, viewport=DESKTOP, locale="en-GB",
                                           timezone_id="UTC", storage_state=storage_state)  # type: ignore[arg-type]
        watch = Watch(self.server.url)
        context.expose_function("__nkudoCspViolation", watch.csp_violation)
        context.add_init_script(CSP_WATCH)
        context.set_default_timeout(15_000)
        page = context.new_page()
        watch.attach(page)
        tab = Tab(context, page, watch, self.server.url, strict)
        self.tabs.append(tab)
        return tab

    def close(self) -> list[str]:
        problems = []
        for tab in self.tabs:
            if tab.strict:
                problems += tab.problems()
            tab.context.close()
        self.tabs.clear()
        return problems


@dataclass(frozen=True)
class User:
    email: str
    password: str


def create_user(server: Server, email: str, *, admin: bool = False, tenant_id: str | None = None,
                role: str | None = None) -> User:
    """A dashboard user made the way an operator makes one: ``nkudo-control-plane user create`` on the data dir."""
    password = "pw-" + uuid.uuid4().hex
    args = [sys.executable, "-m", "nkudo.cp.cli", "user", "create", "--data-dir", str(server.data_dir),
            "--email", email, "--password-stdin"]
    if server.database_url:
        args += ["--database-url", server.database_url]
    if admin:
        args.append("--admin")
    if tenant_id:
        args += ["--tenant-id", tenant_id, "--role", role or "viewer"]
    r = subprocess.run(args, input=password + "\n", capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return User(email, password)


@pytest.fixture(scope="package")
def ui_netns() -> Iterator[str]:
    """The package's private network namespace (loopback and ``br0`` up), entered by the test thread."""
    if os.geteuid() != 0:
        skip_or_fail("the browser tests need root (a network namespace with a bridge for the agents' TAPs)")
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail("Chromium is not installed at /usr/bin/chromium (scripts/ci-chromium.sh installs it)")
    name = f"nkui-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # No IPv6 on the interfaces made from here on (br0, the agents' TAPs): a TAP joining br0 gives the
        # bridge a new link-local address, and Chromium answers any address change in its namespace by
        # dropping what it has in flight (ERR_NETWORK_CHANGED: a page's htmx once). Loopback keeps ::1.
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"],
                       check=True)
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                    ["link", "set", "br0", "up"]):
            subprocess.run(["ip", "-n", name, *cmd], check=True)
        with entered_netns(name):
            yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="package")
def ui_server(ui_netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("ui-cp"), extra=SERVER_FLAGS)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="package")
def admin_user(ui_server: Server) -> User:
    return create_user(ui_server, "admin@example.test", admin=True)


@pytest.fixture(scope="package")
def playwright(ui_netns: str) -> Iterator[Playwright]:
    # Started here, inside the namespace: the driver (and so the browser) inherits it.
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    b = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def ui(browser: Browser, ui_server: Server) -> Iterator[Browsers]:
    """Watched tabs for one test; at the end every strict tab must have seen no error of any kind."""
    tabs = Browsers(browser, ui_server)
    try:
        yield tabs
    finally:
        problems = tabs.close()
    if problems:
        pytest.fail("the browser saw problems:\n  " + "\n  ".join(problems), pytrace=False)


def slug(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_tenant(server: Server, name: str, site_name: str) -> Tenant:
    """A tenant (with the given display name), its API key and one site, made through the JSON API."""
    admin = server.client(admin=True)
    try:
        tid = admin.call("POST", "/tenants", {"slug": slug("t"), "name": name})["id"]
        key = admin.call("POST", f"/tenants/{tid}/api-keys", {"name": "automation"})["api_key"]
    finally:
        admin.close()
    c = server.client(api_key=key)
    sid = c.call("POST", f"/tenants/{tid}/sites", {"name": site_name})["id"]
    return Tenant(server, tid, key, sid, c)


def agents_of(t: Tenant, site_id: str | None = None) -> list[dict[str, Any]]:
    return list(t.client.call("GET", f"/sites/{site_id or t.site_id}/agents")["agents"])


def plan_done(t: Tenant, plan_id: str) -> dict[str, Any] | None:
    plan = t.client.call("GET", f"/plans/{plan_id}")
    return plan if plan["plan_status"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None


def vm_create(host: EdgeHost, vm_id: str, **over: Any) -> dict[str, Any]:
    """A MicroVMCreate the simulator can run on ``host`` (its kernel under the agent's image root)."""
    return create_action(vm_id, kernel_path=str(host.images / "vmlinux"), **over)


@contextlib.contextmanager
def edge_host(server: Server) -> Iterator[EdgeHost]:
    """An edge host's directories and simulator (not yet enrolled); its agent and VMMs are ended afterwards."""
    root = Path(f"/tmp/nkui-{uuid.uuid4().hex[:8]}")  # short: API socket paths must fit in 108 bytes
    root.mkdir()
    h = EdgeHost(root, server)
    try:
        yield h
    finally:
        h.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def start_agent(h: EdgeHost, t: Tenant) -> str:
    """Enroll ``h`` into ``t``'s site through the API, start its agent, wait for it to be ONLINE; its id."""
    r = h.enroll(t.token())
    assert r.returncode == 0, r.stderr
    h.start()
    return online_agent(t, h)


def online_agent(t: Tenant, h: EdgeHost, site_id: str | None = None) -> str:
    status = h.edge("status", "--json", "--pki-dir", str(h.pki))
    agent_id = str(json.loads(status.stdout)["agent_id"])
    wait_for(lambda: any(a["id"] == agent_id and a["state"] == "ONLINE" for a in agents_of(t, site_id)),
             what=f"agent {agent_id} online")
    return agent_id


@dataclass
class Seeded:
    """A site with a simulated agent, a VM it reports, and a finished plan with log lines: every page has content."""

    tenant: Tenant
    agent: Agent
    vm_id: str
    plan_id: str
    execution_id: str


def seed_site(server: Server, workdir: Path, *, tenant_name: str, site_name: str, texts: list[str],
              hostname: str | None = None) -> Seeded:
    """Put ``texts`` everywhere free text reaches a page: the tenant and site names, an API key name, the agent's
    version, labels and host facts (enrollment and heartbeat), an execution's result message and its log lines.

    Why a simulated agent (``tests.cp.helpers.Agent``) here: it speaks the real wire protocol over mTLS, but
    can send the host facts and messages a test chooses, which is the point for the escaping tests.
    """
    t = make_tenant(server, tenant_name, site_name)
    first, last = texts[0], texts[-1]
    for i, text in enumerate(texts):
        t.client.call("POST", f"/tenants/{t.tenant_id}/api-keys", {"name": f"{text} {i}"})
    agent = Agent(server, workdir, hostname=hostname)
    st, out = agent.enroll_raw(t.token(), agent_version=first, labels={"rack": last})
    assert st == 200, out
    agent.install(out["client_certificate_pem"])
    agent.enrolled = out
    vm_id = "vm-" + uuid.uuid4().hex[:6]
    facts = {"cpu_cores": 8, "memory_total_bytes": 16 << 30, "storage_total_bytes": 200 << 30, "kvm_available": True,
             "cloud_hypervisor_available": True, "os": first, "arch": "amd64", "kernel": last,
             "disks": [{"mountpoint": "/var/lib/nkudo", "total_bytes": 200 << 30, "free_bytes": 120 << 30}]}
    vms = [{"vm_id": vm_id, "state": "RUNNING", "name": vm_id, "vcpus": 2, "memory_mib": 512}]
    agent.heartbeat(heartbeat_seq=1, agent_version=first, host_facts=facts, vms=vms)
    plan = t.plan([create_action("vm-" + uuid.uuid4().hex[:6])])
    hb = agent.heartbeat(heartbeat_seq=2, agent_version=first, host_facts=facts, vms=vms)
    [leased] = hb["pending_plans"]
    eid = leased["actions"][0]["execution_id"]
    agent.heartbeat(heartbeat_seq=3, vms=vms, execution_updates=[{"execution_id": eid, "message": first}])
    st, _ = agent.post("/v1/logs", {"execution_id": eid, "lines": [
        {"seq": i, "message": text, "level": "INFO"} for i, text in enumerate(["starting", *texts])]})
    assert st == 202
    agent.results([{"execution_id": eid, "status": "SUCCEEDED", "message": last}])
    return Seeded(t, agent, vm_id, plan["plan_id"], eid)
