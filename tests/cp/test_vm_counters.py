"""Issue 15 (per-VM counters): heartbeats carry compact counters; the VM list shows them and their rates.

Over real TLS against SQLite and PostgreSQL (the ``server`` fixture), validated against the OpenAPI
document like every API test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .helpers import Agent, Server, Tenant


def _vms(tenant: Tenant) -> dict[str, Any]:
    return {v["vm_id"]: v for v in tenant.client.call("GET", f"/sites/{tenant.site_id}/vms")["vms"]}


def _wait(pred, timeout: float = 8.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pred():
        time.sleep(0.2)
    return pred()


def test_counters_stored_and_rated(server: Server, tenant: Tenant, agent_dir: Path, tmp_path: Path) -> None:
    """Issue 15: latest counters per VM, rates from the report before, and only for the reporting host's VMs."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    other = Agent(server, tmp_path / "other").enroll(tenant.token())
    vms = [{"vm_id": "vm-c1", "state": "RUNNING", "name": "web", "vcpus": 1, "memory_mib": 128},
           {"vm_id": "vm-c2", "state": "STOPPED"}]
    agent.heartbeat(heartbeat_seq=1, vms=vms,
                    vm_counters=[["vm-c1", 1000, 10, 0, 2000, 20, 1, 500, 4096, 8192, 2**20],
                                 ["vm-c2", None, None, None, None, None, None, 40, 0, 0, 0]])
    first = _wait(lambda: "counters" in _vms(tenant)["vm-c1"] and _vms(tenant))
    c1 = first["vm-c1"]["counters"]
    assert (c1["rx_bytes"], c1["tx_packets"], c1["cpu_ms"], c1["rss_bytes"]) == (1000, 20, 500, 2**20)
    assert "rates" not in c1 and first["vm-c2"]["counters"]["rx_bytes"] is None
    time.sleep(1.1)
    # The same VM list (a quiet heartbeat) with new counters: stored all the same, and a reset counter has no rate.
    agent.heartbeat(heartbeat_seq=2, vms=vms,
                    vm_counters=[["vm-c1", 3000, 30, 0, 1000, 30, 1, 1500, 4096, 16384, 2**20]])
    later = _wait(lambda: "rates" in _vms(tenant)["vm-c1"]["counters"] and _vms(tenant))
    r = later["vm-c1"]["counters"]["rates"]
    secs = r["interval_seconds"]
    assert secs >= 1.0
    assert abs(r["rx_bytes"] * secs - 2000) < 2 and abs(r["cpu_cores"] * secs - 1.0) < 0.01
    assert r["tx_bytes"] is None  # went down: a reset, no rate across it
    assert r["read_bytes"] == 0
    # Another host of the same site cannot write counters of this host's VM.
    other.heartbeat(heartbeat_seq=1, vm_counters=[["vm-c1", 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]])
    time.sleep(1.5)
    assert _vms(tenant)["vm-c1"]["counters"]["rx_bytes"] == 3000
    st, out = agent.post("/v1/heartbeat", {"vm_counters": [["vm-c1", -1]]})
    assert st == 400 and "vm_counters" in out["error"]["message"]
    agent.close()
    other.close()
