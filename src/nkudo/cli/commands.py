"""Implementations of the host commands (``version``, ``check``, ``hostfacts``).

Each ``run_*`` takes the parsed parameters and returns the exit code; both the
click CLI and the start-up fast path call them, so behaviour is identical.
"""

from __future__ import annotations

import os
import sys

from nkudo import __version__
from nkudo.cli.output import paint, print_json, use_colour

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def version_info() -> dict[str, Any]:
    from nkudo import _native

    u = os.uname()
    return {
        "version": __version__,
        "python": {
            "version": sys.version.split()[0],
            "implementation": sys.implementation.name,
            "executable": sys.executable,
        },
        "kernel": {"sysname": u.sysname, "release": u.release, "machine": u.machine},
        "native_disabled": _native.native_disabled(),
        "native_modules": _native.status(),
    }


def run_version(p: dict[str, Any]) -> int:
    info = version_info()
    if p.get("json"):
        print_json(info)
        return 0
    k = info["kernel"]
    lines = [
        f"nkudo-edge {info['version']}",
        f"python     {info['python']['version']} ({info['python']['implementation']}, {info['python']['executable']})",
        f"kernel     {k['sysname']} {k['release']} {k['machine']}",
        "native modules:",
    ]
    for m in info["native_modules"]:
        kind = "native" if m["native"] else "twin"
        why = m["file"] if m["native"] else m["reason"]
        lines.append(f"  {m['name']:<8} {kind:<6} {m['module']} ({why})")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def run_check(p: dict[str, Any]) -> int:
    from nkudo.host import checks

    opts = checks.CheckOptions(
        kvm_device=p["kvm_device"],
        tun_device=p["tun_device"],
        cloud_hypervisor_bin=p["cloud_hypervisor_bin"],
        bridge=p["bridge"],
        state_dir=p["state_dir"],
        runtime_dir=p["runtime_dir"],
        min_disk_gib=p["min_disk_gib"],
        min_memory_mib=p["min_memory_mib"],
        netbird_enabled=p["netbird_enabled"],
        skip=tuple(p["skip"]),
    )
    results = checks.run_checks(opts)
    counts = checks.summarize(results)
    ok = counts[checks.FAIL] == 0
    if p.get("json"):
        print_json({"ok": ok, "summary": counts, "checks": [r.to_dict() for r in results]})
        return 0 if ok else 1
    colour = use_colour(sys.stdout)
    marks = {
        checks.PASS: paint("✓", "green", colour),
        checks.FAIL: paint("✗", "red", colour),
        checks.WARN: paint("!", "yellow", colour),
        checks.SKIP: paint("-", "dim", colour),
    }
    out: list[str] = []
    for r in results:
        out.append(f"{marks[r.status]} {r.title}: {r.detail}")
        if r.remedy:
            out.append(paint(f"    → {r.remedy}", "dim", colour))
    out.append("")
    if ok:
        tail = "All checks passed! System is ready."
        if counts[checks.WARN]:
            tail += f" ({counts[checks.WARN]} warning{'s' if counts[checks.WARN] != 1 else ''})"
        out.append(paint(tail, "green", colour))
    else:
        n = counts[checks.FAIL]
        out.append(
            paint(
                f"{n} check{'s' if n != 1 else ''} failed, {counts[checks.WARN]} warning"
                f"{'s' if counts[checks.WARN] != 1 else ''}. Fix the items marked ✗ before enrolling this host.",
                "red",
                colour,
            )
        )
    sys.stdout.write("\n".join(out) + "\n")
    return 0 if ok else 1


def run_hostfacts(p: dict[str, Any]) -> int:
    from nkudo.host.facts import collect

    print_json(collect(state_dir=p["state_dir"], runtime_dir=p["runtime_dir"], kvm_device=p["kvm_device"]))
    return 0


RUNNERS = {"version": run_version, "check": run_check, "hostfacts": run_hostfacts}


def _load_plan(spec: str) -> Any:
    from nkudo.errors import ValidationError

    try:
        if spec == "-":
            text = sys.stdin.read()
        else:
            with open(spec, encoding="utf-8") as f:
                text = f.read(16 * 1024 * 1024 + 1)
    except OSError as exc:
        raise ValidationError(f"cannot read plan {spec!r}: {exc.strerror}", field="plan") from None
    if len(text) > 16 * 1024 * 1024:
        raise ValidationError("plan is larger than 16 MiB", field="plan")
    from nkudo.wire import jsondoc  # maps RecursionError too (issue 10 item 10)

    return jsondoc.loads(text, what=f"plan {spec!r}", field="plan")


def run_apply(p: dict[str, Any]) -> int:
    from nkudo.agent.plan import parse_plan
    from nkudo.agent.runtime import Agent
    from nkudo.cli.agentcmds import agent_config, fail
    from nkudo.errors import NkudoError
    from nkudo.wire.vocab import ActionType, ResultStatus

    try:
        doc = _load_plan(p["plan"])
        plan_id, actions = parse_plan(doc)
        agent = Agent(agent_config(p))
    except NkudoError as exc:
        return fail(p, exc)
    try:
        agent.reconcile()
        if any(a.vm_id for a in actions if a.type == ActionType.MICROVM_CREATE):
            agent.network.ensure_bridge(p["bridge"])  # type: ignore[attr-defined]
        outcomes = agent.executor.run_plan(actions)
    except NkudoError as exc:
        return fail(p, exc)
    finally:
        agent.close()
    ok = all(o.ok for o in outcomes)
    if p.get("json"):
        print_json({"ok": ok, "plan_id": plan_id, "outcomes": [o.to_dict() for o in outcomes]})
        return 0 if ok else 1
    colour = use_colour(sys.stdout)
    for o in outcomes:
        mark = {ResultStatus.SUCCEEDED: paint("✓", "green", colour), ResultStatus.NOT_RUN: paint("-", "dim", colour)}.get(
            o.status, paint("✗", "red", colour)
        )
        dur = f" {o.duration:.3f}s" if o.duration is not None else ""
        extra = " (recorded result)" if o.replayed else ""
        line = f"{mark} {o.action_id} {o.type}{' ' + o.vm_id if o.vm_id else ''} {o.status}{dur}{extra}"
        if o.error_code:
            line += f": {o.error_code}: {o.error_message}"
        sys.stdout.write(line + "\n")
    return 0 if ok else 1


RUNNERS["apply"] = run_apply


def run_console(p: dict[str, Any]) -> int:
    from nkudo.cli.consolecmd import run_console as run

    return run(p)


RUNNERS["console"] = run_console


def _agent_runner(name: str) -> Any:
    def run(p: dict[str, Any]) -> int:
        from nkudo.cli.agentcmds import RUNNERS as AGENT

        return AGENT[name](p)

    return run


for _name in ("enroll", "run", "status", "unenroll", "renew", "verify-heartbeat"):
    RUNNERS[_name] = _agent_runner(_name)
