"""Issue 12 part 1: rate limits and lock-out on the real server (SQLite and PostgreSQL, two replicas).

Each server here trusts 127.0.0.1 as a proxy, so a test picks its client's address with
``X-Forwarded-For`` and gets fresh buckets and lock-out rows without restarting anything; the rule that
an untrusted peer's header is ignored is tested on a server that does not trust it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nkudo.cp.pki import CertificateAuthority

from .conftest import FAST
from .helpers import Agent, Server, new_tenant, start_server
from .pg import Cluster

LIMITS = ["--trusted-proxy", "127.0.0.1/32", "--rate-limit-enroll", "6/min:4", "--rate-limit-heartbeat", "6/min:3",
          "--rate-limit-default", "600/min:600", "--lockout-threshold", "3", "--lockout-window", "60",
          "--lockout-base", "1.5", "--lockout-max", "6"]


@pytest.fixture(scope="module")
def rl_server(backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Server]:
    # A database of its own: this server has its own CA (and audit signing key), and the checkpoints it signs
    # at shutdown would break the session server's verification of a shared database's chains.
    url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgres" else None
    srv = start_server(tmp_path_factory.mktemp(f"rl-{backend}"), database_url=url, extra=[*FAST, *LIMITS])
    try:
        yield srv
    finally:
        srv.stop()


def _addr() -> str:
    """A fresh client address (its own buckets and lock-out rows)."""
    n = uuid.uuid4().int
    return f"10.{n % 250 + 1}.{(n >> 8) % 250 + 1}.{(n >> 16) % 250 + 1}"


def _req(srv: Server, method: str, path: str, *, xff: str | None = None, body: Any = None,
         admin_key: str | None = None, api_key: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {}
    if xff:
        headers["X-Forwarded-For"] = xff
    if admin_key:
        headers["X-Admin-Key"] = admin_key
    if api_key:
        headers["X-API-Key"] = api_key
    c = srv.client()
    try:
        st, h, data = c.raw(method, path, None if body is None else json.dumps(body).encode(), headers)
    finally:
        c.close()
    return st, h, (json.loads(data) if data else None)


def _metric(srv: Server, name: str, **labels: str) -> float:
    st, _, text = srv.client(admin=True).raw("GET", "/metrics")
    assert st == 200
    for line in text.decode().splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(m.group(4))
    return 0.0


def test_enroll_flood_gets_429_with_retry_after_from_the_bucket(rl_server: Server) -> None:
    """Issue 12: token buckets per (client, class) before routing and auth; 429 RATE_LIMITED, the route
    class, and a Retry-After computed from the bucket (6/min: one token every 10 s), counted in /metrics."""
    ip = _addr()
    before = _metric(rl_server, "nkudo_cp_rate_limit_requests_total", route_class="enroll", outcome="rejected")
    got = [_req(rl_server, "POST", "/v1/enroll", xff=ip, body={}) for _ in range(5)]
    assert [g[0] for g in got] == [400] * 4 + [429]  # the bad body is refused only while tokens last
    _st, headers, body = got[4]
    assert body["error"]["code"] == "RATE_LIMITED" and body["error"]["route_class"] == "enroll"
    assert 8 <= int(headers["retry-after"]) <= 10
    after = _metric(rl_server, "nkudo_cp_rate_limit_requests_total", route_class="enroll", outcome="rejected")
    assert after >= before + 1


def test_unknown_paths_are_rate_limited_too(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Issue 12: the limiter runs before routing, so a 404 costs a token like any request; a limit of 0
    disables a class, and a bigger rate gives a shorter Retry-After (it is not a constant)."""
    url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgres" else None
    srv = start_server(tmp_path / "cp", database_url=url,
                       extra=["--rate-limit-default", "60/min:2", "--rate-limit-enroll", "0"])
    try:
        got = [_req(srv, "GET", "/no/such/path")[0] for _ in range(3)]
        assert got == [404, 429, 429]  # start_server's /healthz probe took the first of the 2 tokens
        st, h, body = _req(srv, "GET", "/no/such/path")
        assert st == 429 and h["retry-after"] == "1" and body["error"]["route_class"] == "default"
        assert {_req(srv, "POST", "/v1/enroll", body={})[0] for _ in range(30)} == {400}  # class disabled
    finally:
        srv.stop()


