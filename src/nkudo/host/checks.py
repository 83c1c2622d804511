"""Preflight checks run by ``nkudo-edge check`` before a host is enrolled.

Each check returns a :class:`CheckResult` (id, status, one-line detail and, when
not passing, a remedy the operator can act on). Checks never raise: a missing
device, a bad path or a permission error becomes a failing result. The order
and the ids are part of the CLI contract (``--skip ID``, ``--json``).
"""

from __future__ import annotations

import errno as _errno
import os
import stat
import time

from nkudo.host import kvm as _kvm
from nkudo.host import syscalls

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

MIN_CH_VERSION = (48, 0)  # first release with JSON error lists; the API the agent targets
MIN_KERNEL_PIDFD = (5, 3)
RECOMMENDED_KERNEL = (5, 13)

TUNGETFEATURES = 0x800454CF
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000


class CheckResult:
    __slots__ = ("data", "detail", "duration_ms", "id", "remedy", "status", "title")

    def __init__(
        self,
        id: str,
        title: str,
        status: str,
        detail: str,
        remedy: str = "",
        data: Mapping[str, object] | None = None,
    ) -> None:
        self.id = id
        self.title = title
        self.status = status
        self.detail = detail
        self.remedy = remedy if status in (WARN, FAIL) else ""
        self.data: dict[str, object] = dict(data or {})
        self.duration_ms = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            k: getattr(self, k) for k in ("id", "title", "status", "detail", "remedy", "duration_ms", "data")
        }


class CheckOptions:
    """Inputs of the checks (already validated by the CLI)."""

    def __init__(
        self,
        *,
        kvm_device: str = "/dev/kvm",
        tun_device: str = "/dev/net/tun",
        cloud_hypervisor_bin: str = "cloud-hypervisor",
        bridge: str = "br0",
        state_dir: str = "/var/lib/nkudo-edge/state",
        runtime_dir: str = "/var/lib/nkudo-edge/vms",
        min_disk_gib: float = 10.0,
        min_memory_mib: int = 1024,
        netbird_enabled: bool = False,
        skip: tuple[str, ...] = (),
        qemu_bin: str | None = None,
    ) -> None:
        self.kvm_device = kvm_device
        self.tun_device = tun_device
        self.cloud_hypervisor_bin = cloud_hypervisor_bin
        self.bridge = bridge
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.min_disk_gib = min_disk_gib
        self.min_memory_mib = min_memory_mib
        self.netbird_enabled = netbird_enabled
        self.skip = skip
        self.qemu_bin = qemu_bin or os.environ.get("NKUDO_QEMU_BIN") or "qemu-system-x86_64"
        self._kvm: _kvm.KvmReport | None = None
        self._smoke: _kvm.SmokeReport | None = None

    def kvm_report(self) -> _kvm.KvmReport:
        if self._kvm is None:
            self._kvm = _kvm.probe_kvm(self.kvm_device, create_vm=True)
        return self._kvm

    def kvm_smoke(self) -> _kvm.SmokeReport:
        if self._smoke is None:
            self._smoke = _kvm.smoke_test(self.kvm_device)
        return self._smoke


# ---------------------------------------------------------------- helpers


def kernel_version(release: str | None = None) -> tuple[int, ...]:
    rel = release if release is not None else os.uname().release
    parts: list[int] = []
    for piece in rel.split("-", 1)[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def which(name: str) -> str | None:
    """Resolve a command like the shell would, without importing shutil."""
    if "/" in name:
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def parse_ch_version(output: str) -> tuple[int, int] | None:
    """``cloud-hypervisor v48.0.0`` → (48, 0). Returns None when unparsable."""
    for line in output.splitlines():
        for tok in line.split():
            if tok[:1] == "v" and tok[1:2].isdigit():
                nums = tok[1:].split("-", 1)[0].split(".")
                try:
                    return int(nums[0]), int(nums[1]) if len(nums) > 1 and nums[1].isdigit() else 0
                except ValueError:
                    return None
    return None


def nearest_existing(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if len(fields) > 1 and fields[1] == "kB" else 1)
    return out


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cgroup_info() -> dict[str, object]:
    """Which cgroup hierarchy is mounted at /sys/fs/cgroup and its v2 controllers."""
    mode = "none"
    v2_path = None
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split() for line in f]
    except OSError:
        mounts = []
    for m in mounts:
        if len(m) >= 3 and m[2] == "cgroup2":
            if m[1] == "/sys/fs/cgroup":
                mode, v2_path = "v2", m[1]
                break
            v2_path = v2_path or m[1]
    if mode != "v2":
        has_v1 = any(len(m) >= 3 and m[2] == "cgroup" for m in mounts)
        mode = (
            "hybrid" if has_v1 and v2_path else ("v1" if has_v1 else ("v2-elsewhere" if v2_path else "none"))
        )
    controllers: list[str] = []
    if v2_path:
        try:
            with open(os.path.join(v2_path, "cgroup.controllers"), encoding="ascii") as f:
                controllers = f.read().split()
        except OSError:
            controllers = []
    return {"mode": mode, "v2_path": v2_path, "controllers": controllers}


