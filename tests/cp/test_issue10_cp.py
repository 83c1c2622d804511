"""Issue 10 (control plane): fail-open admin key, undecodable text, file modes, log flooding, quiet heartbeats.

Every test runs the real ``nkudo-control-plane serve`` process (SQLite file and PostgreSQL where the
database matters) and talks to it over TLS, except the pure log/codec ones.
"""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nkudo import log as nlog
from nkudo.cp import models
from nkudo.cp.config import MIN_ADMIN_KEY_CHARS, Settings, prepare_data_dir
from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.pki import CertificateAuthority
from nkudo.cp.service import ControlPlane
from nkudo.errors import ValidationError
from nkudo.wire import codec
from nkudo.wire import messages as wm

from .conftest import FAST, METRICS_TOKEN
from .helpers import Agent, Server, Tenant, new_tenant, start_server
from .pg import free_port

CP_BIN = Path(sys.executable).parent / "nkudo-control-plane"


def _env_without_key(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NKUDO_CP_ADMIN_KEY"}
    env.update(extra)
    return env


def _serve_refused(data_dir: Path, env: dict[str, str], *args: str) -> str:
    """Run ``serve``; it must exit (not serve) within the timeout. Returns its stderr."""
    try:
        r = subprocess.run([str(CP_BIN), "serve", "--data-dir", str(data_dir), "--listen",
                            f"127.0.0.1:{free_port()}", *args], env=env, capture_output=True, text=True,
                           timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the control plane started with a weak admin key")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "ADMIN_KEY_INVALID" in r.stderr, r.stderr
    assert not (data_dir / "nkudo.db").exists()  # refused before a database was created
    return r.stderr


# --- item 1: fail-open admin key ------------------------------------------------------------------


@pytest.mark.parametrize(("case", "env_key", "flag"), [
    ("empty flag", None, ""),
    ("empty variable", "", None),
    ("whitespace", "   ", None),
    ("short", "k" * (MIN_ADMIN_KEY_CHARS - 1), None),
    ("whitespace-padded short", "  " + "k" * (MIN_ADMIN_KEY_CHARS - 1) + "  ", None),
])
def test_serve_refuses_weak_admin_key(tmp_path: Path, case: str, env_key: str | None, flag: str | None) -> None:
    """Issue 10 item 1: an empty, whitespace-only or short admin key made an empty header admin; refuse to start."""
    env = _env_without_key() if env_key is None else _env_without_key(NKUDO_CP_ADMIN_KEY=env_key)
    err = _serve_refused(tmp_path / "d", env, *(["--admin-key", flag] if flag is not None else []))
    assert str(MIN_ADMIN_KEY_CHARS) in err


def test_serve_refuses_empty_or_unreadable_key_file(tmp_path: Path) -> None:
    """Issue 10 item 1: an empty admin.key (crash after create, before write) became the key ""; now an error."""
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    (empty / "admin.key").write_bytes(b"")
    assert "is empty" in _serve_refused(empty, _env_without_key())
    blank = tmp_path / "blank"
    blank.mkdir(mode=0o700)
    (blank / "admin.key").write_bytes(b"  \n")
    assert "delete" in _serve_refused(blank, _env_without_key())
    # Unreadable (we run as root, so permissions cannot make it so: a directory or non-ASCII bytes do).
    unreadable = tmp_path / "unreadable"
    (unreadable / "admin.key").mkdir(parents=True)
    assert "cannot read the admin key file" in _serve_refused(unreadable, _env_without_key())
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "admin.key").write_bytes(b"\xff" * 40)
    assert "cannot read the admin key file" in _serve_refused(garbled, _env_without_key())
    short = tmp_path / "short"
    short.mkdir()
    (short / "admin.key").write_text("tooshort\n")
    assert "at least" in _serve_refused(short, _env_without_key())


def test_generated_key_file_is_complete_private_and_stable(tmp_path: Path) -> None:
    """Issue 10 item 1: the generated admin.key is written whole (temp name, fsync, link), 0600, no temp left."""
    from nkudo.cp.config import resolve_admin_key

    key = resolve_admin_key(Settings(data_dir=tmp_path / "d"))
    assert len(key) >= MIN_ADMIN_KEY_CHARS
    assert (tmp_path / "d" / "admin.key").read_text() == key + "\n"
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "admin.key").st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["admin.key"]
    assert resolve_admin_key(Settings(data_dir=tmp_path / "d")) == key