def test_forwarded_for_is_honoured_only_from_trusted_proxies(rl_server: Server, tmp_path: Path) -> None:
    """Issue 12: X-Forwarded-For from a --trusted-proxy peer picks the client's bucket; from any other peer
    it is ignored, so a client cannot choose a fresh bucket per request."""
    # Trusted (rl_server trusts 127.0.0.1): three spoofed addresses are three clients, none limited.
    assert [_req(rl_server, "POST", "/v1/enroll", xff=_addr(), body={})[0] for _ in range(3)] == [400] * 3
    # The rightmost untrusted hop counts; what the client wrote further left does not.
    ip = _addr()
    got = [_req(rl_server, "POST", "/v1/enroll", xff=f"{_addr()}, {ip}", body={})[0] for _ in range(5)]
    assert got == [400] * 4 + [429]
    srv = start_server(tmp_path / "cp", extra=["--trusted-proxy", "192.0.2.0/24", "--rate-limit-enroll", "6/min:2"])
    try:  # untrusted peer: every spoofed address lands in the peer's one bucket
        got = [_req(srv, "POST", "/v1/enroll", xff=_addr(), body={})[0] for _ in range(3)]
        assert got == [400, 400, 429]
        got = [_req(srv, "POST", "/v1/enroll", body={}, api_key="x")[0]]
        assert got == [429]
    finally:
        srv.stop()


def test_enroll_hammering_leaves_agents_heartbeats_alone(rl_server: Server, tmp_path: Path) -> None:
    """Issue 12 (the hidden check): a flood of /v1/enroll from one address turns into 429s at once, while
    agents' heartbeats (their own class, keyed by agent id) keep getting 200."""
    tenant = new_tenant(rl_server)
    agent = Agent(rl_server, tmp_path).enroll(tenant.token())
    try:
        ip = _addr()
        t0 = time.monotonic()
        codes = [_req(rl_server, "POST", "/v1/enroll", xff=ip, body={"enrollment_token": "x" * 20})[0]
                 for _ in range(40)]
        assert codes.count(429) >= 36 and time.monotonic() - t0 < 20
        assert agent.post("/v1/heartbeat", {"heartbeat_seq": 1})[0] == 200
    finally:
        agent.close()


def test_lockout_grows_expires_and_is_per_source(rl_server: Server) -> None:
    """Issue 12: 3 bad admin keys from one source (on the API, /readyz or /metrics alike) lock it out (even
    with the right key) for 1.5 s, then 3 s, with a 429 LOCKED_OUT whose Retry-After and message say when it
    ends; another source is unaffected."""
    bad, good = "wrong-" + uuid.uuid4().hex, rl_server.admin_key
    ip, other = _addr(), _addr()
    before = _metric(rl_server, "nkudo_cp_lockouts_total", credential="admin_key")
    for path in ("/tenants", "/readyz", "/metrics"):  # every door that takes the admin key counts
        assert _req(rl_server, "GET", path, xff=ip, admin_key=bad)[0] == 401
    st, h, body = _req(rl_server, "GET", "/tenants", xff=ip, admin_key=good)
    assert st == 429 and body["error"]["code"] == "LOCKED_OUT" and "locked out until" in body["error"]["message"]
    assert h["retry-after"] in ("1", "2")
    assert _req(rl_server, "GET", "/tenants", xff=other, admin_key=good)[0] == 200  # another source
    assert _metric(rl_server, "nkudo_cp_lockouts_total", credential="admin_key") == before + 1
    time.sleep(1.7)
    assert _req(rl_server, "GET", "/tenants", xff=ip, admin_key=good)[0] == 200  # expired
    for _ in range(3):
        assert _req(rl_server, "GET", "/tenants", xff=ip, admin_key=bad)[0] == 401
    st, h, _ = _req(rl_server, "GET", "/tenants", xff=ip, admin_key=good)
    assert st == 429 and h["retry-after"] == "3"  # doubled
    time.sleep(1.7)
    assert _req(rl_server, "GET", "/tenants", xff=ip, admin_key=good)[0] == 429  # still locked
    time.sleep(1.5)
    assert _req(rl_server, "GET", "/tenants", xff=ip, admin_key=good)[0] == 200


