"""Preflight checks of the virtualisation stack: KVM, CPU, kernel, TUN, vhost, hypervisors, pidfd.

Why grouped: each asks whether this host can create and control a microVM;
none looks at storage or the network beyond the TUN device.
"""

from __future__ import annotations

import os
import stat

from nkudo.host import kvm as _kvm
from nkudo.host import syscalls
from nkudo.host.checkbase import (
    FAIL,
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    MIN_CH_VERSION,
    MIN_KERNEL_PIDFD,
    PASS,
    RECOMMENDED_KERNEL,
    SKIP,
    TUNGETFEATURES,
    WARN,
    CheckOptions,
    CheckResult,
)
from nkudo.host.probes import cpu_flags, kernel_version, parse_ch_version, qemu_version_from_binary, which


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


def check_pidfd(o: CheckOptions) -> CheckResult:
    title = "pidfd support"
    rel = os.uname().release
    ver = kernel_version(rel)
    ok, err = syscalls.pidfd_supported()
    if ok and ver >= MIN_KERNEL_PIDFD:
        return CheckResult("pidfd", title, PASS, f"pidfd_open works (kernel {rel})")
    reason = f"pidfd_open failed: {os.strerror(err)}" if not ok else f"kernel {rel} is older than 5.3"
    return CheckResult("pidfd", title, FAIL, reason, "upgrade the kernel to 5.3 or newer (5.10+ recommended)")
