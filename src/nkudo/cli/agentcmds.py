"""``enroll``, ``run``, ``status``, ``unenroll``, ``renew``, ``verify-heartbeat``: the agent online."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import sys
from typing import Any

from nkudo.cli.output import print_json, report_failure, report_stop
from nkudo.errors import NkudoError, UsageError, ValidationError
from nkudo.wire.vocab import ErrorCode

#: What to tell the operator for each enrollment error code.
ENROLL_ADVICE: dict[str, str] = {  # keyed by ErrorCode (a str): looked up with the code of the error
    ErrorCode.TOKEN_INVALID: "The enrollment token is not valid. Create a new one (nkudo-control-plane token create) and retry.",
    ErrorCode.TOKEN_EXPIRED: "The enrollment token has expired (tokens are valid for 15 minutes). Create a new one and retry.",
    ErrorCode.TOKEN_ALREADY_USED: "The enrollment token was already used: each token enrolls one host. Create a new one.",
    ErrorCode.HOST_ALREADY_ENROLLED: "The control plane already has an agent for this host name in this site; "
    "unenroll it there first, or enroll with --hostname.",
    ErrorCode.QUOTA_EXCEEDED: "The site has as many agents as its tenant quota allows (max_agents_per_site); the token "
    "was not used. Unenroll an agent of the site or ask the operator to raise the quota, then retry.",
    ErrorCode.INVALID_CSR: "The control plane refused the certificate request; this is a bug, please report it.",
    ErrorCode.CP_UNREACHABLE: "Check the --control-plane URL, DNS and firewall, then retry.",
    ErrorCode.CP_TLS_UNTRUSTED: "Pass --ca-file with the CA certificate of the control plane (or --insecure-skip-verify for development).",
    ErrorCode.RATE_LIMITED: "The control plane is limiting enrollments from this address; retry later.",
    ErrorCode.LOCKED_OUT: "Too many invalid enrollment tokens were tried from this address; it is locked out "
    "for the time the message says. Check the token, then retry after that.",
}
#: Issue 12: a rate-limited enrollment is retried after the server's Retry-After, this many times and for at
#: most this long in all (a lock-out is never waited for: it lasts minutes and is reported instead).
ENROLL_ATTEMPTS = 5
ENROLL_MAX_WAIT = 120.0


def agent_config(p: dict[str, Any]) -> Any:
    """The AgentConfig of every command that runs VMs (apply, run, unenroll), from AGENT_OPTS."""
    from nkudo.agent.runtime import AgentConfig

    return AgentConfig(
        state_dir=p["state_dir"],
        runtime_dir=p["runtime_dir"],
        snapshot_dir=p["snapshot_dir"],
        image_roots=tuple(p["image_root"]),
        cloud_hypervisor_bin=p["cloud_hypervisor_bin"],
        provider=p["provider"],
        qemu_bin=p["qemu_bin"],
        qemu_accel=p["qemu_accel"],
        bridge=p["bridge"],
        exec_allow=tuple(p["exec_allow"]),
        net_backend=p["net_backend"],
        console_max_mib=p["console_max_mib"],
    )


def cp_client(ident: Any, pki: Any) -> Any:
    from nkudo.agent.cpclient import client_for

    return client_for(ident, pki)


def fail(p: dict[str, Any], exc: NkudoError, advice: str = "") -> int:
    """Report ``exc`` through the one reporter (JSON with --json, else a line plus advice); exit code 1."""
    return report_failure(exc, as_json=bool(p.get("json")), advice=advice)


# ----------------------------------------------------------------- enroll


def _read_token(p: dict[str, Any]) -> str:
    if p.get("token") and p.get("token_file"):
        raise UsageError("give the token with --token (or NKUDO_ENROLL_TOKEN) or --token-file, not both")
    if p.get("token_file"):
        try:
            with open(p["token_file"], encoding="utf-8") as f:
                tok = f.read().strip()
        except OSError as exc:
            raise ValidationError(
                f"cannot read --token-file {p['token_file']!r}: {exc.strerror}", field="token_file"
            ) from None
    else:
        tok = (p.get("token") or "").strip()
    if not tok:
        raise UsageError("an enrollment token is required: --token, NKUDO_ENROLL_TOKEN or --token-file")
    if len(tok) > 512 or any(c.isspace() for c in tok):
        raise ValidationError(
            "the enrollment token is malformed (at most 512 characters, no spaces)", field="token"
        )
    return tok


def _labels(raw: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in raw:
        k, sep, v = item.partition("=")
        if not sep or not k or len(k) > 256 or len(v) > 256:
            raise ValidationError(f"--label {item!r} must be KEY=VALUE", field="label")
        out[k] = v
    return out


def run_enroll(p: dict[str, Any]) -> int:
    from nkudo.agent.cpclient import CpClient, CpError, CpUnreachable
    from nkudo.agent.identity import (
        Identity,
        Pki,
        host_fingerprint,
        load_identity,
        new_key_and_csr,
        save_identity,
    )
    from nkudo.agent.state import StateStore
    from nkudo.wire import messages as wm

    try:
        token = _read_token(p)
        labels = _labels(tuple(p["label"]))
        hostname = p.get("hostname") or socket.gethostname()
        if p.get("insecure_skip_verify"):
            sys.stderr.write(
                "WARNING: --insecure-skip-verify: the control plane's identity is NOT verified (development only)\n"
            )
        client = CpClient(
            p["control_plane"], ca_file=p.get("ca_file"), insecure_skip_verify=p["insecure_skip_verify"]
        )
        store = StateStore(p["state_dir"])
    except UsageError:
        raise
    except NkudoError as exc:
        return fail(p, exc)
    pki = Pki(p["pki_dir"])
    try:
        existing = load_identity(store)
        if existing is not None and not p["force"]:
            raise NkudoError(
                f"this host is already enrolled as agent {existing.agent_id} (site {existing.site_id}); "
                "use --force to enroll again",
                code=ErrorCode.ALREADY_ENROLLED,
            )
        key_pem, csr_pem = new_key_and_csr(hostname)
        req = wm.EnrollRequest(
            enrollment_token=token,
            csr_pem=csr_pem,
            hostname=hostname,
            host_fingerprint=wm.HostFingerprint(**host_fingerprint()),
            agent_version=_version(),
            arch=os.uname().machine,
            kernel_version=os.uname().release,
            labels=labels,
        )
        try:
            resp = _enroll_honouring_429(client, req)
        except (CpError, CpUnreachable) as exc:
            return fail(p, exc, ENROLL_ADVICE.get(exc.code, ""))
        pki.write(pki.key, key_pem)
        pki.write(pki.cert, resp.client_certificate_pem.encode())
        pki.write(pki.ca, resp.ca_certificate_pem.encode())
        pki.write(pki.refresh, resp.refresh_token.encode())
        ident = Identity(
            agent_id=resp.agent_id,
            tenant_id=resp.tenant_id,
            site_id=resp.site_id,
            host_id=resp.host_id,
            control_plane=p["control_plane"],
            hostname=hostname,
            enrolled_at=dt.datetime.now(dt.UTC).isoformat(),
            heartbeat_interval=resp.heartbeat_interval_seconds,
            insecure_skip_verify=p["insecure_skip_verify"],
        )
        ident.record_cert(resp.client_certificate_pem.encode())
        save_identity(store, ident)
        store.set_meta("heartbeat", None)
    except NkudoError as exc:
        return fail(p, exc)
    finally:
        store.close()
        client.close()
    out = {
        "ok": True,
        "agent_id": resp.agent_id,
        "tenant_id": resp.tenant_id,
        "site_id": resp.site_id,
        "host_id": resp.host_id,
        "certificate_expires_at": resp.certificate_expires_at.isoformat(),
        "pki_dir": pki.dir,
    }
    if p.get("json"):
        print_json(out)
    else:
        sys.stdout.write(
            f"Enrolled: agent {resp.agent_id}\n  Tenant: {resp.tenant_id}\n  Site:   {resp.site_id}\n"
            f"  Certificate expires {resp.certificate_expires_at:%Y-%m-%d %H:%M} UTC; credentials in {pki.dir}\n"
            "Start the agent with: nkudo-edge run\n"
        )
    return 0


def _enroll_honouring_429(client: Any, req: Any) -> Any:
    """``client.enroll(req)``, waiting out a ``RATE_LIMITED`` 429 for its ``Retry-After`` (never a hot loop)."""
    import random
    import time

    from nkudo.agent.cpclient import CpError, rate_limited_delay

    waited = 0.0
    for attempt in range(1, ENROLL_ATTEMPTS + 1):
        try:
            return client.enroll(req)
        except CpError as exc:
            if exc.code != ErrorCode.RATE_LIMITED or attempt == ENROLL_ATTEMPTS:
                raise
            wait = rate_limited_delay(exc.retry_after, 5.0, random.random())  # noqa: S311 - jitter
            if waited + wait > ENROLL_MAX_WAIT:
                raise
            sys.stderr.write(f"The control plane is rate-limiting enrollment; retrying in {wait:.0f} s\n")
            time.sleep(wait)
            waited += wait
    raise AssertionError("unreachable")


def _version() -> str:
    from nkudo import __version__

    return __version__


# -------------------------------------------------------------------- run


def run_run(p: dict[str, Any]) -> int:
    from nkudo.agent.daemon import Daemon, DaemonConfig
    from nkudo.agent.identity import Pki, require_enrolled, require_identity
    from nkudo.agent.runtime import Agent

    pki = Pki(p["pki_dir"])
    try:
        require_enrolled(p["state_dir"], pki)  # before Agent() creates directories and the database
        agent = Agent(agent_config(p))
    except NkudoError as exc:
        return fail(p, exc)
    metrics_server = None
    try:
        ident = require_identity(agent.store, pki)
        metrics = _metrics(agent, p)
        metrics_server = metrics.serve(
            p["metrics_addr"]
        )  # None for "off"; a bad address or busy port stops start-up
        interval = p.get("heartbeat_interval")
        cfg = DaemonConfig(
            interval=float(interval) if interval else float(ident.heartbeat_interval or 15),
            interval_forced=bool(interval),
            max_backoff=float(p["max_backoff"]),
            shutdown_timeout=float(p["shutdown_timeout"]),
            once=bool(p["once"]),
        )
        daemon = Daemon(agent, ident, pki, cp_client(ident, pki), cfg, metrics=metrics)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: daemon.request_stop())
        return report_stop(daemon.run(), daemon.exit_reason)
    except NkudoError as exc:
        return fail(p, exc)
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        agent.close()


def _metrics(agent: Any, p: dict[str, Any]) -> Any:
    from nkudo import __version__
    from nkudo.agent.counters import VmCounterCollector
    from nkudo.agent.metrics import AgentMetrics

    # Issue 15: per-VM kernel counters (scrape and heartbeat), plus the hypervisor's device counters where it has them.
    counters = VmCounterCollector(agent.cfg.net_backend, device_counters=agent.device_counters)
    return AgentMetrics(agent.store, [p["state_dir"], p["runtime_dir"], p["snapshot_dir"]], __version__, counters)


def run_status(p: dict[str, Any]) -> int:
    from nkudo.cli.statuscmd import run_status as status

    return status(p)


# --------------------------------------------------------------- unenroll


def run_unenroll(p: dict[str, Any]) -> int:
    from nkudo.agent.cpclient import CpError, CpUnreachable
    from nkudo.agent.identity import IDENTITY_KEY, Pki, load_identity, peek_identity
    from nkudo.agent.plan import parse_action
    from nkudo.agent.runtime import Agent
    from nkudo.wire import messages as wm
    from nkudo.wire.vocab import ActionType

    if p["keep_vms"] and p["delete_vms"]:
        raise UsageError("--keep-vms and --delete-vms exclude each other")
    pki = Pki(p["pki_dir"])
    not_enrolled = NkudoError("this host is not enrolled; nothing to do", code=ErrorCode.NOT_ENROLLED)
    try:
        if peek_identity(p["state_dir"]) is None:  # before Agent() creates directories and the database
            return fail(p, not_enrolled)
        agent = Agent(agent_config(p))
    except NkudoError as exc:
        return fail(p, exc)
    try:
        ident = load_identity(agent.store)
        if ident is None:
            return fail(p, not_enrolled)
        vms = agent.store.list_vms()
        delete = not p["keep_vms"]
        if not p["yes"] and sys.stdin.isatty():
            what = f" and stop and delete {len(vms)} VM(s)" if delete and vms else ""
            sys.stdout.write(f"Unenroll agent {ident.agent_id} from {ident.control_plane}{what}? [y/N] ")
            sys.stdout.flush()
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                sys.stdout.write("Aborted; nothing changed.\n")
                return 1
        remote = "done"
        client = cp_client(ident, pki)
        try:
            client.unenroll(wm.UnenrollRequest(reason=p["reason"]))  # the CRL entry's reason code
        except (CpError, CpUnreachable) as exc:
            if isinstance(exc, CpError) and exc.identity_gone:
                remote = f"already gone ({exc.code})"
            elif not p["force"]:
                return fail(
                    p,
                    exc,
                    "Nothing was changed. Retry when the control plane is reachable, or use --force to clean up locally.",
                )
            else:
                remote = f"NOT notified ({exc.message}); the control plane still lists this agent"
        finally:
            client.close()
        deleted: list[str] = []
        if delete:
            agent.reconcile()
            for vm in vms:
                a = parse_action(
                    {
                        "action_id": f"unenroll-delete-{vm.vm_id}",
                        "type": ActionType.MICROVM_DELETE,
                        "params": {"vm_id": vm.vm_id},
                    }
                )
                out = agent.executor.execute(a)
                if out.ok:
                    deleted.append(vm.vm_id)
        removed = pki.remove()
        agent.store.set_meta(IDENTITY_KEY, None)
        agent.store.set_meta("heartbeat", None)
    finally:
        agent.close()
    kept = [] if delete else [v.vm_id for v in vms]
    doc = {
        "ok": True,
        "control_plane": remote,
        "vms_deleted": deleted,
        "vms_kept": kept,
        "credentials_removed": removed,
    }
    if p.get("json"):
        print_json(doc)
    else:
        sys.stdout.write(f"Unenrolled. Control plane: {remote}.\n")
        sys.stdout.write(f"VMs deleted: {', '.join(deleted) or 'none'}; kept: {', '.join(kept) or 'none'}\n")
        sys.stdout.write(f"Credentials removed from {pki.dir}.\n")
    return 0


# ------------------------------------------------------------------ renew


def run_renew(p: dict[str, Any]) -> int:
    from nkudo.agent import renewal
    from nkudo.agent.cpclient import CpError, CpUnreachable
    from nkudo.agent.identity import Pki, load_cert_info, require_enrolled, require_identity, save_identity
    from nkudo.agent.state import StateStore

    pki = Pki(p["pki_dir"])
    try:
        require_enrolled(p["state_dir"], pki)  # before StateStore() creates the directory and database
    except NkudoError as exc:
        return fail(p, exc)
    store = StateStore(p["state_dir"])
    try:
        ident = require_identity(store, pki)
        renewal.roll_forward(pki)
        info = load_cert_info(pki)
        if info is not None and not info.renew_due() and not p["force"]:
            return fail(
                p,
                NkudoError(
                    f"the certificate is not due for renewal yet (expires {info.not_after:%Y-%m-%d %H:%M} UTC; "
                    "renewal starts at two thirds of its lifetime)",
                    code=ErrorCode.RENEW_NOT_DUE,
                ),
                "Use --force to renew now.",
            )
        client = cp_client(ident, pki)
        try:
            resp = renewal.renew(client, pki, ident.agent_id)
        except (CpError, CpUnreachable) as exc:
            return fail(p, exc)
        finally:
            client.close()
        ident.record_cert(resp.client_certificate_pem.encode())
        save_identity(store, ident)
    except NkudoError as exc:
        return fail(p, exc)
    finally:
        store.close()
    if p.get("json"):
        print_json({"ok": True, "certificate_expires_at": resp.certificate_expires_at.isoformat()})
    else:
        sys.stdout.write(
            f"Certificate renewed; it expires {resp.certificate_expires_at:%Y-%m-%d %H:%M} UTC.\n"
        )
    return 0


# ------------------------------------------------------- verify-heartbeat


def run_verify_heartbeat(p: dict[str, Any]) -> int:
    import time

    from nkudo.agent.cpclient import CpError, CpUnreachable
    from nkudo.agent.identity import Pki, require_enrolled, require_identity
    from nkudo.agent.state import StateStore
    from nkudo.wire import messages as wm

    pki = Pki(p["pki_dir"])
    try:
        require_enrolled(p["state_dir"], pki)  # before StateStore() creates the directory and database
    except NkudoError as exc:
        return fail(p, exc)
    store = StateStore(p["state_dir"])
    try:
        ident = require_identity(store, pki)
        client = cp_client(ident, pki)
        t0 = time.monotonic()
        try:
            from nkudo.agent.daemon import vm_summaries

            # The same VM list as the daemon sends (so the control plane's view does not change), no leasing.
            req = wm.HeartbeatRequest(agent_version=_version(), vms=vm_summaries(store), lease=False)
            resp = client.heartbeat(req)
        except (CpError, CpUnreachable) as exc:
            return fail(p, exc)
        finally:
            client.close()
    except NkudoError as exc:
        return fail(p, exc)
    finally:
        store.close()
    took = time.monotonic() - t0
    doc = {
        "ok": True,
        "round_trip_ms": round(took * 1000, 1),
        "next_heartbeat_seconds": resp.next_heartbeat_seconds,
    }
    if p.get("json"):
        print_json(doc)
    else:
        sys.stdout.write(f"Heartbeat OK: {doc['round_trip_ms']} ms round trip to {ident.control_plane}\n")
    return 0


RUNNERS = {
    "enroll": run_enroll,
    "run": run_run,
    "status": run_status,
    "unenroll": run_unenroll,
    "renew": run_renew,
    "verify-heartbeat": run_verify_heartbeat,
}
