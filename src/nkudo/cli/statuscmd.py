"""``nkudo-edge status``: enrollment, certificate, last heartbeat and VM counts, from local state.

A module of its own so that :mod:`nkudo.cli.agentcmds` stays small; status only reads.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from typing import Any

from nkudo.agent.cpclient import client_for
from nkudo.cli.output import paint, print_json, use_colour


def run_status(p: dict[str, Any]) -> int:
    from nkudo.agent.identity import Pki, load_cert_info, load_identity
    from nkudo.agent.state import StateStore
    from nkudo.vmstate import VmStatus

    if not os.path.exists(os.path.join(p["state_dir"], "agent.db")):
        doc: dict[str, Any] = {"enrolled": False, "state_dir": p["state_dir"]}
        if p.get("json"):
            print_json(doc)
        else:
            sys.stdout.write(
                "Agent Status: not enrolled\n  (no state in {}; run nkudo-edge enroll)\n".format(
                    p["state_dir"]
                )
            )
        return 1
    store = StateStore(p["state_dir"])
    try:
        ident = load_identity(store)
        pki = Pki(p["pki_dir"])
        cert = load_cert_info(pki)
        hb = json.loads(store.get_meta("heartbeat") or "{}")
        counts = {s.value: 0 for s in VmStatus}
        for vm in store.list_vms():
            counts[vm.status.value] += 1
    finally:
        store.close()
    now = dt.datetime.now(dt.UTC)
    doc = {
        "enrolled": ident is not None,
        "agent_id": ident.agent_id if ident else None,
        "tenant_id": ident.tenant_id if ident else None,
        "site_id": ident.site_id if ident else None,
        "host_id": ident.host_id if ident else None,
        "control_plane": ident.control_plane if ident else None,
        "certificate": None,
        "connection": {
            "last_heartbeat_at": _ts(hb.get("last_success_at")),
            "last_heartbeat_age_seconds": round(now.timestamp() - hb["last_success_at"], 1)
            if hb.get("last_success_at")
            else None,
            "last_attempt_at": _ts(hb.get("last_attempt_at")),
            "status": hb.get("status", "never connected"),
            "error": hb.get("error"),
        },
        "vms": {k.lower(): v for k, v in counts.items()},
    }
    if cert is not None:
        doc["certificate"] = {
            "serial": cert.serial,
            "expires_at": cert.not_after.isoformat(),
            "days_remaining": cert.remaining(now).days,
            "valid": cert.valid(now),
            "renew_due": cert.renew_due(now),
        }
    rc = 0 if ident is not None else 1
    if p.get("check_connection") and ident is not None:
        check = _probe_connection(ident, pki)
        doc["connection"]["check"] = check
        if not check["ok"]:
            rc = 1
    if p.get("json"):
        print_json(doc)
        return rc
    colour = use_colour(sys.stdout)
    lines = [f"Agent Status: {'enrolled' if ident else 'not enrolled'}"]
    if ident:
        lines += [
            f"Agent ID:     {ident.agent_id}",
            f"Tenant ID:    {ident.tenant_id}",
            f"Site ID:      {ident.site_id}",
            f"Control plane: {ident.control_plane}",
            "",
            "Certificate:",
        ]
        if cert is None:
            lines.append(paint("  missing (credentials not found in " + pki.dir + ")", "red", colour))
        else:
            lines += [
                f"  Expires:    {cert.not_after:%Y-%m-%d %H:%M} UTC ({_left(cert.remaining(now))} remaining)",
                f"  Valid:      {'yes' if cert.valid(now) else paint('no', 'red', colour)}",
            ]
        c = doc["connection"]
        lines += ["", "Connection:"]
        if c["last_heartbeat_at"]:
            lines.append(
                f"  Last Heartbeat: {c['last_heartbeat_at'][:19].replace('T', ' ')} UTC ({_age(c['last_heartbeat_age_seconds'])} ago)"
            )
        else:
            lines.append("  Last Heartbeat: never")
        status = c["status"] if not c.get("check") else ("connected" if c["check"]["ok"] else "unreachable")
        lines.append(
            f"  Status:         {status}"
            + (f" ({c['error']})" if c.get("error") and status != "connected" else "")
        )
        if c.get("check") and not c["check"]["ok"]:
            lines.append(f"  Check:          {c['check']['error']}")
    lines += ["", "VMs: " + (", ".join(f"{v} {k}" for k, v in doc["vms"].items() if v) or "none")]
    sys.stdout.write("\n".join(lines) + "\n")
    return rc


def _left(delta: dt.timedelta) -> str:
    secs = delta.total_seconds()
    if secs <= 0:
        return "none: expired"
    return (
        f"{int(secs // 86400)} days"
        if secs >= 2 * 86400
        else f"{int(secs // 3600)}h {int(secs % 3600 // 60)}m"
    )


def _ts(v: float | None) -> str | None:
    return None if v is None else dt.datetime.fromtimestamp(v, dt.UTC).isoformat()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s}s" if s < 120 else (f"{s // 60}m" if s < 7200 else f"{s // 3600}h")


def _probe_connection(ident: Any, pki: Any) -> dict[str, Any]:
    """An authenticated round trip that changes nothing: GET /v1/plans/next would lease, so use /readyz over mTLS."""
    from nkudo.agent.cpclient import CpError, CpUnreachable

    client = client_for(ident, pki)
    try:
        status, _ = client.request("GET", "/readyz")
        return {
            "ok": status == 200,
            "http_status": status,
            "error": None if status == 200 else f"HTTP {status}",
        }
    except (CpError, CpUnreachable) as exc:
        return {"ok": False, "error": exc.message}
    finally:
        client.close()