def test_control_plane_never_holds_an_empty_admin_key(tmp_path: Path) -> None:
    """Issue 10 item 1: the service itself refuses an empty/short key, whoever builds it, and empty never matches."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        ca = CertificateAuthority.generate()
        settings = Settings(data_dir=tmp_path)
        for bad in ("", "   ", "x" * 10):
            with pytest.raises(ValidationError, match="admin key"):
                ControlPlane(settings, db, ca, bad)
        cp = ControlPlane(settings, db, ca, "A" * 40)
        assert cp.is_admin_key("A" * 40) and cp.is_admin_key("  " + "A" * 40 + " ")  # the documented rule
        for presented in ("", " ", "\t", "A" * 39):
            assert not cp.is_admin_key(presented)
        # Last line of defence: even with an empty configured key, an empty header must not compare equal.
        cp._admin_key = b""
        assert not cp.is_admin_key("") and not cp.is_admin_key("   ")
    finally:
        db.close()


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_credentials_never_authenticate(server: Server, tenant: Tenant, value: str) -> None:
    """Issue 10 item 1: empty or whitespace X-Admin-Key / X-API-Key / bearer token is 401 on every route kind."""
    c = server.client()
    try:
        body = json.dumps({"slug": "t-" + uuid.uuid4().hex[:8], "name": "x"}).encode()
        for headers in ({"X-Admin-Key": value}, {"X-API-Key": value}, {},
                        {"X-Admin-Key": value, "X-API-Key": value}):
            st, _, data = c.raw("POST", "/tenants", body, headers=headers)
            assert st == 401, (headers, data)
            st, _, data = c.raw("GET", f"/tenants/{tenant.tenant_id}/sites", headers=headers)
            assert st == 401, (headers, data)
        for headers in ({"X-Admin-Key": value}, {"Authorization": f"Bearer {value}"}, {"Authorization": value},
                        {}):
            st, _, data = c.raw("GET", "/metrics", headers=headers)
            assert st == 401, (headers, data)
        # The real credentials still work (the test would pass trivially if every request were refused).
        assert c.raw("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})[0] == 200
        assert c.raw("GET", f"/tenants/{tenant.tenant_id}/sites", headers={"X-API-Key": tenant.api_key})[0] == 200
    finally:
        c.close()


# --- item 3: undecodable text ---------------------------------------------------------------------


def test_codec_names_field_of_undecodable_text() -> None:
    """Issue 10 item 3: invalid UTF-8 was a bare UnicodeDecodeError (500); a lone surrogate was "truncated"."""
    bad_utf8 = b'{"slug":"a","name":"ok \xff"}'
    with pytest.raises(codec.WireError) as e1:
        codec.decode(bad_utf8, models.TenantCreate)
    assert e1.value.field == "name" and "UTF-8" in e1.value.message
    with pytest.raises(codec.WireError) as e2:
        codec.decode(b'{"heartbeat_seq":1,"host_facts":{"os":"\\ud800"}}', wm.HeartbeatRequest)
    assert e2.value.field == "host_facts.os" and "truncated" not in e2.value.message
    with pytest.raises(codec.WireError) as e3:
        codec.decode(b'{"heartbeat_seq":1,"host_facts":{"os":"li\\u0000nux"}}', wm.HeartbeatRequest)
    assert e3.value.field == "host_facts.os" and "NUL" in e3.value.message
    # A NUL in a pattern-checked name fails its pattern first; the message still says NUL, not the regex.
    with pytest.raises(codec.WireError) as e4:
        codec.decode(b'{"slug":"a","name":"Ac\\u0000me"}', models.TenantCreate)
    assert (e4.value.field, e4.value.message) == ("name", "text must not contain NUL characters (field name)")
    # An escaped backslash followed by "u0000" is ordinary text, not a NUL.
    assert codec.decode(b'{"host_facts":{"os":"a\\\\u0000"}}', wm.HeartbeatRequest).host_facts is not None


def _raw_tls(server: Server, data: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(server.ca_file))
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock, \
            ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(data)
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and len(out) > out.index(b"\r\n\r\n") + 4:
                break
        return out


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def test_undecodable_text_is_400_on_both_databases(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Issue 10 item 3: invalid UTF-8 / lone surrogate / NUL in a body (and junk request ids) were 500s."""
    log_before = server.log_path.stat().st_size
    admin = server.client(admin=True)
    cases = [
        ("POST", "/tenants", b'{"slug":"ok-slug","name":"Acme \xff"}', admin, "name"),
        ("POST", "/tenants", b'{"slug":"ok-slug","name":"Acme \\ud800"}', admin, "name"),
        ("POST", f"/tenants/{tenant.tenant_id}/sites", b'{"name":"dc \\u0000 one"}', tenant.client, "name"),
        ("POST", "/v1/enroll", b'{"enrollment_token":"t","csr_pem":"x","hostname":"h\xc3","host_fingerprint":{}}',
         server.client(), "hostname"),
    ]
    for method, path, body, client, field in cases:
        st, _, data = client.raw(method, path, body)
        err = json.loads(data)["error"]
        assert st == 400 and err["code"] == "INVALID_ARGUMENT" and err["field"] == field, (path, body, data)
        assert "truncated" not in err["message"]
        if b"\\u0000" in body:  # named as a NUL, not by echoing the field's pattern
            assert err["message"] == f"text must not contain NUL characters (field {field})", data
    agent = Agent(server, agent_dir).enroll(tenant.token())
    for facts in (b'{"os":"li\\u0000nux"}', b'{"os":"li\xffnux"}', b'{"os":"\\udc00"}'):
        st, _, data = agent.mtls.raw("POST", "/v1/heartbeat", b'{"heartbeat_seq":1,"host_facts":' + facts + b"}")
        err = json.loads(data)["error"]
        assert st == 400 and err["field"] == "host_facts.os", (facts, data)
    agent.heartbeat(host_facts={"os": "linux"})  # and the agent is fine afterwards
    # A request id that is not printable ASCII (here invalid UTF-8) is replaced, not stored.
    req = (b"POST /tenants HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
           b"X-Admin-Key: " + server.admin_key.encode() + b"\r\nX-Request-ID: id-\xff\xfe\r\n")
    body = json.dumps({"slug": "t-" + uuid.uuid4().hex[:10], "name": "rid"}).encode()
    st = _status(_raw_tls(server, req + b"Content-Length: %d\r\n\r\n" % len(body) + body))
    assert st == 201
    log = server.log_path.read_bytes()[log_before:]
    assert b"internal error" not in log and b"Traceback" not in log
    admin.close()
    agent.close()


