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
