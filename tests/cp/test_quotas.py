"""Issue 12 (quotas): per-tenant limits on sites, agents per site, VMs per agent, concurrent plans and API keys.

Every limit is tested at its boundary (the last admitted, the first refused) against a real control plane
on SQLite and PostgreSQL, the refusal is a 403 with ``QUOTA_EXCEEDED`` naming the limit, and two concurrent
submits at "limit - 1" never both pass. The pure rules are tested directly as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from nkudo.cp import domain
from nkudo.cp.domain import QuotaLimit

from .helpers import Agent, ApiCallError, Server, Tenant, create_action, new_tenant


def _set(server: Server, tenant: Tenant, **limits: int | None) -> dict[str, Any]:
    admin = server.client(admin=True)
    try:
        return dict(admin.call("PATCH", f"/tenants/{tenant.tenant_id}/quota", limits))
    finally:
        admin.close()


def _refused(exc: pytest.ExceptionInfo[ApiCallError], limit: QuotaLimit) -> None:
    assert exc.value.status == 403, exc.value
    assert exc.value.code == "QUOTA_EXCEEDED" and exc.value.field == limit.value, exc.value
    assert limit.value in exc.value.message


# --- pure rules -------------------------------------------------------------------------------------------


def test_quota_rules_at_the_boundary() -> None:
    """Issue 12 quotas: exactly at the limit is admitted, one more is refused with the limit named."""
    assert domain.quota_breach(QuotaLimit.SITES, 3, 2) is None
    breach = domain.quota_breach(QuotaLimit.SITES, 3, 3)
    assert breach is not None and breach.limit == QuotaLimit.SITES and "max_sites (3)" in breach.message
    assert domain.quota_breach(QuotaLimit.API_KEYS, 0, 0) is not None  # a limit of 0 admits nothing
    eff = domain.effective_quotas({QuotaLimit.SITES: 5, QuotaLimit.API_KEYS: None})
    assert eff[QuotaLimit.SITES] == 5 and eff[QuotaLimit.API_KEYS] == domain.DEFAULT_QUOTAS[QuotaLimit.API_KEYS]


def test_vm_quota_rule_counts_reported_pending_and_planned() -> None:
    """Issue 12 quotas: VMs per agent counts reported VMs, pending creates and the plan's own, once per id."""
    vm_rule = domain.vm_quota_breach
    assert vm_rule(2, 0, set(), set(), {"a", "b"}, set()) is None  # no agent yet: one agent's worth
    assert vm_rule(2, 0, {"a"}, {"b"}, {"c"}, set()) is not None
    assert vm_rule(2, 0, {"a"}, {"b"}, {"c"}, {"a"}) is None  # the plan deletes one first
    assert vm_rule(2, 0, {"a"}, set(), {"a", "b"}, set()) is None  # re-creating a reported id counts once
    assert vm_rule(2, 2, {"a", "b"}, {"c"}, {"d"}, set()) is None  # two agents: four VMs
    breach = vm_rule(2, 5, set(), set(), {"a", "b", "c"}, set())  # one plan runs on one agent
    assert breach is not None and breach.limit == QuotaLimit.VMS_PER_AGENT


def test_defaults_fit_the_benchmarks() -> None:
    """Issue 12 quotas: the defaults admit what the benchmarks do (100 agents on a site, 1,000 plans, 20 VMs)."""
    d = domain.DEFAULT_QUOTAS
    assert d[QuotaLimit.AGENTS_PER_SITE] >= 100 and d[QuotaLimit.CONCURRENT_PLANS] >= 1000
    assert d[QuotaLimit.VMS_PER_AGENT] >= 20


# --- the API ----------------------------------------------------------------------------------------------


def test_quota_read_and_admin_override(server: Server, tenant: Tenant) -> None:
    """Issue 12 quotas: defaults are reported with usage; only the admin overrides; null restores a default."""
    out = tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/quota")
    assert out["limits"] == {k.value: v for k, v in domain.DEFAULT_QUOTAS.items()}
    assert out["overridden"] == [] and out["usage"] == {"sites": 1, "api_keys": 1, "concurrent_plans": 0}
    with pytest.raises(ApiCallError) as exc:
        tenant.client.call("PATCH", f"/tenants/{tenant.tenant_id}/quota", {"max_sites": 100})
    assert exc.value.status == 401 and exc.value.code == "ADMIN_REQUIRED"
    out = _set(server, tenant, max_sites=7, max_api_keys=3)
    assert out["limits"]["max_sites"] == 7 and out["limits"]["max_api_keys"] == 3
    assert out["overridden"] == ["max_api_keys", "max_sites"]
    out = _set(server, tenant, max_sites=None)  # back to the default; the other override stays
    assert out["limits"]["max_sites"] == domain.DEFAULT_QUOTAS[QuotaLimit.SITES]
    assert out["overridden"] == ["max_api_keys"]
    admin = server.client(admin=True)
    for body, field in (({"max_sites": -1}, "max_sites"), ({"max_sites": "5"}, "max_sites"),
                        ({"max_widgets": 1}, "max_widgets")):
        with pytest.raises(ApiCallError) as exc:
            admin.call("PATCH", f"/tenants/{tenant.tenant_id}/quota", body)
        assert exc.value.status == 400 and field in (exc.value.field or exc.value.message), exc.value
    events = tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/audit-events")["events"]
    assert next(e["details"] for e in events if e["action"] == "tenant.quota.update") == {"max_sites": None}
    admin.close()