# ---------------------------------------------------------------- checks


def check_kvm(o: CheckOptions) -> CheckResult:
    rep = o.kvm_report()
    data = {
        "device": rep.path,
        "api_version": rep.api_version,
        "max_vcpus": rep.max_vcpus,
        "missing_caps": rep.missing_caps,
        "vm_created": rep.vm_created,
    }
    return CheckResult("kvm", "KVM available", PASS if rep.ok else FAIL, rep.detail, rep.remedy, data)


def check_kvm_exec(o: CheckOptions) -> CheckResult:
    """Run real guest code: /dev/kvm can pass every set-up call and still never run a guest (broken nesting)."""
    title = "KVM can execute guest code"
    if not o.kvm_report().ok:
        return CheckResult(
            "kvm_exec", title, SKIP, "not attempted: KVM is not available (see the KVM item)"
        )
    rep = o.kvm_smoke()
    data = {
        "device": rep.path,
        "exits": rep.exits,
        "io": rep.io,
        "failed_stage": rep.stage or None,
        "smoke_ms": rep.duration_ms,
        "nested": "hypervisor" in cpu_flags(),
    }
    return CheckResult("kvm_exec", title, PASS if rep.ok else FAIL, rep.detail, rep.remedy, data)


def check_cpu_virt(o: CheckOptions) -> CheckResult:
    flags = cpu_flags()
    arch = _kvm.machine_arch()
    found = sorted(flags & {"vmx", "svm"})
    nested = "hypervisor" in flags
    data = {"flags": found, "under_hypervisor": nested}
    if arch != "x86_64":
        return CheckResult(
            "cpu_virt", "CPU virtualization", PASS, f"no CPU flag to check on {arch}", data=data
        )
    if found:
        detail = f"{'/'.join(found)} present" + (
            " (running under a hypervisor: nested virtualization)" if nested else ""
        )
        return CheckResult("cpu_virt", "CPU virtualization", PASS, detail, data=data)
    if o.kvm_report().ok:
        return CheckResult(
            "cpu_virt",
            "CPU virtualization",
            WARN,
            "no vmx/svm flag in /proc/cpuinfo, but KVM works (nested virtualization usually hides the flag)",
            "none needed if guests run; otherwise enable nested virtualization on the outer hypervisor",
            data,
        )
    return CheckResult(
        "cpu_virt",
        "CPU virtualization",
        FAIL,
        "no vmx/svm flag in /proc/cpuinfo and KVM does not work",
        "enable VT-x/AMD-V in the firmware (or nested virtualization on the outer hypervisor)",
        data,
    )


def check_kernel(o: CheckOptions) -> CheckResult:
    u = os.uname()
    arch = _kvm.machine_arch()
    ver = kernel_version(u.release)
    data = {"sysname": u.sysname, "release": u.release, "arch": arch}
    if u.sysname != "Linux":
        return CheckResult(
            "kernel", "Kernel", FAIL, f"{u.sysname} is not Linux", "run the agent on Linux", data
        )
    if arch not in _kvm.REQUIRED_CAPS:
        return CheckResult(
            "kernel",
            "Kernel",
            FAIL,
            f"architecture {arch} is not supported",
            "use an x86_64 or aarch64 host",
            data,
        )
    if ver < RECOMMENDED_KERNEL:
        return CheckResult(
            "kernel",
            "Kernel",
            WARN,
            f"Linux {u.release} on {arch}; Cloud Hypervisor recommends 5.13 or newer",
            "upgrade the host kernel to 5.13 or newer",
            data,
        )
    return CheckResult("kernel", "Kernel", PASS, f"Linux {u.release} on {arch}", data=data)


