"""Host facts sent with every heartbeat (psutil, /proc and /sys; no subprocesses)."""

from __future__ import annotations

import os
import socket

from nkudo import __version__
from nkudo.host import probes
from nkudo.host.kvm import probe_kvm

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def os_release() -> dict[str, str]:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                out = {}
                for line in f:
                    k, sep, v = line.strip().partition("=")
                    if sep and k:
                        out[k] = v.strip().strip('"')
                return {k: out[k] for k in ("ID", "VERSION_ID", "PRETTY_NAME") if k in out}
        except OSError:
            continue
    return {}


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() in ("model name", "Model", "cpu model"):
                    return v.strip()
    except OSError:
        pass
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def interfaces() -> list[dict[str, Any]]:
    """Every interface with MAC, MTU, state, master and whether it is a bridge."""
    out: list[dict[str, Any]] = []
    base = "/sys/class/net"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        d = os.path.join(base, name)
        master = None
        try:
            master = os.path.basename(os.readlink(os.path.join(d, "master")))
        except OSError:
            master = None
        mtu = _read(os.path.join(d, "mtu"))
        out.append(
            {
                "name": name,
                "mac": _read(os.path.join(d, "address")),
                "mtu": int(mtu) if mtu and mtu.isdigit() else None,
                "state": _read(os.path.join(d, "operstate")),
                "master": master,
                "is_bridge": os.path.isdir(os.path.join(d, "bridge")),
                "is_tap": os.path.exists(os.path.join(d, "tun_flags")),
                "alias": _read(os.path.join(d, "ifalias")) or None,
            }
        )
    return out


def _disk(path: str) -> dict[str, Any]:
    import psutil

    base = probes.nearest_existing(path)
    try:
        du = psutil.disk_usage(base)
    except OSError as exc:
        return {"path": path, "error": os.strerror(exc.errno or 0)}
    return {
        "path": path,
        "measured_at": base,
        "total_bytes": du.total,
        "used_bytes": du.used,
        "free_bytes": du.free,
    }


def collect(*, state_dir: str, runtime_dir: str, kvm_device: str = "/dev/kvm") -> dict[str, Any]:
    import psutil

    u = os.uname()
    vm = psutil.virtual_memory()
    flags = probes.cpu_flags()
    kvm = probe_kvm(kvm_device, create_vm=False)
    ifs = interfaces()
    return {
        "hostname": socket.gethostname(),
        "os": os_release(),
        "kernel": {"sysname": u.sysname, "release": u.release, "version": u.version},
        "arch": u.machine,
        "cpu": {
            "model": cpu_model(),
            "count": psutil.cpu_count(logical=True),
            "physical": psutil.cpu_count(logical=False),
            "virtualization_flags": sorted(flags & {"vmx", "svm"}),
            "under_hypervisor": "hypervisor" in flags,
        },
        "memory": {"total_bytes": vm.total, "available_bytes": vm.available},
        "disks": [_disk(p) for p in (state_dir, runtime_dir, "/")],
        "kvm": {
            "usable": kvm.ok,
            "device": kvm.path,
            "api_version": kvm.api_version,
            "max_vcpus": kvm.max_vcpus,
            "missing_caps": kvm.missing_caps,
            "detail": kvm.detail,
        },
        "interfaces": ifs,
        "bridges": [i["name"] for i in ifs if i["is_bridge"]],
        "cgroup": probes.cgroup_info(),
        "agent_version": __version__,
    }
