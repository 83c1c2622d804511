"""Issue 10 item 11: a running daemon and credentials renewed or revoked by another process.

A real control plane (renew grace 1 s, see conftest), a real ``nkudo-edge run``
process and real ``nkudo-edge renew`` / mTLS calls next to it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.cp.helpers import Server, Tenant
from tests.e2e.conftest import EdgeHost, wait_for


def _status(h: EdgeHost) -> dict[str, Any]:
    return dict(json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)["connection"])


def _online(t: Tenant, agent_id: str) -> bool:
    agents = t.client.call("GET", f"/sites/{t.site_id}/agents")["agents"]
    return any(a["id"] == agent_id and a["state"] == "ONLINE" for a in agents)


def _agent_id(h: EdgeHost) -> str:
    return str(json.loads(h.edge("status", "--json", "--pki-dir", str(h.pki)).stdout)["agent_id"])


def _unenroll_with(cp: Server, cert: Path, key: Path) -> str:
    """POST /v1/unenroll presenting ``cert``: the control plane revokes the agent (as an operator's tool would)."""
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(cp.ca_file), "--cert", str(cert),
         "--key", str(key), "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}", f"{cp.url}/v1/unenroll"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return r.stdout


def _copy_creds(h: EdgeHost, name: str) -> tuple[Path, Path]:
    cert, key = h.root / f"{name}.crt", h.root / f"{name}.key"
    cert.write_bytes((h.pki / "agent.crt").read_bytes())
    key.write_bytes((h.pki / "agent.key").read_bytes())
    return cert, key


def _heartbeat_after(h: EdgeHost, since: str | None, timeout: float = 20) -> str:
    def newer() -> str | None:
        c = _status(h)
        at = c["last_heartbeat_at"]
        return str(at) if c["status"] == "connected" and at and at != since else None

    return str(wait_for(newer, timeout=timeout, what="a new heartbeat"))


def test_manual_renew_while_run_is_active(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    """Issue 10 item 11: after `nkudo-edge renew` next to a running daemon, the daemon kept the old
    certificate and exited with CERTIFICATE_REVOKED ("enroll again") when the renew grace ended."""
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    agent_id = _agent_id(h)
    h.start()
    _heartbeat_after(h, None)  # the daemon runs on the first certificate
    old = (h.pki / "agent.crt").read_bytes()
    r = h.edge("renew", "--force", "--json", "--pki-dir", str(h.pki))
    assert r.returncode == 0, r.stderr
    assert (h.pki / "agent.crt").read_bytes() != old
    time.sleep(3)  # well past the control plane's 1 s grace for the old certificate
    seen = _heartbeat_after(h, None)
    _heartbeat_after(h, seen)  # heartbeats continue, on the renewed certificate
    assert h.proc is not None and h.proc.poll() is None, h.log.read_text()
    assert _online(tenant, agent_id)
    text = h.log.read_text()
    assert "CERTIFICATE_REVOKED" not in text and "enroll the host again" not in text, text
    assert any(
        x.get("msg") == "switched to the credentials renewed by another process" for x in h.log_records()
    ), text
    assert h.stop() == 0


def test_revoked_identity_exits_3_with_reenroll_advice(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    """Issue 10 item 11: when the identity in use (also the one on disk) is revoked, the daemon
    exits 3 and advises enrolling again, without claiming other credentials were tried."""
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    h.start()
    _heartbeat_after(h, None)
    assert _unenroll_with(cp, h.pki / "agent.crt", h.pki / "agent.key") == "204"
    assert h.proc is not None and h.proc.wait(30) == 3
    text = h.log.read_text()
    assert "enroll the host again with a new token" in text and "tried too" not in text, text


def test_renewed_credentials_on_disk_rejected_too(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    """Issue 10 item 11: refused with its old certificate, the daemon must try the credentials another
    process renewed on disk before giving up, and say that those were refused too."""
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    h.start("--heartbeat-interval", "6")
    first = _heartbeat_after(h, None)
    _heartbeat_after(h, first)  # just after a heartbeat: the daemon now waits ~6 s
    assert h.proc is not None
    h.proc.send_signal(signal.SIGSTOP)  # it cannot notice the renewal before its next heartbeat
    try:
        r = h.edge("renew", "--force", "--json", "--pki-dir", str(h.pki))
        assert r.returncode == 0, r.stderr
        assert _unenroll_with(cp, h.pki / "agent.crt", h.pki / "agent.key") == "204"
    finally:
        h.proc.send_signal(signal.SIGCONT)
    assert h.proc.wait(30) == 3
    text = h.log.read_text()
    assert "tried too" in text and "enroll the host again with a new token" in text, text


def test_refused_old_certificate_retried_with_renewed_one(cp: Server, tenant: Tenant, host: EdgeHost) -> None:
    """Issue 10 item 11: a daemon that had no chance to notice the renewal before the grace ended
    must switch to the renewed credentials at the first refusal instead of exiting."""
    h = host
    assert h.enroll(tenant.token()).returncode == 0
    h.start("--heartbeat-interval", "6")
    first = _heartbeat_after(h, None)
    seen = _heartbeat_after(h, first)
    assert h.proc is not None
    h.proc.send_signal(signal.SIGSTOP)
    try:
        r = h.edge("renew", "--force", "--json", "--pki-dir", str(h.pki))
        assert r.returncode == 0, r.stderr
        time.sleep(2)  # past the 1 s grace: the certificate the daemon holds is refused now
    finally:
        h.proc.send_signal(signal.SIGCONT)
    _heartbeat_after(h, seen)
    assert h.proc.poll() is None, h.log.read_text()
    text = h.log.read_text()
    assert "enroll the host again" not in text, text
    assert any(
        x.get("msg") == "switched to the credentials renewed by another process" for x in h.log_records()
    )
    assert h.stop() == 0