def check_tun(o: CheckOptions) -> CheckResult:
    import fcntl
    import struct

    path = o.tun_device
    title = "TUN/TAP device"
    try:
        st = os.stat(path)
    except OSError as exc:
        return CheckResult(
            "tun",
            title,
            FAIL,
            f"{path}: {os.strerror(exc.errno or 0)}",
            "load the 'tun' module: modprobe tun",
        )
    if not stat.S_ISCHR(st.st_mode):
        return CheckResult(
            "tun",
            title,
            FAIL,
            f"{path} is not a character device",
            "recreate it: mknod /dev/net/tun c 10 200",
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return CheckResult(
            "tun",
            title,
            FAIL,
            f"{path} cannot be opened: {os.strerror(exc.errno or 0)}",
            "run the agent as root or with CAP_NET_ADMIN",
        )
    try:
        try:
            buf = fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4)
        except OSError as exc:
            return CheckResult(
                "tun",
                title,
                FAIL,
                f"{path}: TUNGETFEATURES failed ({os.strerror(exc.errno or 0)}): not a TUN device",
                "point --tun-device at /dev/net/tun",
            )
    finally:
        os.close(fd)
    (features,) = struct.unpack("=I", buf)
    need = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    data = {"features": features, "multi_queue": bool(features & IFF_MULTI_QUEUE)}
    if features & need != need:
        return CheckResult(
            "tun",
            title,
            FAIL,
            f"TUN device lacks TAP/NO_PI/VNET_HDR support (features 0x{features:x})",
            "upgrade the kernel",
            data,
        )
    mq = ", multi-queue" if features & IFF_MULTI_QUEUE else ""
    return CheckResult("tun", title, PASS, f"{path} usable (tap, vnet_hdr{mq})", data=data)


def check_vhost_net(o: CheckOptions) -> CheckResult:
    title = "vhost-net device"
    if os.path.exists("/dev/vhost-net"):
        return CheckResult("vhost_net", title, PASS, "/dev/vhost-net present")
    return CheckResult(
        "vhost_net",
        title,
        WARN,
        "/dev/vhost-net absent (Cloud Hypervisor's built-in virtio-net does not need it)",
        "optional: modprobe vhost_net",
    )


def check_cloud_hypervisor(o: CheckOptions) -> CheckResult:
    title = "Cloud Hypervisor binary found"
    minimum = f"v{MIN_CH_VERSION[0]}.{MIN_CH_VERSION[1]}"
    path = which(o.cloud_hypervisor_bin)
    if path is None:
        return CheckResult(
            "cloud_hypervisor",
            title,
            FAIL,
            f"{o.cloud_hypervisor_bin!r} not found or not executable",
            f"install cloud-hypervisor {minimum} or newer, or pass --cloud-hypervisor-bin PATH "
            "(nkudo-ch-sim stands in for demos and tests)",
        )
    import subprocess

    try:
        proc = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return CheckResult(
            "cloud_hypervisor",
            title,
            FAIL,
            f"{path} --version failed: {exc}",
            "check that the binary runs on this host",
        )
    ver = parse_ch_version(proc.stdout + "\n" + proc.stderr)
    data: dict[str, object] = {
        "path": path,
        "version": f"v{ver[0]}.{ver[1]}" if ver else None,
        "minimum": minimum,
    }
    if proc.returncode != 0 or ver is None:
        return CheckResult(
            "cloud_hypervisor",
            title,
            FAIL,
            f"{path} --version gave no version (exit {proc.returncode})",
            "check that the binary is cloud-hypervisor",
            data,
        )
    if ver < MIN_CH_VERSION:
        return CheckResult(
            "cloud_hypervisor",
            title,
            FAIL,
            f"{path} is v{ver[0]}.{ver[1]}, older than the supported minimum {minimum}",
            f"upgrade cloud-hypervisor to {minimum} or newer",
            data,
        )
    return CheckResult(
        "cloud_hypervisor", title, PASS, f"{path} v{ver[0]}.{ver[1]} (minimum {minimum})", data=data
    )


def qemu_version_from_binary(path: str) -> str | None:
    """QEMU's version read from its own banner string inside the binary, without running it.

    Why not ``qemu-system-x86_64 --version``: starting QEMU costs ~40 ms (it maps
    dozens of shared libraries), an eighth of the whole ``check`` start-up budget;
    finding the ``QEMU emulator version`` banner in the mapped file takes ~3 ms.
    """
    import mmap

    needle = b"QEMU emulator version "
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
            i = m.find(needle)
            if i < 0:
                return None
            tail = m[i + len(needle) : i + len(needle) + 32]
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    ver = tail.split(b" ", 1)[0].split(b"\0", 1)[0]
    ok = ver and all(c in b"0123456789." for c in ver)
    return ver.decode("ascii") if ok else None