# --- item 4: file modes -----------------------------------------------------------------------------


def test_data_dir_and_database_files_are_private(tmp_path: Path) -> None:
    """Issue 10 item 4: nkudo.db, -wal, -shm were 0644 in a 0755 data dir; loose existing modes get a warning."""
    fresh = tmp_path / "fresh" / "data"
    srv = start_server(fresh)
    try:
        new_tenant(srv)  # writes, so the WAL exists
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
        names = {p.name for p in fresh.iterdir()}
        assert {"nkudo.db", "nkudo.db-wal", "nkudo.db-shm"} <= names
        for name in ("nkudo.db", "nkudo.db-wal", "nkudo.db-shm", "ca.key", "server.key"):
            assert stat.S_IMODE((fresh / name).stat().st_mode) == 0o600, name
        assert b"chmod" not in srv.log_path.read_bytes()
    finally:
        srv.stop()
    # A data directory the server creates itself (with its parents) is 0700.
    prepare_data_dir(tmp_path / "made" / "here")
    assert stat.S_IMODE((tmp_path / "made" / "here").stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o755)
    (loose / "nkudo.db").touch()
    os.chmod(loose / "nkudo.db", 0o644)
    srv = start_server(loose)
    try:
        text = srv.log_path.read_text()
        assert f"fix=\"chmod 700 {loose}\"" in text, text
        assert f"fix=\"chmod 600 {loose / 'nkudo.db'}\"" in text, text
    finally:
        srv.stop()


