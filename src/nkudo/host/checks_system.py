"""Preflight checks of the host around the VMs: bridge, state directory, disk, memory, NetBird, cgroups, privileges.

Why grouped: each asks whether the agent can keep state and wire VMs up here,
independently of the hypervisor.
"""

from __future__ import annotations

import errno as _errno
import os
import stat

from nkudo.host import syscalls
from nkudo.host.checkbase import FAIL, PASS, SKIP, WARN, CheckOptions, CheckResult
from nkudo.host.probes import cgroup_info, meminfo, nearest_existing, which


def check_bridge(o: CheckOptions) -> CheckResult:
    from nkudo.errors import NkudoError
    from nkudo.net.hostnet import open_backend

    title = f"Bridge {o.bridge} exists"
    create = f"create it: ip link add {o.bridge} type bridge && ip link set {o.bridge} up"
    try:
        with open_backend("auto") as net:
            link = net.get_link(o.bridge)
    except NkudoError as exc:
        return CheckResult("bridge", title, FAIL, exc.message, "check the --bridge value and run as root")
    if link is None:
        return CheckResult("bridge", title, FAIL, f"no interface named {o.bridge}", create)
    data = {"index": link.index, "mtu": link.mtu, "mac": link.mac, "operstate": link.operstate, "kind": link.kind}
    if link.kind != "bridge":
        return CheckResult(
            "bridge",
            title,
            FAIL,
            f"{o.bridge} exists but is a {link.kind or 'plain'} device, not a bridge",
            "pass --bridge with the name of a Linux bridge",
            data,
        )
    if not link.up:
        return CheckResult("bridge", title, FAIL, f"bridge {o.bridge} is down", f"ip link set {o.bridge} up", data)
    return CheckResult("bridge", title, PASS, f"bridge {o.bridge} is up (mtu {link.mtu})", data=data)


def _probe_write(directory: str) -> str | None:
    """Create, fsync and remove a probe file; return an error sentence or None."""
    name = os.path.join(directory, f".nkudo-check-{os.getpid()}")
    try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == _errno.EROFS:
            return f"{directory} is on a read-only file system"
        return f"cannot create a file in {directory}: {os.strerror(exc.errno or 0)}"
    try:
        os.write(fd, b"nkudo")
        os.fsync(fd)
    except OSError as exc:
        return f"cannot write/fsync in {directory}: {os.strerror(exc.errno or 0)}"
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        return f"cannot fsync directory {directory}: {os.strerror(exc.errno or 0)}"
    return None


def check_state_dir(o: CheckOptions) -> CheckResult:
    title = "State directory writable"
    path = os.path.abspath(o.state_dir)
    data: dict[str, object] = {"path": path}
    if os.path.lexists(path) and not os.path.isdir(path):
        return CheckResult(
            "state_dir",
            title,
            FAIL,
            f"{path} exists and is not a directory",
            "remove it or pick another --state-dir",
            data,
        )
    if not os.path.isdir(path):
        base = nearest_existing(path)
        data["creatable_from"] = base
        if not os.path.isdir(base):
            return CheckResult(
                "state_dir", title, FAIL, f"{base} is not a directory", "pick another --state-dir", data
            )
        err = _probe_write(base)
        if err:
            return CheckResult(
                "state_dir",
                title,
                FAIL,
                f"{path} does not exist and {err}",
                "create it as root: install -d -m 0700 " + path,
                data,
            )
        return CheckResult(
            "state_dir", title, PASS, f"{path} does not exist yet; it will be created (mode 0700)", data=data
        )
    st = os.stat(path)
    data.update(mode=oct(stat.S_IMODE(st.st_mode)), uid=st.st_uid)
    err = _probe_write(path)
    if err:
        return CheckResult(
            "state_dir",
            title,
            FAIL,
            err,
            f"make {path} writable by the agent (owner uid {os.geteuid()})",
            data,
        )
    if st.st_uid != os.geteuid():
        return CheckResult(
            "state_dir",
            title,
            WARN,
            f"{path} is owned by uid {st.st_uid}, the agent runs as {os.geteuid()}",
            f"chown {os.geteuid()} {path}",
            data,
        )
    if st.st_mode & 0o022:
        return CheckResult(
            "state_dir",
            title,
            WARN,
            f"{path} is group/world writable (mode {oct(stat.S_IMODE(st.st_mode))})",
            f"chmod 0700 {path}",
            data,
        )
    return CheckResult(
        "state_dir", title, PASS, f"{path} writable (mode {oct(stat.S_IMODE(st.st_mode))})", data=data
    )


