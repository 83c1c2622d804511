"""The system end to end: token → enroll → heartbeats → plans → results/logs/metrics → crash → renew → unenroll."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cp.helpers import Server, Tenant
from tests.e2e.conftest import EdgeHost, wait_for


def _vm_plan(vm: str, *, snapshot: str = "s1") -> list[dict[str, Any]]:
    def act(aid: str, t: str, **kw: Any) -> dict[str, Any]:
        return {"action_id": aid, "type": t, "params": {"vm_id": vm, **kw}}

    return [
        {"action_id": "create", "type": "MicroVMCreate", "params": {
            "vm_id": vm, "name": vm, "vcpus": 2, "memory_mib": 256, "kernel_path": "/tmp/KERNEL",
            "nics": [{"bridge": "br0"}]}},
        act("pause", "MicroVMPause"),
        act("resume", "MicroVMResume"),
        act("snapshot", "MicroVMSnapshot", snapshot_name=snapshot),
        act("stop", "MicroVMStop"),
        act("start", "MicroVMStart"),
        act("delete", "MicroVMDelete"),
    ]  # fmt: skip


def _with_kernel(actions: list[dict[str, Any]], h: EdgeHost) -> list[dict[str, Any]]:
    return json.loads(json.dumps(actions).replace("/tmp/KERNEL", str(h.images / "vmlinux")))


def _plan_done(t: Tenant, plan_id: str) -> dict[str, Any] | None:
    plan = t.client.call("GET", f"/plans/{plan_id}")
    return plan if plan["plan_status"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    raise AssertionError(f"{name}{labels} not in metrics")


def test_token_enroll_plan_metrics_crash_renew_unenroll(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    h = host
    # enroll with a one-time token; credentials 0600
    r = h.enroll(tenant.token())
    assert r.returncode == 0, r.stderr
    for f in ("agent.key", "agent.crt", "ca.crt", "refresh-token"):
        assert oct((h.pki / f).stat().st_mode & 0o777) == "0o600"
    assert oct(h.pki.stat().st_mode & 0o777) == "0o700"
    status = json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)
    assert status["enrolled"] and status["site_id"] == tenant.site_id and status["certificate"]["valid"]
    agent_id = status["agent_id"]

    # heartbeats make the agent and its site visible and online
    h.start()
    wait_for(lambda: any(a["id"] == agent_id and a["state"] == "ONLINE"
                         for a in tenant.client.call("GET", f"/sites/{tenant.site_id}/agents")["agents"]), what="agent online")  # fmt: skip

    # a plan with every VM action, executed by the agent, every execution SUCCEEDED
    plan = tenant.plan(_with_kernel(_vm_plan("vm-a"), h))
    done = wait_for(lambda: _plan_done(tenant, plan["plan_id"]), timeout=60, what="plan done")
    assert done["plan_status"] == "SUCCEEDED", done
    execs = done["executions"]
    assert [e["action_id"] for e in execs] == [
        "create",
        "pause",
        "resume",
        "snapshot",
        "stop",
        "start",
        "delete",
    ]
    assert all(e["state"] == "SUCCEEDED" and e["agent_id"] == agent_id for e in execs)
    # logs are queryable per execution, and carry the action's own messages
    logs = tenant.client.call("GET", f"/executions/{execs[3]['id']}/logs")
    texts = [line["message"] for line in logs["logs"]]
    assert any("snapshot written" in t for t in texts) and any(t.startswith("result: ") for t in texts)
    # metrics are true: one of each action succeeded, heartbeats counted, VM gone
    m = h.metrics()
    for t in (
        "MicroVMCreate",
        "MicroVMPause",
        "MicroVMResume",
        "MicroVMSnapshot",
        "MicroVMStop",
        "MicroVMStart",
        "MicroVMDelete",
    ):
        assert _metric(m, "nkudo_actions_executed_total", action_type=t, status="succeeded") == 1
    assert _metric(m, "nkudo_heartbeats_sent_total") >= 2
    assert _metric(m, "nkudo_vms_total", state="running") == 0
    # agent log lines about actions carry the execution context
    recs = [x for x in h.log_records() if x.get("component") == "executor"]
    assert recs and all({"execution_id", "action_id", "action_type"} <= set(x) for x in recs)

    # SIGKILL in the middle of a plan, then restart: nothing runs twice, each result is reported once
    h.kill()
    h.set_sim_flags("--sim-delay", "vm.boot=1.5")
    slow = tenant.plan([*_with_kernel(_vm_plan("vm-b")[:4], h), {"action_id": "cmd", "type": "CommandExecute", "params": {"command": "/bin/sh", "args": ["-c", f"echo run >> {h.counter}"]}}])  # fmt: skip
    h.start()
    wait_for(lambda: (h.root / "vms" / "vm-b" / "api.sock").exists(), what="vm-b VMM started")
    time.sleep(0.5)  # inside the slow vm.boot
    h.kill()
    h.start()
    done = wait_for(lambda: _plan_done(tenant, slow["plan_id"]), timeout=60, what="plan after restart")
    assert done["plan_status"] == "SUCCEEDED", done
    assert h.counter.read_text().count("run") == 1
    assert len(h.vmm_pids()) == 1  # one VMM for vm-b, none leaked
    per_vmm: dict[int, dict[str, int]] = {}
    pid = 0
    for line in h.journal.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "start":
            pid = rec["pid"]
            per_vmm[pid] = {}
        elif rec.get("status") in (200, 204):
            per_vmm[pid][rec["endpoint"]] = per_vmm[pid].get(rec["endpoint"], 0) + 1
    assert all(c.get("vm.create", 0) <= 1 and c.get("vm.boot", 0) <= 1 for c in per_vmm.values()), per_vmm
    for e in done["executions"]:
        assert e["state"] == "SUCCEEDED"
    # the restarted agent re-adopted the running VM
    assert any(x.get("msg") == "process adopted" for x in h.log_records())

    # renew: new certificate works, the old one is refused after the grace period
    old_cert = (h.pki / "agent.crt").read_bytes()
    old_key = (h.pki / "agent.key").read_bytes()
    h.stop()
    r = h.edge("renew", "--force", "--json", "--pki-dir", str(h.pki))
    assert r.returncode == 0, r.stderr
    assert (h.pki / "agent.crt").read_bytes() != old_cert
    (h.root / "old.crt").write_bytes(old_cert)
    (h.root / "old.key").write_bytes(old_key)
    time.sleep(1.5)
    curl = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(cp.ca_file), "--cert", str(h.root / "old.crt"),
         "--key", str(h.root / "old.key"), "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}", f"{cp.url}/v1/heartbeat"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert curl.stdout == "401", curl
    assert h.edge("verify-heartbeat", "--pki-dir", str(h.pki)).returncode == 0

    # unenroll: the agent is refused afterwards and its credentials are gone; the daemon stops non-zero
    (h.root / "keep.crt").write_bytes((h.pki / "agent.crt").read_bytes())
    (h.root / "keep.key").write_bytes((h.pki / "agent.key").read_bytes())
    r = h.edge("unenroll", "--yes", "--json", "--pki-dir", str(h.pki), *h.agent_args()[2:])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["control_plane"] == "done" and doc["vms_deleted"] == ["vm-b"]
    assert h.vmm_pids() == [] and not (h.pki / "agent.key").exists()
    r = h.edge("verify-heartbeat", "--pki-dir", str(h.pki))
    assert r.returncode == 1 and "not enrolled" in r.stderr
    curl = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(cp.ca_file), "--cert", str(h.root / "keep.crt"),
         "--key", str(h.root / "keep.key"), "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}", f"{cp.url}/v1/heartbeat"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert curl.stdout == "401"


def test_agent_backs_off_while_control_plane_is_down_and_recovers(
    cp: Server, tenant: Tenant, host: EdgeHost
) -> None:
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    h.start()
    wait_for(lambda: json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)["connection"]["status"] == "connected",
             what="connected")  # fmt: skip
    port, data_dir, key = cp.port, cp.data_dir, cp.admin_key
    cp.stop()
    time.sleep(4)
    st = json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)
    assert st["connection"]["status"] == "unreachable"
    backoffs = [x for x in h.log_records() if x.get("msg") == "control plane unreachable; backing off"]
    assert len(backoffs) >= 2
    assert h.proc is not None and h.proc.poll() is None  # still running, not crashed
    from tests.cp.helpers import start_server

    srv = start_server(data_dir, admin_key=key, port=port, extra=["--heartbeat-interval", "1"])
    try:
        wait_for(lambda: json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)["connection"]["status"] == "connected",
                 timeout=20, what="reconnected")  # fmt: skip
        assert h.stop() == 0  # SIGTERM: clean exit
    finally:
        srv.stop()


def test_token_reuse_and_expiry_from_the_cli(
    cp: Server, tenant: Tenant, host: EdgeHost, tmp_path: Path
) -> None:
    h = host
    tok = tenant.token()
    assert h.enroll(tok).returncode == 0
    other = EdgeHost(tmp_path / "other", cp)
    r = other.enroll(tok, "--hostname", "other-host")
    assert r.returncode == 1
    assert "TOKEN_ALREADY_USED" in r.stderr and "each token enrolls one host" in r.stderr
    expiring = tenant.token(ttl=1)
    time.sleep(2)
    r = other.enroll(expiring, "--hostname", "other-host")
    assert r.returncode == 1 and "TOKEN_EXPIRED" in r.stderr and "Create a new one" in r.stderr
    r = other.enroll("not-a-real-token", "--hostname", "other-host")
    assert r.returncode == 1 and "TOKEN_INVALID" in r.stderr
    assert not (other.pki / "agent.key").exists()
    # enrolling twice without --force is refused; a used token in a file works the same way
    r = h.enroll(tenant.token())
    assert r.returncode == 1 and "already enrolled" in r.stderr
    r = h.edge("enroll", "--control-plane", cp.url, "--ca-file", str(cp.ca_file), "--pki-dir", str(h.pki))
    assert r.returncode == 2 and "token is required" in r.stderr


@pytest.mark.parametrize("cp_backend", ["postgres"], indirect=True)
def test_plan_flow_on_postgresql(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    h.start()
    plan = tenant.plan(_with_kernel(_vm_plan("vm-p"), h))
    done = wait_for(lambda: _plan_done(tenant, plan["plan_id"]), timeout=60, what="plan done")
    assert done["plan_status"] == "SUCCEEDED" and all(e["state"] == "SUCCEEDED" for e in done["executions"])
    assert h.stop() == 0


@pytest.mark.parametrize("cp_extra", [["--agent-cert-ttl", "9"]], indirect=True)
def test_daemon_renews_its_certificate_and_keeps_working(
    cp_extra: list[str], cp: Server, tenant: Tenant, host: EdgeHost
) -> None:
    """Renewal at 2/3 of the lifetime, on the live connection; afterwards only the new certificate works."""
    h = host
    tok = tenant.token()
    assert h.enroll(tok).returncode == 0
    first = (h.pki / "agent.crt").read_bytes()
    refresh = (h.pki / "refresh-token").read_text()
    h.start()
    wait_for(lambda: (h.pki / "agent.crt").read_bytes() != first, timeout=20, what="automatic renewal")
    renewed = [x for x in h.log_records() if x.get("msg") == "certificate renewed"]
    assert renewed and "expires_at" in renewed[0]
    # heartbeats continue past the old certificate's grace period, on the new certificate
    time.sleep(2.5)
    before = json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)["connection"][
        "last_heartbeat_at"
    ]
    time.sleep(1.5)
    after = json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)["connection"]
    assert after["status"] == "connected" and after["last_heartbeat_at"] != before
    assert h.proc is not None and h.proc.poll() is None
    assert h.stop() == 0
    # secrets never reach the logs
    text = h.log.read_text()
    assert tok not in text and refresh not in text and (h.pki / "refresh-token").read_text() not in text
    assert "PRIVATE KEY" not in text