# --- items 5 and 6: capped, summarised logs; enrollment failures logged ----------------------------


@pytest.fixture
def captured_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    buf = io.StringIO()
    monkeypatch.setattr(nlog, "_repeats", nlog._Repeats())
    nlog.configure("info", "text", stream=buf)
    try:
        yield buf
    finally:
        nlog.configure("info", "text")


def test_log_values_are_capped_and_say_so(captured_log: io.StringIO) -> None:
    """Issue 10 item 5: one malformed request produced a 115 kB log line; every value is capped with a note."""
    nlog.get_logger("t").info("x" * 5000, data="y" * 115_000, error=ValueError("z" * 50_000))
    line = captured_log.getvalue()
    assert len(line) < 4 * nlog.VALUE_CAP and "[cut 113976 chars]" in line and "[cut 3976 chars]" in line
    js = nlog.format_record(0.0, "info", "m", "c", {"data": "y" * 115_000, "facts": {"a": 1}}, "json")
    assert len(js) < 2 * nlog.VALUE_CAP and json.loads(js)["facts"] == {"a": 1}


def test_repeated_failures_are_summarised(captured_log: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 5: identical failures from one source are one line plus a count, not one line each."""
    monkeypatch.setattr(nlog, "REPEAT_WINDOW", 0.3)
    lg = nlog.get_logger("t")
    for _ in range(50):
        lg.warn("enrollment refused", source="10.0.0.1", reason="TOKEN_INVALID")
    lg.warn("enrollment refused", source="10.0.0.2", reason="TOKEN_INVALID")  # another source: its own line
    lg.info("info lines are never summarised")
    lg.info("info lines are never summarised")
    lines = captured_log.getvalue().splitlines()
    assert len(lines) == 4, lines
    time.sleep(0.35)
    nlog.flush_repeats()
    last = captured_log.getvalue().splitlines()[-1]
    assert "source=10.0.0.1" in last and "repeated=49" in last


@pytest.fixture(scope="module")
def log_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own: the repeat summary is per process, other tests' failures must not mask ours."""
    srv = start_server(tmp_path_factory.mktemp("cp-log"), extra=FAST)
    try:
        yield srv
    finally:
        srv.stop()


def test_malformed_requests_do_not_flood_the_log(log_server: Server) -> None:
    """Issue 10 item 5: a malformed chunked request logged 115 kB; now capped and repeated ones summarised."""
    before = log_server.log_path.stat().st_size
    junk = b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"Z" * 115_000 + b"\r\n"
    for _ in range(10):
        resp = _raw_tls(log_server, junk)
        assert resp.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), resp[:200]
    time.sleep(0.3)
    text = log_server.log_path.read_bytes()[before:].decode(errors="replace")
    lines = text.splitlines()
    assert all(len(ln) < 4 * nlog.VALUE_CAP for ln in lines), max(len(ln) for ln in lines)
    assert len(lines) <= 2, lines