def check_disk(o: CheckOptions) -> CheckResult:
    title = "Disk space sufficient"
    need = int(o.min_disk_gib * 1024**3)
    seen: dict[int, str] = {}
    parts: list[str] = []
    data: dict[str, object] = {"min_free_bytes": need, "paths": {}}
    low: list[str] = []
    for label, p in (("state", o.state_dir), ("vms", o.runtime_dir)):
        base = nearest_existing(p)
        try:
            st = os.statvfs(base)
            dev = os.stat(base).st_dev
        except OSError as exc:
            return CheckResult(
                "disk",
                title,
                FAIL,
                f"cannot stat {base}: {os.strerror(exc.errno or 0)}",
                "check the path",
                data,
            )
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        data["paths"][p] = {"free_bytes": free, "total_bytes": total}  # type: ignore[index]
        if dev in seen:
            continue
        seen[dev] = p
        parts.append(f"{label} {free / 1024**3:.1f} GiB free")
        if free < need:
            low.append(p)
    detail = ", ".join(parts) + f" (minimum {o.min_disk_gib:g} GiB)"
    if low:
        return CheckResult(
            "disk", title, FAIL, detail, f"free space under {', '.join(low)} or lower --min-disk-gib", data
        )
    return CheckResult("disk", title, PASS, detail, data=data)


def check_memory(o: CheckOptions) -> CheckResult:
    title = "Memory sufficient"
    try:
        mi = meminfo()
    except OSError as exc:
        return CheckResult(
            "memory", title, FAIL, f"cannot read /proc/meminfo: {os.strerror(exc.errno or 0)}", "mount /proc"
        )
    avail = mi.get("MemAvailable", mi.get("MemFree", 0))
    total = mi.get("MemTotal", 0)
    data = {"available_bytes": avail, "total_bytes": total, "min_available_bytes": o.min_memory_mib * 1024**2}
    detail = (
        f"{avail / 1024**2:.0f} MiB available of {total / 1024**2:.0f} MiB (minimum {o.min_memory_mib} MiB)"
    )
    if avail < o.min_memory_mib * 1024**2:
        return CheckResult("memory", title, FAIL, detail, "free memory or lower --min-memory-mib", data)
    return CheckResult("memory", title, PASS, detail, data=data)


def check_netbird(o: CheckOptions) -> CheckResult:
    title = "NetBird installed"
    if not o.netbird_enabled:
        return CheckResult("netbird", title, SKIP, "NetBird not enabled (pass --netbird-enabled to check it)")
    path = which("netbird")
    if path is None:
        return CheckResult(
            "netbird", title, FAIL, "netbird not found on PATH", "install NetBird or drop --netbird-enabled"
        )
    import subprocess

    try:
        proc = subprocess.run(
            [path, "status"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return CheckResult(
            "netbird", title, FAIL, f"netbird status failed: {exc}", "check the NetBird installation"
        )
    status: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            status[k.strip().lower()] = v.strip()
    data = {
        "path": path,
        "exit_code": proc.returncode,
        "management": status.get("management"),
        "signal": status.get("signal"),
    }
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        return CheckResult(
            "netbird",
            title,
            FAIL,
            f"netbird daemon not running ({msg[0] if msg else 'exit ' + str(proc.returncode)})",
            "start it: netbird service start && netbird up",
            data,
        )
    if (status.get("management") or "").lower().startswith("connected"):
        return CheckResult("netbird", title, PASS, f"{path}: management connected", data=data)
    return CheckResult(
        "netbird",
        title,
        WARN,
        f"{path}: management {status.get('management', 'unknown')}",
        "run: netbird up",
        data,
    )


def check_cgroup(o: CheckOptions) -> CheckResult:
    title = "cgroup v2 controllers"
    info = cgroup_info()
    ctrls = set(info["controllers"])  # type: ignore[call-overload]
    missing = sorted({"cpu", "memory", "io"} - ctrls)
    if info["mode"] != "v2":
        return CheckResult(
            "cgroup",
            title,
            WARN,
            f"cgroup hierarchy is {info['mode']} (not unified v2 at /sys/fs/cgroup); per-VM resource limits unavailable",
            "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2)",
            info,
        )
    if missing:
        return CheckResult(
            "cgroup",
            title,
            WARN,
            f"cgroup v2 lacks controllers: {', '.join(missing)}",
            "enable them in the kernel/boot options",
            info,
        )
    return CheckResult("cgroup", title, PASS, "cgroup v2 with cpu, memory and io controllers", data=info)


def check_privileges(o: CheckOptions) -> CheckResult:
    title = "Privileges"
    if os.geteuid() == 0:
        return CheckResult("privileges", title, PASS, "running as root")
    caps = syscalls.cap_effective()
    if caps >= 0 and caps & (1 << syscalls.CAP_NET_ADMIN):
        return CheckResult("privileges", title, PASS, f"uid {os.geteuid()} with CAP_NET_ADMIN")
    return CheckResult(
        "privileges",
        title,
        FAIL,
        f"uid {os.geteuid()} is not root and lacks CAP_NET_ADMIN",
        "run as root, or grant CAP_NET_ADMIN (the shipped systemd unit does)",
    )
