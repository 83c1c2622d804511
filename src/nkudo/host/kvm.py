"""KVM preflight probe of ``/dev/kvm`` (native ``nkudo_native.kvm`` or its twin, via ``nkudo._native``).

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
    """Run the probe natively when loaded (``native`` as in :func:`nkudo._native.binding`)."""
    return _native.binding("kvm", native).module.probe(path, caps, create_vm)  # type: ignore[no-any-return]


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


# ------------------------------------------------------------------ guest-execution smoke test
#
# Why: on a host with broken nested virtualisation /dev/kvm opens, answers every
# capability query and creates VMs, yet no guest instruction ever runs. The only
# proof is to run some: 5 bytes of real-mode code that write one byte to an I/O
# port and halt. Two exits (KVM_EXIT_IO with the expected port and value, then
# KVM_EXIT_HLT) prove that KVM entered the guest, executed it and trapped back.

KVM_CREATE_VCPU = 0xAE41
KVM_SET_TSS_ADDR = 0xAE47
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
}  # fmt: skip
#: ``mov al, 0x4e; out 0x10, al; hlt`` at guest-physical 0x1000 (mirrored in ``nkudo_native/kvm.pyx``).
SMOKE_CODE = bytes((0xB0, 0x4E, 0xE6, 0x10, 0xF4))
SMOKE_GUEST_ADDR = 0x1000
SMOKE_PORT = 0x10
SMOKE_VALUE = 0x4E
_SMOKE_MAX_EXITS = 8

SmokeRaw = tuple[str, int, tuple[int, ...], tuple[int, int, int, int]]


def _smoke_py(path: str | bytes) -> SmokeRaw:
    """Twin of ``nkudo_native.kvm.smoke``: same ioctls in the same order, same raw result."""
    import mmap
    import struct

    if isinstance(path, str):
        bpath = path.encode("utf-8", "surrogateescape")
    else:
        bpath = bytes(path)
    if b"\0" in bpath:
        raise ValueError("embedded null byte")
    exits: list[int] = []
    io = (-1, -1, -1, -1)
    fds: list[int] = []
    maps: list[mmap.mmap] = []
    stage = "open"
    try:
        kvm = os.open(bpath, os.O_RDWR | os.O_CLOEXEC)
        fds.append(kvm)
        stage = "create_vm"
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(vm)
        if machine_arch() != "x86_64":
            raise OSError(_errno.ENOSYS, "arch")
        stage = "set_tss_addr"
        fcntl.ioctl(vm, KVM_SET_TSS_ADDR, 0x7FFFD000)  # below 2 GiB: fcntl.ioctl passes a C int
        stage = "mmap_memory"
        mem = mmap.mmap(-1, 0x1000, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        maps.append(mem)
        mem[: len(SMOKE_CODE)] = SMOKE_CODE
        stage = "set_user_memory_region"
        import ctypes  # only here: the twin needs the mapping's address, the native path never imports it

        anchor = ctypes.c_char.from_buffer(mem)
        addr = ctypes.addressof(anchor)
        del anchor
        region = struct.pack("=IIQQQ", 0, 0, SMOKE_GUEST_ADDR, 0x1000, addr)
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        stage = "create_vcpu"
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        fds.append(vcpu)
        stage = "get_vcpu_mmap_size"
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        if run_size <= 0:
            raise OSError(_errno.EINVAL, stage)
        stage = "mmap_vcpu"
        run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        maps.append(run)
        stage = "get_sregs"
        sregs = bytearray(312)
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs, True)
        struct.pack_into("=Q", sregs, 0, 0)  # cs.base
        struct.pack_into("=H", sregs, 12, 0)  # cs.selector
        stage = "set_sregs"
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        stage = "set_regs"
        regs = bytearray(144)
        struct.pack_into("=QQ", regs, 128, SMOKE_GUEST_ADDR, 0x2)  # rip, rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        stage = "run"
        while len(exits) < _SMOKE_MAX_EXITS:
            try:
                fcntl.ioctl(vcpu, KVM_RUN, 0)
            except InterruptedError:
                continue
            (reason,) = struct.unpack_from("=I", run, 8)
            exits.append(reason)
            if reason != KVM_EXIT_IO:
                break
            direction, size, port, _count, data_offset = struct.unpack_from("=BBHIQ", run, 32)
            io = (direction, size, port, run[data_offset])
        return ("", 0, tuple(exits), io)
    except OSError as exc:
        return (stage, exc.errno or _errno.EIO, tuple(exits), io)
    finally:
        for m in reversed(maps):
            m.close()
        for fd in reversed(fds):
            os.close(fd)


def raw_smoke(path: str, *, native: bool | None = None) -> SmokeRaw:
    """Run the smoke test natively when loaded (``native`` as in :func:`nkudo._native.binding`)."""
    return _native.binding("kvm", native).module.smoke(path)  # type: ignore[no-any-return]


class SmokeReport:
    """Diagnosis of one smoke test. ``ok`` means KVM entered the guest, ran its code and trapped back."""

    __slots__ = ("detail", "duration_ms", "errno", "exits", "io", "ok", "path", "remedy", "stage")

    def __init__(self, path: str) -> None:
        self.path = path
        self.ok = False
        self.stage = ""
        self.errno = 0
        self.exits: list[str] = []
        self.io: dict[str, int] | None = None
        self.duration_ms = 0.0
        self.detail = ""
        self.remedy = ""

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


_BROKEN_NESTED = (
    "/dev/kvm works for set-up calls but cannot run guests: enable nested virtualisation on the outer "
    "hypervisor (kvm_intel nested=1 / kvm_amd nested=1 there), or run guests without KVM "
    "(nkudo-edge apply --provider qemu --qemu-accel tcg, much slower)"
)


def smoke_test(path: str = "/dev/kvm", *, native: bool | None = None) -> SmokeReport:
    """Run guest code once and explain the outcome (shared by ``check`` and the QEMU provider)."""
    import time

    rep = SmokeReport(path)
    t0 = time.perf_counter()
    stage, err, exits, io = raw_smoke(path, native=native)
    rep.duration_ms = round((time.perf_counter() - t0) * 1000, 3)
    rep.stage, rep.errno = stage, err
    rep.exits = [KVM_EXIT_NAMES.get(e, str(e)) for e in exits]
    if io[0] >= 0:
        rep.io = {"direction": io[0], "size": io[1], "port": io[2], "value": io[3]}
    arch = machine_arch()
    if stage == "open":
        rep.detail, rep.remedy = _open_remedy(err, path, arch)
        return rep
    if stage == "arch":
        rep.detail = f"the guest-execution test is implemented for x86_64 only (this host is {arch})"
        rep.remedy = "none: KVM itself may still work; check guests by booting one"
        return rep
    if stage in ("create_vm", "set_tss_addr", "set_user_memory_region", "create_vcpu"):
        rep.detail = f"KVM refused to set up a test VM ({stage}: {os.strerror(err)})"
        rep.remedy = (
            "stop other hypervisors using VT-x/AMD-V"
            if err == _errno.EBUSY
            else "check dmesg for KVM errors; " + _BROKEN_NESTED
        )
        return rep
    if stage:
        rep.detail = f"the test vCPU could not run ({stage}: {os.strerror(err)})"
        rep.remedy = _BROKEN_NESTED if stage == "run" else "check dmesg for KVM errors"
        return rep
    want_io = {"direction": 1, "size": 1, "port": SMOKE_PORT, "value": SMOKE_VALUE}
    if exits[:2] == (KVM_EXIT_IO, KVM_EXIT_HLT) and rep.io == want_io:
        rep.ok = True
        rep.detail = f"test guest ran: OUT 0x{SMOKE_PORT:02x} then HLT (time in duration_ms)"
        return rep
    rep.detail = (
        "the test guest did not run as written: exits "
        + (", ".join(rep.exits) or "none")
        + (f", I/O {rep.io}" if rep.io else "")
        + " (expected IO on port 0x10 with 0x4e, then HLT)"
    )
    rep.remedy = _BROKEN_NESTED
    return rep