def test_failed_enrollments_are_logged_without_the_token(log_server: Server, agent_dir: Path) -> None:
    """Issue 10 item 6: bad-token enrollments left no log line; now source and reason, summarised, no token."""
    before = log_server.log_path.stat().st_size
    agent = Agent(log_server, agent_dir)
    secret = "guess-" + uuid.uuid4().hex
    for _ in range(20):
        st, out = agent.enroll_raw(secret)
        assert st == 401 and out["error"]["code"] == "TOKEN_INVALID"
    time.sleep(0.3)
    text = log_server.log_path.read_bytes()[before:].decode()
    refused = [ln for ln in text.splitlines() if "enrollment refused" in ln]
    assert len(refused) == 1, text
    assert "source=127.0.0.1" in refused[0] and "reason=TOKEN_INVALID" in refused[0]
    assert secret not in text


# --- the quiet heartbeat path re-checks authorisation ------------------------------------------------


def _replicas(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> list[Server]:
    if backend == "postgres":
        url = request.getfixturevalue("pg_cluster").create_database()
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    extra = [*FAST, "--ca-cert-file", str(tmp_path / "ca.crt"), "--ca-key-file", str(tmp_path / "ca.key")]
    key = "quiet-admin-" + uuid.uuid4().hex
    servers: list[Server] = []
    try:
        for i in range(2):
            servers.append(start_server(tmp_path / f"r{i}", database_url=url, admin_key=key, extra=extra))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def _quiet_then_refused(hb: Agent, actor: Agent, *, revoke: bool) -> None:
    """Heartbeats on ``hb`` (quiet after the first), then unenroll or renew via ``actor``; next one is a 401."""
    for seq in range(1, 6):
        hb.heartbeat(heartbeat_seq=seq)
    if revoke:
        st, out = actor.post("/v1/renew", {"csr_pem": actor.csr(), "refresh_token": actor.enrolled["refresh_token"]})
        assert st == 200, out
        time.sleep(1.3)  # past --renew-grace 1: the old certificate is revoked
        want = "CERTIFICATE_REVOKED"
    else:
        st, _ = actor.post("/v1/unenroll", {"reason": "decommissioned"})
        assert st == 204
        want = "AGENT_UNENROLLED"
    st, out = hb.post("/v1/heartbeat", {"heartbeat_seq": 6})
    assert st == 401 and out["error"]["code"] == want, out


@pytest.mark.parametrize("revoke", [False, True], ids=["unenroll", "revoke"])
def test_quiet_heartbeat_rechecks_authorisation_one_replica(server: Server, tenant: Tenant, agent_dir: Path,
                                                            revoke: bool) -> None:
    """Issue 10: a cached authorisation on the quiet heartbeat path passed every test; unenroll/revoke is a 401."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    if revoke:  # the heartbeating client keeps the old certificate; the renewing one installs nothing
        other = Agent(server, agent_dir)
        other.enrolled, other.key = agent.enrolled, agent.key
        other.install(agent.enrolled["client_certificate_pem"])
        _quiet_then_refused(agent, other, revoke=True)
        other.close()
    else:
        _quiet_then_refused(agent, agent, revoke=False)
    agent.close()


@pytest.mark.parametrize("revoke", [False, True], ids=["unenroll", "revoke"])
def test_quiet_heartbeat_rechecks_authorisation_two_replicas(backend: str, request: pytest.FixtureRequest,
                                                             tmp_path: Path, revoke: bool) -> None:
    """Issue 10: heartbeats on replica A, unenroll/renew on replica B; A's next quiet-path heartbeat is a 401."""
    servers = _replicas(backend, request, tmp_path)
    try:
        tenant = new_tenant(servers[0])
        a = Agent(servers[0], tmp_path / "agents").enroll(tenant.token())
        b = Agent(servers[1], tmp_path / "agents")
        b.enrolled, b.key = a.enrolled, a.key
        b.install(a.enrolled["client_certificate_pem"])
        b.heartbeat(heartbeat_seq=0)
        _quiet_then_refused(a, b, revoke=revoke)
        a.close()
        b.close()
    finally:
        for s in servers:
            s.stop()
