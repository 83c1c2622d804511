"""The API end to end over real TLS, against SQLite and PostgreSQL (the ``server`` fixture is parametrised)."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from nkudo.cp.client import ApiCallError
from nkudo.cp.pki import CertificateAuthority, make_csr

from .conftest import METRICS_TOKEN
from .helpers import Agent, Server, Tenant, create_action, new_tenant


def _wait(pred, timeout: float = 8.0, step: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def test_health_ready_metrics(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """§10 #24: /readyz shows details only to the admin key, /metrics needs the admin key or the metrics token."""
    c = server.client()
    assert c.call("GET", "/healthz")["status"] == "ok"
    assert c.call("GET", "/readyz") == {"status": "ready"}  # a probe learns ready / not ready, nothing else
    admin = server.client(admin=True)
    ready = admin.call("GET", "/readyz")
    assert ready["status"] == "ready"
    assert {k: v["status"] for k, v in ready["checks"].items()} == {"database": "healthy", "ca": "healthy",
                                                                    "crl": "healthy"}
    st, _, body = c.raw("GET", "/readyz", headers={"X-Admin-Key": "wrong"})
    assert st == 401 and json.loads(body)["error"]["code"] == "INVALID_ADMIN_KEY"
    agent = Agent(server, agent_dir).enroll(tenant.token())
    st, _, body = agent.mtls.raw("GET", "/readyz")  # what `nkudo agent` uses as its connection probe
    assert st == 200 and json.loads(body) == {"status": "ready"}

    for client, headers in [(c, {}), (c, {"Authorization": "Bearer wrong-token-0123456789"}),
                            (c, {"Authorization": METRICS_TOKEN}), (c, {"X-Admin-Key": "wrong"}),
                            (tenant.client, {}), (agent.mtls, {})]:
        st, h, body = client.raw("GET", "/metrics", headers=headers)
        assert st == 401, headers
        assert json.loads(body)["error"]["code"] == "UNAUTHENTICATED" and h["www-authenticate"].startswith("Bearer")
    st, headers, body = c.raw("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert st == 200 and headers["content-type"].startswith("text/plain")
    st, _, body2 = admin.raw("GET", "/metrics")
    assert st == 200
    text = body.decode()
    assert 'nkudo_cp_http_requests_total{method="GET",route="/readyz",status="200"}' in text
    assert 'nkudo_cp_http_requests_total{method="GET",route="/metrics",status="401"}' in body2.decode()
    assert 'nkudo_cp_agents{state="ONLINE"}' in text
    assert METRICS_TOKEN not in server.log_path.read_text()  # the secret is never logged
    admin.close()
    agent.close()


def test_plain_http_probe_listener(server: Server) -> None:
    """§10 #38: --health-listen serves /healthz and the detail-free /readyz over plain HTTP, and nothing else."""
    assert server.health_port is not None

    def get(method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", server.health_port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    st, body = get("GET", "/healthz")
    assert st == 200 and body["status"] == "ok"
    # No details even with the (correct) admin key: it must not be accepted in clear text.
    assert get("GET", "/readyz", {"X-Admin-Key": server.admin_key}) == (200, {"status": "ready"})
    for method, path in [("GET", "/metrics"), ("GET", "/tenants"), ("GET", "/v1/crl.pem"), ("POST", "/v1/enroll"),
                         ("POST", "/healthz"), ("GET", "/nope")]:
        st, body = get(method, path, {"X-Admin-Key": server.admin_key})
        assert st == 404 and body["error"]["code"] == "NOT_FOUND", (method, path)
    # The API port itself still speaks only TLS.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
            conn.request("GET", "/healthz")
            conn.getresponse().read()
    finally:
        conn.close()


def test_full_agent_flow(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Enroll -> heartbeat leases the plan -> progress -> logs -> results -> plan SUCCEEDED, VM RUNNING."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    assert agent.enrolled["tenant_id"] == tenant.tenant_id and agent.enrolled["site_id"] == tenant.site_id
    cert = x509.load_pem_x509_certificate(agent.enrolled["client_certificate_pem"].encode())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == agent.id
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://nkudo/tenant/{tenant.tenant_id}/site/{tenant.site_id}/agent/{agent.id}"]

    vm = "vm-" + uuid.uuid4().hex[:6]
    plan = tenant.plan([create_action(vm, start=False), {"type": "MicroVMStart", "params": {"vm_id": vm}}])
    assert plan["plan_status"] == "PENDING" and [e["state"] for e in plan["executions"]] == ["PENDING", "PENDING"]

    vms = [{"vm_id": f"other-{i}", "state": "RUNNING", "vcpus": 1, "memory_mib": 256} for i in range(3)]
    hb = agent.heartbeat(heartbeat_seq=1, agent_version="1.2.3", vms=vms,
                         host_facts={"cpu_cores": 8, "memory_total_bytes": 16 << 30, "kvm_available": True})
    assert hb["next_heartbeat_seconds"] == 5
    [leased] = hb["pending_plans"]
    assert leased["plan_id"] == plan["plan_id"]
    exec_ids = [e["id"] for e in plan["executions"]]
    assert [a["execution_id"] for a in leased["actions"]] == exec_ids  # the execution's own id
    assert leased["actions"][0]["params"]["kernel_path"] == "/var/lib/nkudo/vmlinux"

    agent.heartbeat(heartbeat_seq=2, vms=vms, execution_updates=[{"execution_id": exec_ids[0]}])
    assert tenant.client.call("GET", f"/executions/{exec_ids[0]}")["state"] == "RUNNING"

    st, out = agent.post("/v1/logs", {"execution_id": exec_ids[0], "lines": [
        {"seq": i, "message": f"line {i}", "level": "INFO"} for i in range(5)]})
    assert st == 202 and out == {"accepted": 5, "dropped": 0}
    st, out = agent.post("/v1/logs", {"execution_id": exec_ids[0], "lines": [
        {"seq": 4, "message": "again"}, {"seq": 5, "message": "line 5"}]})
    assert out == {"accepted": 1, "dropped": 1}
    page = tenant.client.call("GET", f"/executions/{exec_ids[0]}/logs?limit=4")
    assert [ln["seq"] for ln in page["logs"]] == [0, 1, 2, 3] and page["next_after_seq"] == 3
    page = tenant.client.call("GET", f"/executions/{exec_ids[0]}/logs?limit=4&after_seq=3")
    assert [ln["message"] for ln in page["logs"]] == ["line 4", "line 5"] and page["next_after_seq"] is None

    out = agent.results([{"execution_id": exec_ids[0], "status": "SUCCEEDED"}])
    assert out["results"] == [{"execution_id": exec_ids[0], "outcome": "accepted"}]
    assert tenant.client.call("GET", f"/plans/{plan['plan_id']}")["plan_status"] == "IN_PROGRESS"
    vmrec = {v["vm_id"]: v for v in tenant.client.call("GET", f"/sites/{tenant.site_id}/vms")["vms"]}
    assert vmrec[vm]["state"] == "STOPPED"  # start=false
    out = agent.results([{"execution_id": exec_ids[1], "status": "SUCCEEDED"},
                         {"execution_id": exec_ids[0], "status": "SUCCEEDED"}])  # redelivery of the first
    assert [r["outcome"] for r in out["results"]] == ["accepted", "duplicate"]
    final = tenant.client.call("GET", f"/plans/{plan['plan_id']}")
    assert final["plan_status"] == "SUCCEEDED" and final["leased_by_agent_id"] is None
    vmrec = {v["vm_id"]: v for v in tenant.client.call("GET", f"/sites/{tenant.site_id}/vms")["vms"]}
    assert vmrec[vm]["state"] == "RUNNING" and vmrec[vm]["vcpus"] == 2
    assert {"other-0", "other-1", "other-2"} <= set(vmrec)
    # A conflicting late report for a finished execution is rejected, not applied.
    out = agent.results([{"execution_id": exec_ids[1], "status": "FAILED"}])
    assert out["results"][0]["outcome"] == "rejected"
    assert agent.heartbeat()["pending_plans"] == []

    [host] = tenant.client.call("GET", f"/sites/{tenant.site_id}/hosts")["hosts"]
    assert host["hostname"] == agent.hostname and host["facts"]["cpu_cores"] == 8
    assert host["agent_state"] == "ONLINE" and host["agent_id"] == agent.id
    actions = {e["action"] for e in tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/audit-events")["events"]}
    assert {"site.create", "enrollment_token.issue", "agent.enroll", "plan.create", "execution.result"} <= actions
    agent.close()


def test_failed_action_cancels_rest_and_fails_plan(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    agent = Agent(server, agent_dir).enroll(tenant.token())
    plan = tenant.plan([create_action("vmf"), {"type": "MicroVMPause", "params": {"vm_id": "vmf"}},
                        {"type": "CommandExecute", "params": {"command": "/bin/true"}}])
    [leased] = agent.heartbeat()["pending_plans"]
    first = leased["actions"][0]["execution_id"]
    agent.results([{"execution_id": first, "status": "TIMED_OUT", "message": "took too long"}])
    p = tenant.client.call("GET", f"/plans/{plan['plan_id']}")
    assert p["plan_status"] == "FAILED"
    assert [e["state"] for e in p["executions"]] == ["TIMED_OUT", "CANCELLED", "CANCELLED"]
    assert p["executions"][0]["error_code"] == "TIMED_OUT"
    vm = {v["vm_id"]: v for v in tenant.client.call("GET", f"/sites/{tenant.site_id}/vms")["vms"]}["vmf"]
    assert vm["state"] == "ERROR"
    agent.close()


def test_cancel_plan(server: Server, tenant: Tenant) -> None:
    plan = tenant.plan([create_action("vmc")])
    out = tenant.client.call("POST", f"/plans/{plan['plan_id']}/cancel")
    assert out["plan_status"] == "CANCELLED" and out["executions"][0]["state"] == "CANCELLED"


def test_idempotency_key(server: Server, tenant: Tenant) -> None:
    key = "deploy-" + uuid.uuid4().hex
    a = tenant.plan([create_action("vmi")], key=key)
    b = tenant.plan([create_action("vmi")], key=key)
    assert a["deduplicated"] is False and b["deduplicated"] is True and a["plan_id"] == b["plan_id"]
    with pytest.raises(ApiCallError) as ei:
        tenant.plan([create_action("vmj")], key=key)
    assert ei.value.status == 409 and ei.value.code == "IDEMPOTENCY_KEY_REUSED"


def test_concurrent_plan_creation_with_one_key(server: Server, tenant: Tenant) -> None:
    key = "race-" + uuid.uuid4().hex
    out: list[str] = []

    def go() -> None:
        c = server.client(api_key=tenant.api_key)
        out.append(c.call("POST", f"/sites/{tenant.site_id}/plans",
                          {"idempotency_key": key, "actions": [create_action("vmr")]})["plan_id"])
        c.close()

    threads = [threading.Thread(target=go) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(out) == 6 and len(set(out)) == 1


# --- enrollment edge cases ------------------------------------------------------


def test_enroll_token_reuse_invalid_expired(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    tok = tenant.token()
    Agent(server, agent_dir).enroll(tok)
    st, out = Agent(server, agent_dir).enroll_raw(tok)
    assert st == 409 and out["error"]["code"] == "TOKEN_ALREADY_USED"
    st, out = Agent(server, agent_dir).enroll_raw("not-a-token")
    assert st == 401 and out["error"]["code"] == "TOKEN_INVALID"
    short = tenant.token(ttl=1)
    time.sleep(1.3)
    st, out = Agent(server, agent_dir).enroll_raw(short)
    assert st == 401 and out["error"]["code"] == "TOKEN_EXPIRED"


def test_bad_csr_leaves_token_usable(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    tok = tenant.token()
    a = Agent(server, agent_dir)
    st, out = a.enroll_raw(tok, csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    assert st == 400 and out["error"]["code"] == "INVALID_CSR" and out["error"]["field"] == "csr_pem"
    weak = make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    st, out = a.enroll_raw(tok, csr_pem=weak)
    assert st == 400 and "too small" in out["error"]["message"]
    rsa_ok = Agent(server, agent_dir)
    rsa_ok.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # type: ignore[assignment]
    rsa_ok.enroll(tok)  # the token survived both failures; RSA >= 2048 is accepted
    rsa_ok.heartbeat()
    rsa_ok.close()


def test_unknown_field_in_enroll_is_named(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    st, out = Agent(server, agent_dir).enroll_raw(tenant.token(), surprise=1)
    assert st == 400 and out["error"]["field"] == "surprise"


def test_concurrent_enrollment_one_token_exactly_one_wins(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    tok = tenant.token()
    agents = [Agent(server, agent_dir) for _ in range(2)]
    results: list[tuple[int, dict]] = []  # type: ignore[type-arg]
    barrier = threading.Barrier(2)

    def go(a: Agent) -> None:
        barrier.wait()
        results.append(a.enroll_raw(tok))

    threads = [threading.Thread(target=go, args=(a,)) for a in agents]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    statuses = sorted(st for st, _ in results)
    assert statuses == [200, 409], results
    loser = next(out for st, out in results if st == 409)
    assert loser["error"]["code"] == "TOKEN_ALREADY_USED"
    toks = tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/enrollment-tokens")["tokens"]
    winner = next(out for st, out in results if st == 200)
    assert [t["consumed_by_agent_id"] for t in toks if t["consumed"]] == [winner["agent_id"]]


def test_second_agent_on_enrolled_host_conflicts_and_keeps_token(server: Server, tenant: Tenant,
                                                                  agent_dir: Path) -> None:
    first = Agent(server, agent_dir).enroll(tenant.token())
    tok = tenant.token()
    st, out = Agent(server, agent_dir, hostname=first.hostname).enroll_raw(tok)
    assert st == 409 and out["error"]["code"] == "HOST_ALREADY_ENROLLED"
    Agent(server, agent_dir).enroll(tok)  # token still usable


# --- renew and unenroll ---------------------------------------------------------


def test_renew_rotates_cert_and_refresh_token(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    agent = Agent(server, agent_dir).enroll(tenant.token())
    old_dir = agent.dir / "old"
    old_dir.mkdir()
    (old_dir / "agent.crt").write_text((agent.dir / "agent.crt").read_text())
    (old_dir / "agent.key").write_bytes((agent.dir / "agent.key").read_bytes())
    old_client = server.client(cert=(old_dir / "agent.crt", old_dir / "agent.key"))
    st, out = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": "wrong"})
    assert st == 401 and out["error"]["code"] == "INVALID_REFRESH_TOKEN"
    st, out = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": agent.enrolled["refresh_token"]})
    assert st == 200, out
    assert out["refresh_token"] != agent.enrolled["refresh_token"]
    agent.install(out["client_certificate_pem"])
    agent.heartbeat()
    st, _, _ = old_client.raw("POST", "/v1/heartbeat", b"{}")
    assert st == 200  # inside the grace period (1 s in these tests)
    time.sleep(1.3)
    st, _, data = old_client.raw("POST", "/v1/heartbeat", b"{}")
    assert st == 401 and json.loads(data)["error"]["code"] == "CERTIFICATE_REVOKED"
    agent.heartbeat()
    # §10 #21: renew is audited, and the superseded certificate is on the CRL once the grace period is over.
    old_serial = format(x509.load_pem_x509_certificate(agent.enrolled["client_certificate_pem"].encode())
                        .serial_number, "x")
    new_serial = format(x509.load_pem_x509_certificate(out["client_certificate_pem"].encode()).serial_number, "x")
    [ev] = [e for e in tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/audit-events")["events"]
            if e["action"] == "agent.renew" and e["object_id"] == agent.id]
    assert ev["actor_type"] == "AGENT" and ev["actor_id"] == agent.id
    assert ev["details"] == {"old_serial": old_serial, "new_serial": new_serial}
    crl = x509.load_pem_x509_crl(server.client().raw("GET", "/v1/crl.pem")[2])
    assert crl.get_revoked_certificate_by_serial_number(int(old_serial, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(new_serial, 16)) is None
    # The old refresh token was rotated away.
    st, _ = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": agent.enrolled["refresh_token"]})
    assert st == 401
    old_client.close()
    agent.close()


def test_unenroll_revokes_and_frees_host(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    agent = Agent(server, agent_dir).enroll(tenant.token())
    plan = tenant.plan([create_action("vmu")])
    assert agent.heartbeat()["pending_plans"]
    st, _ = agent.post("/v1/unenroll", {"reason": "decommissioned"})
    assert st == 204
    st, out = agent.post("/v1/heartbeat", {})
    assert st == 401 and out["error"]["code"] == "AGENT_UNENROLLED"
    # Its lease was given back at once and the host can be enrolled again.
    assert tenant.client.call("GET", f"/plans/{plan['plan_id']}")["executions"][0]["state"] == "PENDING"
    again = Agent(server, agent_dir, hostname=agent.hostname).enroll(tenant.token())
    assert again.heartbeat()["pending_plans"][0]["plan_id"] == plan["plan_id"]
    serial = format(x509.load_pem_x509_certificate(agent.enrolled["client_certificate_pem"].encode()).serial_number,
                    "x")
    st, _, body = server.client().raw("GET", "/v1/crl.pem")
    crl = x509.load_pem_x509_crl(body)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    agents = {a["id"]: a["state"] for a in tenant.client.call("GET", f"/sites/{tenant.site_id}/agents")["agents"]}
    assert agents[agent.id] == "UNENROLLED"
    agent.close()
    again.close()


def test_foreign_ca_certificate_is_refused(server: Server, tenant: Tenant, agent_dir: Path, tmp_path: Path) -> None:
    """A certificate that looks right (CN = a real agent id) but comes from another CA fails the handshake."""
    real = Agent(server, agent_dir).enroll(tenant.token())
    rogue_ca = CertificateAuthority.generate("rogue")
    import datetime as dt

    issued = rogue_ca.sign_agent(x509.load_pem_x509_csr(real.csr().encode()), agent_id=real.id,
                                 tenant_id=tenant.tenant_id, site_id=tenant.site_id, ttl=dt.timedelta(hours=1))
    (tmp_path / "r.crt").write_text(issued.pem)
    (tmp_path / "r.key").write_bytes((real.dir / "agent.key").read_bytes())
    c = server.client(cert=(tmp_path / "r.crt", tmp_path / "r.key"))
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        c.raw("POST", "/v1/heartbeat", b"{}")
    real.close()


def test_curl_with_client_certificate(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    agent = Agent(server, agent_dir).enroll(tenant.token())
    r = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--tlsv1.2", "--cacert", str(server.ca_file), "--cert",
         str(agent.dir / "agent.crt"), "--key", str(agent.dir / "agent.key"), "-H", "Content-Type: application/json",
         "-d", '{"heartbeat_seq": 7}', f"{server.url}/v1/heartbeat"],
        capture_output=True, text=True, timeout=20, check=False)
    assert r.returncode == 0, r.stderr + r.stdout
    assert json.loads(r.stdout) == {"next_heartbeat_seconds": 5, "pending_plans": []}
    r = subprocess.run(["curl", "-sS", "--cacert", str(server.ca_file), "-d", "{}", f"{server.url}/v1/heartbeat"],
                       capture_output=True, text=True, timeout=20, check=False)
    assert json.loads(r.stdout)["error"]["code"] == "CLIENT_CERT_REQUIRED"
    agent.close()


# --- leasing ----------------------------------------------------------------------


def test_lease_expiry_and_reoffer(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    a1 = Agent(server, agent_dir).enroll(tenant.token())
    a2 = Agent(server, agent_dir).enroll(tenant.token())
    plan = tenant.plan([create_action("vml")])
    eid = plan["executions"][0]["id"]
    assert a1.heartbeat()["pending_plans"][0]["plan_id"] == plan["plan_id"]
    assert a2.heartbeat()["pending_plans"] == []  # leased to a1
    assert a1.heartbeat()["pending_plans"][0]["plan_id"] == plan["plan_id"]  # holder gets it again (renewed)
    time.sleep(2.4)  # lease TTL is 2 s in these tests
    st, _, out = a2.mtls.raw("GET", "/v1/plans/next")
    assert st == 200
    [p] = json.loads(out)["plans"]
    assert p["plan_id"] == plan["plan_id"] and p["actions"][0]["execution_id"] == eid
    late = a1.results([{"execution_id": eid, "status": "SUCCEEDED"}])
    assert late["results"][0] == {"execution_id": eid, "outcome": "rejected", "code": "LEASE_LOST"}
    assert a2.results([{"execution_id": eid, "status": "SUCCEEDED"}])["results"][0]["outcome"] == "accepted"
    ex = tenant.client.call("GET", f"/executions/{eid}")
    assert ex["agent_id"] == a2.id and ex["attempts"] == 2 and ex["state"] == "SUCCEEDED"
    a1.close()
    a2.close()


# --- sweeper ----------------------------------------------------------------------


def test_offline_sweeper(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """§10 #34: silent agents go OFFLINE and give their leases back at once; UNENROLLED agents stay UNENROLLED."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    plan = tenant.plan([create_action("vm-sweep")])
    eid = plan["executions"][0]["id"]
    assert agent.heartbeat()["pending_plans"][0]["plan_id"] == plan["plan_id"]
    gone = Agent(server, agent_dir).enroll(tenant.token())
    gone.heartbeat()
    st, _ = gone.post("/v1/unenroll", {"reason": "decommissioned"})
    assert st == 204

    def agents() -> dict[str, str]:
        return {a["id"]: a["state"] for a in tenant.client.call("GET", f"/sites/{tenant.site_id}/agents")["agents"]}

    def site() -> str:
        [s] = [s for s in tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/sites")["sites"]
               if s["id"] == tenant.site_id]
        return str(s["connectivity_state"])

    assert agents()[agent.id] == "ONLINE" and site() == "ONLINE"
    assert _wait(lambda: agents()[agent.id] == "OFFLINE" and site() == "OFFLINE", timeout=6)
    ex = tenant.client.call("GET", f"/executions/{eid}")
    assert ex["state"] == "PENDING" and ex["agent_id"] is None  # released by the sweep, not left to lease expiry
    time.sleep(1.2)  # more sweeps (every 0.5 s) run past the unenrolled agent's offline threshold
    assert agents()[gone.id] == "UNENROLLED"
    events = tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/audit-events")["events"]
    offline = [e["object_id"] for e in events if e["action"] == "agent.offline"]
    assert offline.count(agent.id) == 1 and gone.id not in offline
    # Another agent of the site gets the work on its next heartbeat; the old holder's late result is refused.
    other = Agent(server, agent_dir).enroll(tenant.token())
    [p] = other.heartbeat()["pending_plans"]
    assert p["plan_id"] == plan["plan_id"] and p["actions"][0]["execution_id"] == eid
    late = agent.results([{"execution_id": eid, "status": "SUCCEEDED"}])
    assert late["results"][0]["code"] == "LEASE_LOST"
    agent.heartbeat()
    assert agents()[agent.id] == "ONLINE" and site() == "ONLINE"
    for a in (agent, gone, other):
        a.close()


# --- isolation ------------------------------------------------------------------


def test_tenant_isolation_every_route(server: Server, agent_dir: Path) -> None:
    a, b = new_tenant(server), new_tenant(server)
    agent_a = Agent(server, agent_dir).enroll(a.token())
    plan = a.plan([create_action("vm-iso")])
    eid = plan["executions"][0]["id"]
    key_id = a.client.call("GET", f"/tenants/{a.tenant_id}/api-keys")["api_keys"][0]["id"]
    foreign = [
        ("GET", f"/tenants/{a.tenant_id}/sites", None),
        ("POST", f"/tenants/{a.tenant_id}/sites", {"name": "x"}),
        ("GET", f"/tenants/{a.tenant_id}/api-keys", None),
        ("POST", f"/tenants/{a.tenant_id}/api-keys", {"name": "x"}),
        ("DELETE", f"/tenants/{a.tenant_id}/api-keys/{key_id}", None),
        ("GET", f"/tenants/{a.tenant_id}/enrollment-tokens", None),
        ("POST", f"/tenants/{a.tenant_id}/enrollment-tokens", {"site_id": a.site_id}),
        ("POST", f"/tenants/{b.tenant_id}/enrollment-tokens", {"site_id": a.site_id}),  # own tenant, foreign site
        ("GET", f"/tenants/{a.tenant_id}/audit-events", None),
        ("POST", f"/sites/{a.site_id}/plans", {"idempotency_key": "k", "actions": [create_action("v")]}),
        ("GET", f"/sites/{a.site_id}/hosts", None),
        ("GET", f"/sites/{a.site_id}/vms", None),
        ("GET", f"/sites/{a.site_id}/agents", None),
        ("GET", f"/sites/{a.site_id}/executions", None),
        ("GET", f"/plans/{plan['plan_id']}", None),
        ("POST", f"/plans/{plan['plan_id']}/cancel", None),
        ("GET", f"/executions/{eid}", None),
        ("GET", f"/executions/{eid}/logs", None),
    ]
    for method, path, body in foreign:
        with pytest.raises(ApiCallError) as ei:
            b.client.call(method, path, body)
        assert ei.value.status == 404, (method, path, ei.value)
    # Tenant keys cannot use admin-only routes; B only lists itself.
    with pytest.raises(ApiCallError) as ei:
        b.client.call("POST", "/tenants", {"slug": "evil", "name": "evil"})
    assert ei.value.status == 401
    assert [t["id"] for t in b.client.call("GET", "/tenants")["tenants"]] == [b.tenant_id]
    # An agent of B cannot see, report on, or log to A's work.
    agent_b = Agent(server, agent_dir).enroll(b.token())
    assert agent_b.heartbeat()["pending_plans"] == []
    out = agent_b.results([{"execution_id": eid, "status": "SUCCEEDED"}])
    assert out["results"][0] == {"execution_id": eid, "outcome": "rejected", "code": "EXECUTION_NOT_FOUND"}
    st, _ = agent_b.post("/v1/logs", {"execution_id": eid, "lines": [{"seq": 1, "message": "x"}]})
    assert st == 404
    agent_b.heartbeat(vms=[{"vm_id": "vm-iso", "state": "RUNNING"}])  # same VM id in B's site: no effect on A
    assert a.client.call("GET", f"/sites/{a.site_id}/vms")["vms"] == []
    assert a.client.call("GET", f"/executions/{eid}")["state"] == "PENDING"
    agent_a.close()
    agent_b.close()


def test_revoked_api_key_stops_working_at_once(server: Server, tenant: Tenant) -> None:
    admin = server.client(admin=True)
    extra = admin.call("POST", f"/tenants/{tenant.tenant_id}/api-keys", {"name": "temp"})
    c = server.client(api_key=extra["api_key"])
    assert c.call("GET", f"/tenants/{tenant.tenant_id}/sites")
    tenant.client.call("DELETE", f"/tenants/{tenant.tenant_id}/api-keys/{extra['id']}")
    with pytest.raises(ApiCallError) as ei:
        c.call("GET", f"/tenants/{tenant.tenant_id}/sites")
    assert ei.value.status == 401


# --- validation and errors ------------------------------------------------------


@pytest.mark.parametrize(("action", "field"), [
    (create_action("ok", vcpus=0), "actions[0].params.vcpus"),
    (create_action("bad id!"), "actions[0].params.vm_id"),
    (create_action("ok", surprise=True), "actions[0].params.surprise"),
    (create_action("ok", nics=[{"bridge": "br0", "mac": "zz"}]), "actions[0].params.nics[0].mac"),
    (create_action("ok", kernel_path="relative/vmlinux"), "actions[0].params.kernel_path"),
    (create_action("ok", kernel_path="/a/../etc/shadow"), "actions[0].params.kernel_path"),
    ({"type": "MicroVMNuke", "params": {}}, "actions[0].type"),
    ({"type": "CommandExecute", "params": {"command": "", "args": []}}, "actions[0].params.command"),
    ({"type": "MicroVMSnapshot", "params": {"vm_id": "a"}}, "actions[0].params.snapshot_name"),
])
def test_bad_plans_are_refused_naming_the_field(server: Server, tenant: Tenant, action: dict, field: str
                                                ) -> None:  # type: ignore[type-arg]
    with pytest.raises(ApiCallError) as ei:
        tenant.plan([action])
    assert ei.value.status == 400 and ei.value.field == field, ei.value


def test_create_needs_exactly_one_boot_source(server: Server, tenant: Tenant) -> None:
    act = create_action("ok", firmware_path="/fw")
    with pytest.raises(ApiCallError) as ei:
        tenant.plan([act])
    assert ei.value.status == 400 and "exactly one of kernel_path and firmware_path" in str(ei.value)


def test_http_errors_are_json(server: Server, tenant: Tenant) -> None:
    c = tenant.client
    for method, path, body, status in [
        ("GET", "/nope", None, 404),
        ("PUT", "/tenants", b"{}", 405),
        ("POST", f"/tenants/{tenant.tenant_id}/sites", b"{not json", 400),
        ("POST", f"/tenants/{tenant.tenant_id}/sites", b"", 400),
        ("POST", f"/tenants/{tenant.tenant_id}/sites", b"[]", 400),
        ("POST", f"/tenants/{tenant.tenant_id}/sites", b'{"name": "x", "extra": 1}', 400),
        ("POST", f"/tenants/{tenant.tenant_id}/sites", b'{"name": "' + b"x" * (2 << 20) + b'"}', 413),
        ("GET", "/plans/not-a-uuid", None, 404),
        ("GET", f"/sites/{tenant.site_id}/executions?limit=zero", None, 400),
    ]:
        st, _, data = c.raw(method, path, body)
        assert st == status, (method, path, st, data[:200])
        err = json.loads(data)["error"]
        assert err["code"] and err["message"]
    st, _, data = c.raw("POST", f"/tenants/{tenant.tenant_id}/sites", b'{"name": "x", "extra": 1}')
    assert json.loads(data)["error"]["field"] == "extra"
    st, _, data = server.client().raw("GET", f"/tenants/{tenant.tenant_id}/sites", headers={"X-API-Key": "nk_bogus"})
    assert st == 401 and json.loads(data)["error"]["code"] == "INVALID_API_KEY"
    st, _, data = server.client().raw("GET", "/tenants", headers={"X-Admin-Key": "wrong"})
    assert st == 401 and json.loads(data)["error"]["code"] == "INVALID_ADMIN_KEY"


def test_quiet_heartbeats_keep_agent_online(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Heartbeats that change nothing are buffered (write-behind) but must still keep the agent ONLINE."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    deadline = time.monotonic() + 3.5  # offline-after is 2 s in these tests
    while time.monotonic() < deadline:
        agent.heartbeat(heartbeat_seq=int(time.monotonic() * 10))
        time.sleep(0.3)
    [a] = tenant.client.call("GET", f"/sites/{tenant.site_id}/agents")["agents"]
    assert a["state"] == "ONLINE"
    agent.close()


def test_probe_heartbeat_leases_nothing(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """`lease: false` (nkudo-edge verify-heartbeat) answers but never takes work the daemon would run."""
    a = Agent(server, agent_dir).enroll(tenant.token())
    plan = tenant.plan([create_action("vmprobe")])
    probe = a.heartbeat(lease=False)
    assert probe["pending_plans"] == [] and probe["next_heartbeat_seconds"] > 0
    assert tenant.client.call("GET", f"/plans/{plan['plan_id']}")["executions"][0]["state"] == "PENDING"
    assert a.heartbeat()["pending_plans"][0]["plan_id"] == plan["plan_id"]