def check_qemu(o: CheckOptions) -> CheckResult:
    """The second provider's binary: optional, so a missing QEMU is reported, not failed."""
    title = "QEMU binary found"
    path = which(o.qemu_bin)
    if path is None:
        return CheckResult(
            "qemu",
            title,
            SKIP,
            f"{o.qemu_bin!r} not found (optional: only --provider qemu needs it; "
            "Debian package qemu-system-x86)",
        )
    real = os.path.realpath(path)
    ver = qemu_version_from_binary(real)
    source = "banner"
    if ver is None:
        import subprocess

        try:
            proc = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=10, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            words = proc.stdout.split()
            if "version" in words and words.index("version") + 1 < len(words):
                ver = words[words.index("version") + 1]
                source = "--version"
        except (OSError, subprocess.SubprocessError):
            ver = None
    data = {"path": path, "version": ver, "version_source": source}
    if ver is None:
        return CheckResult(
            "qemu", title, WARN, f"{path} found but its version is unknown", "check that it is QEMU", data
        )
    return CheckResult("qemu", title, PASS, f"{path} {ver}", data=data)


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


def check_pidfd(o: CheckOptions) -> CheckResult:
    title = "pidfd support"
    rel = os.uname().release
    ver = kernel_version(rel)
    ok, err = syscalls.pidfd_supported()
    if ok and ver >= MIN_KERNEL_PIDFD:
        return CheckResult("pidfd", title, PASS, f"pidfd_open works (kernel {rel})")
    reason = f"pidfd_open failed: {os.strerror(err)}" if not ok else f"kernel {rel} is older than 5.3"
    return CheckResult("pidfd", title, FAIL, reason, "upgrade the kernel to 5.3 or newer (5.10+ recommended)")


CHECKS: dict[str, Callable[[CheckOptions], CheckResult]] = {
    "kvm": check_kvm,
    "kvm_exec": check_kvm_exec,
    "cpu_virt": check_cpu_virt,
    "kernel": check_kernel,
    "tun": check_tun,
    "vhost_net": check_vhost_net,
    "cloud_hypervisor": check_cloud_hypervisor,
    "qemu": check_qemu,
    "bridge": check_bridge,
    "state_dir": check_state_dir,
    "disk": check_disk,
    "memory": check_memory,
    "netbird": check_netbird,
    "cgroup": check_cgroup,
    "privileges": check_privileges,
    "pidfd": check_pidfd,
}
CHECK_IDS = tuple(CHECKS)
TITLES = {
    "kvm": "KVM available",
    "kvm_exec": "KVM can execute guest code",
    "cpu_virt": "CPU virtualization",
    "kernel": "Kernel",
    "tun": "TUN/TAP device",
    "vhost_net": "vhost-net device",
    "cloud_hypervisor": "Cloud Hypervisor binary found",
    "qemu": "QEMU binary found",
    "bridge": "Bridge exists",
    "state_dir": "State directory writable",
    "disk": "Disk space sufficient",
    "memory": "Memory sufficient",
    "netbird": "NetBird installed",
    "cgroup": "cgroup v2 controllers",
    "privileges": "Privileges",
    "pidfd": "pidfd support",
}


def run_checks(opts: CheckOptions) -> list[CheckResult]:
    results = []
    for cid, fn in CHECKS.items():
        start = time.perf_counter()
        if cid in opts.skip:
            res = CheckResult(cid, TITLES.get(cid, cid), SKIP, "skipped by --skip")
        else:
            try:
                res = fn(opts)
            except Exception as exc:  # a check must never crash the command
                res = CheckResult(
                    cid, cid, FAIL, f"check crashed: {type(exc).__name__}: {exc}", "report this as a bug"
                )
        res.duration_ms = round((time.perf_counter() - start) * 1000, 3)
        results.append(res)
    return results


def summarize(results: list[CheckResult]) -> dict[str, int]:
    counts = {PASS: 0, WARN: 0, FAIL: 0, SKIP: 0}
    for r in results:
        counts[r.status] += 1
    return counts
