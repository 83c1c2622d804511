"""Fixtures for the dashboard tests: a real control plane (TLS, UI on), users, tenants, agents, and a browser-ish
HTTP client that keeps cookies.

Use:

* ``dashboard`` (module scope, SQLite): a ``Dashboard`` around a running ``nkudo-control-plane serve``
  process (tests/cp/helpers.start_server) with an admin user (``dashboard.admin``). ``dashboard_any`` is the
  same, once on SQLite and once on PostgreSQL (for the tests that must pass on both).
* ``dashboard.tenant()``: a new tenant with an API key and a site (helpers.new_tenant).
* ``dashboard.user(tenant, role)``: a new user with that role in the tenant, made with the real admin CLI
  (``nkudo-control-plane user create``); returns a ``User`` (email, password).
* ``dashboard.agent(tenant, tmp_path)``: a simulated agent (helpers.Agent) enrolled into the tenant's site, with
  one heartbeat sent (so its host is online).
* ``dashboard.browser()``: a ``Browser``: stdlib HTTPS (the server's CA verified, no mocks) with a cookie jar
  that honours Path, Max-Age and deletion, ``get``/``post``/``login``, and ``csrf()`` reading the token of the
  last page. Every response keeps its raw ``Set-Cookie`` headers so tests can check the cookie flags.

Why a stdlib client and not aiohttp's: the tests stay synchronous like the rest of tests/cp, and the client
is independent of the server's HTTP stack. The real-browser tests (tests/ui) use Chromium on the same fixture.
"""

from __future__ import annotations

import http.client
import re
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest

from tests.cp.conftest import FAST
from tests.cp.helpers import REPO, Agent, Server, Tenant, new_tenant, start_server

#: The dashboard tests sign in a few dozen times from 127.0.0.1: the strict LOGIN rate limit (10/min) is tested
#: on its own (test_web_core.test_login_rate_limit_is_a_readable_page) with a server of its own.
UI_FAST = [*FAST, "--rate-limit-login", "6000/min:1000"]
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass(frozen=True)
class User:
    email: str
    password: str
    user_id: str = ""


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes
    path: str

    @property
    def text(self) -> str:
        return self.body.decode()

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")


@dataclass
class SseEvent:
    event: str
    data: str