def test_sites_quota_boundary(server: Server, tenant: Tenant) -> None:
    """Issue 12 quotas: max_sites admits the last site and refuses the next one."""
    _set(server, tenant, max_sites=2)  # the fixture's tenant has one site
    tenant.client.call("POST", f"/tenants/{tenant.tenant_id}/sites", {"name": "second"})
    with pytest.raises(ApiCallError) as exc:
        tenant.client.call("POST", f"/tenants/{tenant.tenant_id}/sites", {"name": "third"})
    _refused(exc, QuotaLimit.SITES)
    names = [s["name"] for s in tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/sites")["sites"]]
    assert "third" not in names and len(names) == 2


def test_api_keys_quota_boundary(server: Server, tenant: Tenant) -> None:
    """Issue 12 quotas: max_api_keys counts live keys; revoking one makes room again."""
    _set(server, tenant, max_api_keys=2)  # the fixture's tenant has one key
    second = tenant.client.call("POST", f"/tenants/{tenant.tenant_id}/api-keys", {"name": "second"})
    with pytest.raises(ApiCallError) as exc:
        tenant.client.call("POST", f"/tenants/{tenant.tenant_id}/api-keys", {"name": "third"})
    _refused(exc, QuotaLimit.API_KEYS)
    tenant.client.call("DELETE", f"/tenants/{tenant.tenant_id}/api-keys/{second['id']}")
    tenant.client.call("POST", f"/tenants/{tenant.tenant_id}/api-keys", {"name": "third"})


def test_agents_per_site_quota_boundary(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Issue 12 quotas: max_agents_per_site refuses the next enrollment without burning its token."""
    _set(server, tenant, max_agents_per_site=1)
    first = Agent(server, agent_dir).enroll(tenant.token())
    tok = tenant.token()
    st, out = Agent(server, agent_dir).enroll_raw(tok)
    assert st == 403 and out["error"]["code"] == "QUOTA_EXCEEDED", out
    assert out["error"]["field"] == "max_agents_per_site"
    # Another site of the tenant has its own allowance.
    other = tenant.client.call("POST", f"/tenants/{tenant.tenant_id}/sites", {"name": "other"})["id"]
    Agent(server, agent_dir).enroll(tenant.token(other)).close()
    # An unenrolled agent no longer counts, and the refused token is still good.
    assert first.post("/v1/unenroll", {"reason": "retired"})[0] == 204
    Agent(server, agent_dir).enroll(tok).close()
    first.close()


def test_concurrent_plans_quota_boundary(server: Server, tenant: Tenant) -> None:
    """Issue 12 quotas: max_concurrent_plans counts PENDING/IN_PROGRESS plans; a replay is never refused."""
    _set(server, tenant, max_concurrent_plans=2)
    cmd = [{"type": "CommandExecute", "params": {"command": "/bin/true"}}]
    first = tenant.plan(cmd, key="k1")
    tenant.plan(cmd, key="k2")
    with pytest.raises(ApiCallError) as exc:
        tenant.plan(cmd, key="k3")
    _refused(exc, QuotaLimit.CONCURRENT_PLANS)
    assert tenant.plan(cmd, key="k1")["deduplicated"] is True  # an idempotent replay creates nothing
    tenant.client.call("POST", f"/plans/{first['plan_id']}/cancel")  # a finished plan frees its slot
    tenant.plan(cmd, key="k3")


def test_vms_per_agent_quota_boundary(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Issue 12 quotas: max_vms_per_agent counts the plan's creates plus reported VMs and pending creates."""
    _set(server, tenant, max_vms_per_agent=3)
    agent = Agent(server, agent_dir).enroll(tenant.token())
    vms = [{"vm_id": f"rep-{i}", "state": "RUNNING", "vcpus": 1, "memory_mib": 256} for i in range(2)]
    agent.heartbeat(heartbeat_seq=1, vms=vms, lease=False)
    tenant.plan([create_action("new-1")])  # 2 reported + 1 = 3: the last one admitted
    with pytest.raises(ApiCallError) as exc:
        tenant.plan([create_action("new-2")])  # 2 reported + 1 pending + 1
    _refused(exc, QuotaLimit.VMS_PER_AGENT)
    # Deleting a reported VM in the same plan makes room; a plan without creates is never counted.
    tenant.plan([{"type": "MicroVMDelete", "params": {"vm_id": "rep-0"}}, create_action("new-2")])
    tenant.plan([{"type": "MicroVMStop", "params": {"vm_id": "rep-1"}}])
    # One plan runs on one agent: even on a site with room for more, a plan never creates more than the limit.
    a2, a3 = Agent(server, agent_dir).enroll(tenant.token()), Agent(server, agent_dir).enroll(tenant.token())
    tenant.plan([create_action(f"bulk-{i}") for i in range(3)])  # 3 agents: 9 VMs; 3 + 2 pending + 3 = 8
    with pytest.raises(ApiCallError) as exc:
        tenant.plan([create_action(f"more-{i}") for i in range(4)])
    _refused(exc, QuotaLimit.VMS_PER_AGENT)
    for a in (agent, a2, a3):
        a.close()


def test_concurrent_submits_at_quota_minus_one_admit_one(server: Server, tenant: Tenant) -> None:
    """Issue 12 quotas: eight concurrent submits with one plan slot left admit exactly one.

    Without the tenant row lock (PostgreSQL: ``FOR NO KEY UPDATE``) every transaction counts the same
    plans before any commits, and several pass.
    """
    _set(server, tenant, max_concurrent_plans=3)
    cmd = [{"type": "CommandExecute", "params": {"command": "/bin/true"}}]
    tenant.plan(cmd)
    tenant.plan(cmd)
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8, timeout=60)

    def submit() -> None:
        c = server.client(api_key=tenant.api_key)
        body = json.dumps({"idempotency_key": uuid.uuid4().hex, "actions": cmd}).encode()
        barrier.wait()
        st, _, _ = c.raw("POST", f"/sites/{tenant.site_id}/plans", body)
        c.close()
        with lock:
            results.append(st)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(results) == [201] + [403] * 7, results
    assert tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/quota")["usage"]["concurrent_plans"] == 3


def test_cli_set_quota(server: Server, tenant: Tenant) -> None:
    """Issue 12 quotas: ``nkudo-control-plane tenant set-quota`` overrides limits and ``default`` resets one."""
    base = [sys.executable, "-m", "nkudo.cp.cli", "tenant", "set-quota", "--tenant", tenant.tenant_id,
            "--server", server.url, "--ca-file", str(server.ca_file), "--json"]
    env_key = {"NKUDO_CP_ADMIN_KEY": server.admin_key}
    r = _run([*base, "--max-sites", "4", "--max-vms-per-agent", "9"], env_key)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["limits"]["max_sites"] == 4 and out["limits"]["max_vms_per_agent"] == 9
    r = _run([*base, "--max-sites", "default"], env_key)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["limits"]["max_sites"] == domain.DEFAULT_QUOTAS[QuotaLimit.SITES] and out["overridden"] == [
        "max_vms_per_agent"]
    r = _run([*base, "--max-sites", "many"], env_key)
    assert r.returncode != 0 and "--max-sites" in r.stderr
    r = _run(base, env_key)
    assert r.returncode != 0 and "at least one" in r.stderr


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, timeout=60,
                          check=False)


