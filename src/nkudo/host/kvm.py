"""KVM preflight probe of ``/dev/kvm`` (native ``nkudo_native.kvm`` with a Python twin).

The raw probe returns numbers only; :func:`probe_kvm` turns them into a report
with the operator-facing diagnosis, so both implementations share every
sentence and every decision.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os

from nkudo import _native

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_API_VERSION = 12

# Capabilities Cloud Hypervisor refuses to run without (hypervisor/src/kvm/*/mod.rs).
REQUIRED_CAPS: dict[str, dict[str, int]] = {
    "x86_64": {
        "KVM_CAP_ADJUST_CLOCK": 39,
        "KVM_CAP_EXT_CPUID": 7,
        "KVM_CAP_GET_TSC_KHZ": 61,
        "KVM_CAP_IMMEDIATE_EXIT": 136,
        "KVM_CAP_IOEVENTFD": 36,
        "KVM_CAP_IRQCHIP": 0,
        "KVM_CAP_IRQFD": 32,
        "KVM_CAP_IRQ_ROUTING": 25,
        "KVM_CAP_MP_STATE": 14,
        "KVM_CAP_SET_IDENTITY_MAP_ADDR": 37,
        "KVM_CAP_SET_TSS_ADDR": 4,
        "KVM_CAP_SPLIT_IRQCHIP": 121,
        "KVM_CAP_TSC_DEADLINE_TIMER": 72,
        "KVM_CAP_USER_MEMORY": 3,
        "KVM_CAP_USER_NMI": 22,
        "KVM_CAP_VCPU_EVENTS": 41,
        "KVM_CAP_XSAVE": 55,
    },
    "aarch64": {
        "KVM_CAP_IMMEDIATE_EXIT": 136,
        "KVM_CAP_IOEVENTFD": 36,
        "KVM_CAP_IRQCHIP": 0,
        "KVM_CAP_IRQFD": 32,
        "KVM_CAP_IRQ_ROUTING": 25,
        "KVM_CAP_MP_STATE": 14,
        "KVM_CAP_ONE_REG": 70,
        "KVM_CAP_USER_MEMORY": 3,
    },
}
# Numeric facts reported (not required).
INFO_CAPS: dict[str, int] = {
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_MAX_VCPU_ID": 128,
    "KVM_CAP_NR_MEMSLOTS": 10,
}

RawProbe = tuple[int, int, tuple[int, ...], int, int]


def _probe_py(path: str | bytes, caps: list[int] | tuple[int, ...], create_vm: bool) -> RawProbe:
    """Twin of ``nkudo_native.kvm.probe``: same ioctls, same raw result."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return (exc.errno or _errno.EIO, -1, (), -1, -1)
    try:
        try:
            api = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        except OSError as exc:
            api = -(exc.errno or _errno.EIO)
        if api != KVM_API_VERSION:
            return (0, api, (), -1, -1)
        values = []
        for cap in caps:
            try:
                values.append(fcntl.ioctl(fd, KVM_CHECK_EXTENSION, int(cap)))
            except OSError as exc:
                values.append(-(exc.errno or _errno.EIO))
        try:
            mmap_size = fcntl.ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        except OSError as exc:
            mmap_size = -(exc.errno or _errno.EIO)
        create_err = -1
        if create_vm:
            try:
                vmfd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
            except OSError as exc:
                create_err = exc.errno or _errno.EIO
            else:
                os.close(vmfd)
                create_err = 0
        return (0, api, tuple(values), mmap_size, create_err)
    finally:
        os.close(fd)


def raw_probe(
    path: str, caps: list[int] | tuple[int, ...], create_vm: bool, *, native: bool | None = None
) -> RawProbe:
    """Run the probe with the native module when loaded (or as forced by ``native``)."""
    mod = _native.load("kvm") if native is not False else None
    if native is True and mod is None:
        raise RuntimeError(f"native kvm module unavailable: {_native.reason('kvm')}")
    if mod is not None:
        return mod.probe(path, caps, create_vm)  # type: ignore[no-any-return]
    return _probe_py(path, caps, create_vm)


def machine_arch() -> str:
    m = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m.lower(), m)