@dataclass
class EventStream:
    """One open SSE response: ``next_event`` returns the next event (comments such as keepalives skipped)
    or None when the server ended the stream; a read timeout raises ``TimeoutError``."""

    conn: http.client.HTTPSConnection
    resp: http.client.HTTPResponse

    @property
    def status(self) -> int:
        return self.resp.status

    def header(self, name: str) -> str | None:
        return self.resp.headers.get(name)

    def next_event(self) -> SseEvent | None:
        event, data = "message", list[str]()
        while True:
            raw = self.resp.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\n")
            if not line:
                if data:
                    return SseEvent(event, "\n".join(data))
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Browser:
    """A minimal cookie-keeping HTTPS client for server-rendered pages (follows no redirect unless asked)."""

    server: Server
    cookies: dict[str, str] = field(default_factory=dict)
    last: Response | None = None
    last_page: Response | None = None  # the last HTML page that carried a CSRF token

    def _ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.server.ca_file))

    def request(self, method: str, path: str, *, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, body: bytes | None = None) -> Response:
        conn = http.client.HTTPSConnection("127.0.0.1", self.server.port, context=self._ctx(), timeout=30)
        h = {"User-Agent": "nkudo-test-browser/1", **(headers or {})}
        if self.cookies and path.startswith("/ui/"):  # every cookie of ours is Path=/ui/
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            h["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            resp = Response(r.status, r.headers, r.read(), path)
        finally:
            conn.close()
        self._store(resp)
        self.last = resp
        if "text/html" in (resp.header("Content-Type") or "") and _CSRF.search(resp.text):
            self.last_page = resp
        return resp

    def _store(self, resp: Response) -> None:
        for raw in resp.set_cookies:
            jar: SimpleCookie = SimpleCookie()
            jar.load(raw)
            for name, morsel in jar.items():
                gone = morsel["max-age"] == "0" or (morsel["expires"] and "1970" in morsel["expires"])
                if gone or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value

    def get(self, path: str, *, follow: bool = False, headers: dict[str, str] | None = None) -> Response:
        resp = self.request("GET", path, headers=headers)
        for _ in range(5):
            if not follow or resp.status not in (301, 302, 303, 307, 308) or not resp.location:
                break
            resp = self.request("GET", resp.location)
        return resp

    def csrf(self, page: Response | None = None) -> str:
        """The CSRF token of a page (default: the last page fetched that had one)."""
        resp = page or self.last_page
        assert resp is not None
        m = _CSRF.search(resp.text)
        assert m, f"no csrf_token on {resp.path}"
        return m.group(1)

    def post(self, path: str, form: dict[str, str] | None = None, *, csrf: str | None = None,
             headers: dict[str, str] | None = None) -> Response:
        """POST a form; ``csrf`` defaults to the token of the last page fetched (pass "" to send none)."""
        data = dict(form or {})
        token = self.csrf() if csrf is None else csrf
        if token:
            data["csrf_token"] = token
        return self.request("POST", path, form=data, headers=headers)

    def stream(self, path: str, timeout: float = 15.0) -> EventStream:
        """Open a server-sent-events stream (with this browser's cookies); read it with ``next_event``."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.server.port, context=self._ctx(), timeout=timeout)
        h = {"Accept": "text/event-stream", "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        conn.request("GET", path, headers=h)
        return EventStream(conn, conn.getresponse())

    def login(self, user: User, next_path: str | None = None) -> Response:
        """Sign in through the login form (GET for the pre-session token, POST); returns the 303."""
        self.get("/ui/login" + (f"?next={urllib.parse.quote(next_path)}" if next_path else ""))
        form = {"email": user.email, "password": user.password}
        if next_path:
            form["next"] = next_path
        resp = self.post("/ui/login", form)
        assert resp.status == 303, (resp.status, resp.text[:500])
        return resp


@dataclass
class Dashboard:
    """A running control plane with the UI, and helpers to populate it."""

    server: Server
    admin: User
    agents: list[Agent] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def browser(self) -> Browser:
        return Browser(self.server)

    def cli(self, *args: str, stdin: str | None = None) -> str:
        """Run the real admin CLI against this server's database (as an operator would)."""
        db = ["--database-url", self.server.database_url] if self.server.database_url else []
        cmd = [sys.executable, "-m", "nkudo.cp.cli", *args[:2], "--data-dir", str(self.server.data_dir), *db,
               *args[2:]]
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr + out.stdout
        return out.stdout.strip()

    def create_user(self, email: str | None = None, *, admin: bool = False, tenant: Tenant | None = None,
                    role: str | None = None) -> User:
        email = email or f"u-{uuid.uuid4().hex[:10]}@example.com"
        password = "pw-" + uuid.uuid4().hex
        args = ["user", "create", "--email", email, "--password-stdin"]
        if admin:
            args.append("--admin")
        if tenant is not None:
            args += ["--tenant-id", tenant.tenant_id, "--role", role or "viewer"]
        out = self.cli(*args, stdin=password + "\n")
        return User(email, password, out.split()[-1] if out else "")

    def user(self, tenant: Tenant, role: str = "owner") -> User:
        return self.create_user(tenant=tenant, role=role)

    def tenant(self, site_name: str | None = None) -> Tenant:
        t = new_tenant(self.server)
        if site_name is not None:
            t.site_id = t.client.call("POST", f"/tenants/{t.tenant_id}/sites", {"name": site_name})["id"]
        return t

    def agent(self, tenant: Tenant, workdir: Path, hostname: str | None = None, **heartbeat: Any) -> Agent:
        a = Agent(self.server, workdir, hostname).enroll(tenant.token())
        a.heartbeat(**{"heartbeat_seq": 1, "agent_version": "test-1", **heartbeat})
        self.agents.append(a)
        return a


def start_dashboard(data_dir: Path, database_url: str | None = None, extra: list[str] | None = None) -> Dashboard:
    srv = start_server(data_dir, database_url=database_url, extra=[*UI_FAST, *(extra or [])])
    dash = Dashboard(srv, User("", ""))
    try:
        dash.admin = dash.create_user("admin-" + uuid.uuid4().hex[:8] + "@example.com", admin=True)
    except BaseException:
        srv.stop()
        raise
    return dash


def _stop(dash: Dashboard) -> None:
    for a in dash.agents:
        a.close()
    dash.server.stop()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    dash = start_dashboard(tmp_path_factory.mktemp("ui-sqlite"))
    try:
        yield dash
    finally:
        _stop(dash)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def dashboard_any(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """The dashboard on each database backend (PostgreSQL: the suite's private cluster, skipped if absent)."""
    url = request.getfixturevalue("pg_cluster").create_database() if request.param == "postgres" else None
    dash = start_dashboard(tmp_path_factory.mktemp(f"ui-{request.param}"), url)
    try:
        yield dash
    finally:
        _stop(dash)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (its value) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
