"""Issue 12 part 1: the real agent honours 429 and Retry-After from the real control plane.

Heartbeats, result posting and enrollment each meet a tiny limit on a real ``serve`` process; the agent
must wait for the server's Retry-After (never a hot loop) and must not lose a refused report.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from tests.cp.helpers import Server, Tenant

from .conftest import EdgeHost, wait_for


def _rejected(cp: Server, route_class: str) -> float:
    st, _, text = cp.client(admin=True).raw("GET", "/metrics")
    assert st == 200
    pat = re.compile(r'^nkudo_cp_rate_limit_requests_total\{(.*)\} (\S+)$')
    for line in text.decode().splitlines():
        m = pat.match(line)
        if m and f'route_class="{route_class}"' in m.group(1) and 'outcome="rejected"' in m.group(1):
            return float(m.group(2))
    return 0.0


@pytest.mark.parametrize("cp_extra", [["--rate-limit-heartbeat", "6/min:2"]], indirect=True)
def test_heartbeats_wait_for_retry_after(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    """Issue 12: a rate-limited heartbeat is retried after the server's Retry-After (here ~10 s: one token
    every 10 s), not after the agent's own 0.5-2 s backoff, which would hammer the server with 429s."""
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    h.start()  # --heartbeat-interval 0.5 --max-backoff 2
    wait_for(lambda: _rejected(cp, "heartbeat") >= 1, timeout=20, what="a rate-limited heartbeat")
    time.sleep(6)
    assert _rejected(cp, "heartbeat") == 1  # the old backoff retried 4-6 times in these 6 s
    refused = [r for r in h.log_records() if r.get("msg") == "heartbeat refused"]
    assert refused and refused[0]["code"] == "RATE_LIMITED" and refused[0]["retry_in_s"] >= 8
    assert h.proc is not None and h.proc.poll() is None
    assert h.stop() == 0


@pytest.mark.parametrize("cp_extra", [["--rate-limit-agent", "12/min:1"]], indirect=True)
def test_rate_limited_results_are_kept_and_retried(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    """Issue 12: a 429 on result or log posting used to count as a permanent 4xx and drop the report (the
    plan then never finished); now the report stays queued and is sent after Retry-After."""
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    plan = tenant.plan([{"action_id": f"c{i}", "type": "CommandExecute",
                         "params": {"command": "/bin/sh", "args": ["-c", f"echo {i}"]}} for i in range(2)])
    h.start()
    done: dict[str, Any] = wait_for(lambda: _done(tenant, plan["plan_id"]), timeout=60, what="plan finished")
    assert done["plan_status"] == "SUCCEEDED"
    assert _rejected(cp, "agent") >= 1  # the limit really was hit on the way
    msgs = [r.get("msg") for r in h.log_records()]
    assert "control plane rate-limited a report; retrying later" in msgs
    assert "control plane refused a report; dropping it" not in msgs
    assert h.stop() == 0


def _done(t: Tenant, plan_id: str) -> dict[str, Any] | None:
    plan: dict[str, Any] = t.client.call("GET", f"/plans/{plan_id}")
    return plan if plan["plan_status"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None


@pytest.mark.parametrize("cp_extra", [["--rate-limit-enroll", "20/min:1"]], indirect=True)
def test_enroll_waits_for_retry_after(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    """Issue 12: ``nkudo-edge enroll`` meeting a 429 RATE_LIMITED waits for Retry-After (3 s here) and
    retries, instead of failing at once."""
    token = tenant.token()
    c = cp.client()
    assert c.raw("POST", "/v1/enroll", json.dumps({}).encode())[0] == 400  # takes the address's one token
    c.close()
    t0 = time.monotonic()
    r = host.enroll(token)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rate-limiting enrollment; retrying" in r.stderr
    assert time.monotonic() - t0 >= 2.5