class KvmReport:
    """Diagnosis of one probe. ``ok`` means Cloud Hypervisor can create VMs here."""

    __slots__ = (
        "api_version",
        "arch",
        "caps",
        "detail",
        "max_vcpus",
        "missing_caps",
        "ok",
        "path",
        "remedy",
        "vcpu_mmap_size",
        "vm_created",
    )

    def __init__(self, path: str, arch: str) -> None:
        self.path = path
        self.arch = arch
        self.ok = False
        self.api_version: int | None = None
        self.caps: dict[str, int] = {}
        self.missing_caps: list[str] = []
        self.max_vcpus: int | None = None
        self.vcpu_mmap_size: int | None = None
        self.vm_created: bool | None = None
        self.detail = ""
        self.remedy = ""

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


def _open_remedy(err: int, path: str, arch: str) -> tuple[str, str]:
    module_hint = "kvm_intel or kvm_amd" if arch == "x86_64" else "kvm"
    if err == _errno.ENOENT:
        return (
            f"{path} does not exist",
            f"load the {module_hint} module (modprobe) and enable virtualization (VT-x/AMD-V) in the firmware",
        )
    if err in (_errno.EACCES, _errno.EPERM):
        return (
            f"{path} cannot be opened read-write (permission denied)",
            "run the agent as root or add its user to the group that owns /dev/kvm (usually 'kvm')",
        )
    if err == _errno.EISDIR:
        return (
            f"{path} is a directory, not the KVM device",
            "point --kvm-device at the KVM character device",
        )
    if err == _errno.ENXIO or err == _errno.ENODEV:
        return (f"{path}: no such device (driver not loaded)", f"load the {module_hint} module")
    return (f"{path} cannot be opened: {os.strerror(err)}", "check the device node and its permissions")


def probe_kvm(path: str = "/dev/kvm", *, create_vm: bool = True, native: bool | None = None) -> KvmReport:
    arch = machine_arch()
    rep = KvmReport(path, arch)
    required = REQUIRED_CAPS.get(arch, {})
    names = [*required, *INFO_CAPS]
    numbers = [*required.values(), *INFO_CAPS.values()]
    open_err, api, values, mmap_size, create_err = raw_probe(path, numbers, create_vm, native=native)
    if open_err:
        rep.detail, rep.remedy = _open_remedy(open_err, path, arch)
        return rep
    if api < 0:
        rep.api_version = None
        if -api == _errno.ENOTTY or -api == _errno.EINVAL:
            rep.detail = f"{path} is not a KVM device (KVM_GET_API_VERSION: {os.strerror(-api)})"
            rep.remedy = "point --kvm-device at /dev/kvm"
        else:
            rep.detail = f"KVM_GET_API_VERSION failed on {path}: {os.strerror(-api)}"
            rep.remedy = "check the kvm module and dmesg for errors"
        return rep
    rep.api_version = api
    if api != KVM_API_VERSION:
        rep.detail = f"KVM API version {api}, Cloud Hypervisor needs {KVM_API_VERSION}"
        rep.remedy = "upgrade the host kernel"
        return rep
    rep.caps = dict(zip(names, values, strict=True))
    rep.missing_caps = [n for n in required if rep.caps.get(n, 0) <= 0]
    rep.vcpu_mmap_size = mmap_size if mmap_size > 0 else None
    max_v = rep.caps.get("KVM_CAP_MAX_VCPUS", 0)
    rep.max_vcpus = max_v if max_v > 0 else (rep.caps.get("KVM_CAP_NR_VCPUS", 0) or 4)
    if create_vm:
        rep.vm_created = create_err == 0
    if not required:
        rep.detail = f"architecture {arch} is not supported by Cloud Hypervisor"
        rep.remedy = "run on an x86_64 or aarch64 host"
        return rep
    if rep.missing_caps:
        rep.detail = "missing KVM capabilities: " + ", ".join(rep.missing_caps)
        rep.remedy = "upgrade the host kernel (Cloud Hypervisor recommends 5.13 or newer)"
        return rep
    if create_vm and create_err:
        if create_err == _errno.EBUSY:
            rep.detail = "KVM_CREATE_VM failed: another hypervisor owns the virtualization extensions (EBUSY)"
            rep.remedy = "stop other hypervisors (VirtualBox, VMware) on this host"
        else:
            rep.detail = f"KVM_CREATE_VM failed: {os.strerror(create_err)}"
            rep.remedy = "check free memory and dmesg for KVM errors"
        return rep
    rep.ok = True
    rep.detail = (
        f"API {api}, {len(required)}/{len(required)} required capabilities, max {rep.max_vcpus} vCPUs"
        + (", test VM created" if create_vm else "")
    )
    return rep