def test_lockout_of_api_keys_and_enrollment_tokens(rl_server: Server, tmp_path: Path) -> None:
    """Issue 12: bad API keys and bad enrollment tokens lock their source out of that credential type only;
    a locked source's valid token is refused (and not burnt), and a success elsewhere resets nothing."""
    tenant = new_tenant(rl_server)
    ip = _addr()
    for _ in range(3):
        assert _req(rl_server, "GET", f"/tenants/{tenant.tenant_id}/sites", xff=ip, api_key="nk_bad")[0] == 401
    st, _, body = _req(rl_server, "GET", f"/tenants/{tenant.tenant_id}/sites", xff=ip, api_key=tenant.api_key)
    assert st == 429 and body["error"]["code"] == "LOCKED_OUT"
    assert _req(rl_server, "GET", "/tenants", xff=ip, admin_key=rl_server.admin_key)[0] == 200  # other type
    # enrollment tokens, from yet another source
    ip2 = _addr()
    agent = Agent(rl_server, tmp_path)
    body = {"csr_pem": agent.csr(), "hostname": agent.hostname, "host_fingerprint": {"machine_id_sha256": "a" * 64}}
    for _ in range(3):
        st, _, out = _req(rl_server, "POST", "/v1/enroll", xff=ip2, body={**body, "enrollment_token": "no-" + "x" * 20})
        assert (st, out["error"]["code"]) == (401, "TOKEN_INVALID")
    token = tenant.token()
    st, h, out = _req(rl_server, "POST", "/v1/enroll", xff=ip2, body={**body, "enrollment_token": token})
    assert st == 429 and out["error"]["code"] == "LOCKED_OUT" and int(h["retry-after"]) >= 1
    st, _, out = _req(rl_server, "POST", "/v1/enroll", xff=_addr(), body={**body, "enrollment_token": token})
    assert st == 200, out  # the token was not burnt by the refused attempt


def test_two_replicas_share_one_limit(pg_cluster: Cluster, tmp_path: Path) -> None:
    """Issue 12: on PostgreSQL a client cannot double its rate by alternating replicas: enrollment (exact:
    one UPSERT per request) at once, heartbeats (synced every 0.25 s) after one sync interval."""
    url = pg_cluster.create_database()
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    extra = ["--ca-cert-file", str(tmp_path / "ca.crt"), "--ca-key-file", str(tmp_path / "ca.key"), *LIMITS]
    key = "replica-admin-" + uuid.uuid4().hex
    servers = [start_server(tmp_path / f"r{i}", database_url=url, admin_key=key, extra=extra) for i in range(2)]
    try:
        ip = _addr()
        got = [_req(servers[i % 2], "POST", "/v1/enroll", xff=ip, body={})[0] for i in range(6)]
        assert got == [400] * 4 + [429, 429]
        tenant = new_tenant(servers[0])
        a0 = Agent(servers[0], tmp_path / "a").enroll(tenant.token())
        a1 = Agent(servers[1], tmp_path / "a")
        a1.enrolled, a1.key = a0.enrolled, a0.key
        a1.install(a0.enrolled["client_certificate_pem"])
        assert [a0.post("/v1/heartbeat", {})[0] for _ in range(3)] == [200, 200, 200]
        time.sleep(1.0)
        st, body = a1.post("/v1/heartbeat", {})
        assert st == 429 and body["error"]["route_class"] == "heartbeat"
        a0.close()
        a1.close()
    finally:
        for s in servers:
            s.stop()