def test_quotas_are_per_tenant(server: Server, tenant: Tenant) -> None:
    """Issue 12 quotas: one tenant's override does not limit another tenant."""
    _set(server, tenant, max_sites=1)
    other = new_tenant(server)
    other.client.call("POST", f"/tenants/{other.tenant_id}/sites", {"name": "more"})
    with pytest.raises(ApiCallError) as exc:
        tenant.client.call("POST", f"/tenants/{tenant.tenant_id}/sites", {"name": "more"})
    _refused(exc, QuotaLimit.SITES)


def test_edge_enroll_at_the_agent_quota_advises(server: Server, tenant: Tenant, tmp_path: Path) -> None:
    """Issue 12 quotas: ``nkudo-edge enroll`` refused by max_agents_per_site says so and what to do; the token
    stays usable once the quota allows another agent."""
    _set(server, tenant, max_agents_per_site=0)
    tok = tenant.token()
    edge = [str(Path(sys.executable).parent / "nkudo-edge"), "--state-dir", str(tmp_path / "state")]
    args = [*edge, "enroll", "--control-plane", server.url, "--token", tok, "--ca-file", str(server.ca_file),
            "--pki-dir", str(tmp_path / "pki")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert r.returncode == 1 and "QUOTA_EXCEEDED" in r.stderr and "max_agents_per_site" in r.stderr, r.stderr
    assert "raise the quota" in r.stderr
    _set(server, tenant, max_agents_per_site=None)
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
