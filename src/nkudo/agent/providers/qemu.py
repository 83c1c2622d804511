"""QEMU adapter: one ``qemu-system-x86_64 -M microvm`` per VM, driven over QMP.

Why QEMU next to Cloud Hypervisor: QEMU is packaged everywhere (Debian's
``qemu-system-x86``) and runs guests with or without KVM, so the lifecycle can
be proven on a real kernel on hosts where KVM cannot run guests.

Shared, not copied: process supervision (pidfd spawn, adoption after an agent
restart, the supervisor thread that reports unrequested exits), handle caching
and termination come from :class:`CloudHypervisorProvider`, which this class
extends; TAPs, durable state and idempotency live in the handlers
(:mod:`nkudo.agent.vms`) as for every provider. Only the VMM dialect differs:
a command line instead of ``vm.create``, and QMP instead of the REST API.

The actions: create = spawn with ``-S`` (configured, CPUs not started:
``prelaunch``), boot/resume = ``cont``, pause = ``stop``, snapshot = pause +
``migrate`` of the whole device and RAM state into a file in the snapshot
directory + resume if it was running, restore = spawn with ``-incoming defer`` and
``migrate-incoming`` from that file (then ``cont``), stop = ``system_powerdown`` (ACPI power
button; the guest powers itself off and QEMU exits) then ``quit`` after the
timeout, then signals; delete = stop + the handlers' clean-up.

Acceleration (``accel``): ``kvm``, ``tcg`` or ``auto``. ``auto`` uses KVM only
when the guest-execution smoke test passes *and* the host is not itself a
virtual machine (no ``hypervisor`` CPU flag). Why so strict: the smoke test
proves KVM runs real-mode code, not that a Linux guest (long mode, APIC
timer, MSRs) runs; on nested hosts with broken nested virtualisation the
smoke test passes and a Linux guest under QEMU+KVM hangs right after its
decompressor, for ever and silently. A wrong TCG choice costs speed; a wrong
KVM choice costs the VM. Operators who have seen guests boot under nested
KVM pass ``--qemu-accel kvm``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from nkudo.agent.provider import LaunchSpec, ProcessRecord, VmPaths
from nkudo.agent.providers.base import ExitCallback, VmmProcessProvider
from nkudo.errors import NkudoError
from nkudo.proc import process as proc
from nkudo.qmp import QmpClient, QmpCommandError, QmpConnectionClosedError, QmpError, QmpTransportError
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ErrorCode

ACCELS = ("auto", "kvm", "tcg")
SNAPSHOT_FILE = "vmstate.bin"
SNAPSHOT_META = "vmstate.json"
_STATES = {
    "prelaunch": VmStatus.CREATED,
    "running": VmStatus.RUNNING,
    "paused": VmStatus.PAUSED,
    "suspended": VmStatus.PAUSED,
    "postmigrate": VmStatus.PAUSED,  # after a snapshot of a paused VM; `cont` resumes it
    "finish-migrate": VmStatus.PAUSED,
    "save-vm": VmStatus.PAUSED,
    "restore-vm": VmStatus.PAUSED,
    "inmigrate": VmStatus.CREATED,
    "debug": VmStatus.PAUSED,
    "shutdown": VmStatus.STOPPED,
}


def host_tsc_khz() -> int | None:
    """The host TSC rate in kHz (``cpu MHz`` of /proc/cpuinfo with ``constant_tsc``), or None."""
    mhz = None
    constant = False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "cpu MHz" and mhz is None:
                    mhz = float(val)
                elif key == "flags":
                    constant = "constant_tsc" in val.split()
                    break
    except (OSError, ValueError):
        return None
    return round(mhz * 1000) if mhz and constant else None


def choose_accel(requested: str, kvm_device: str = "/dev/kvm") -> tuple[str, str]:
    """(accel, reason) for ``requested`` in :data:`ACCELS` (see the module docstring for ``auto``)."""
    if requested not in ACCELS:
        raise NkudoError(
            f"--qemu-accel must be one of {', '.join(ACCELS)} (got {requested!r})", code=ErrorCode.INVALID_ARGUMENT
        )
    if requested != "auto":
        return requested, "requested"
    from nkudo.host.checks import cpu_flags
    from nkudo.host.kvm import smoke_test

    rep = smoke_test(kvm_device)
    if not rep.ok:
        return "tcg", f"KVM cannot execute guest code here ({rep.detail})"
    if "hypervisor" in cpu_flags():
        return "tcg", (
            "this host is itself a VM: KVM ran the smoke test, but Linux guests under nested KVM are not "
            "proven to boot (pass --qemu-accel kvm once they do)"
        )
    return "kvm", f"KVM executed guest code ({rep.duration_ms:.1f} ms) on a bare-metal host"


def qemu_argv(
    binary: str, spec: LaunchSpec, paths: VmPaths, accel: str, *, tsc_khz: int | None = None
) -> list[str]:
    """The QEMU command line of one VM (``-S``: configured, CPUs stopped until ``cont``)."""
    machine = f"microvm,accel={accel}"
    argv = [
        binary, "-name", f"guest={spec.vm_id}", "-M", machine,
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-S",
        "-chardev", f"file,id=serial0,path={paths.console_log}", "-serial", "chardev:serial0",
    ]  # fmt: skip
    if spec.kernel_path:
        argv += ["-kernel", spec.kernel_path]
        if spec.initramfs_path:
            argv += ["-initrd", spec.initramfs_path]
        cmdline = spec.cmdline or ""
        if accel == "tcg" and tsc_khz and "tsc_early_khz=" not in cmdline:
            # Under TCG the guest TSC ticks at the host's rate, but Linux's PIT-based TSC calibration is
            # timing-sensitive under emulation and fails now and then (the boot then stalls for ever on a
            # machine without HPET/PM timer, like microvm); telling the kernel the rate skips calibration.
            cmdline = f"{cmdline} tsc_early_khz={tsc_khz}".strip()
        if cmdline:
            argv += ["-append", cmdline]
    elif spec.firmware_path:
        argv += ["-bios", spec.firmware_path]
    for i, (path, readonly) in enumerate(spec.disks):
        ro = ",readonly=on" if readonly else ""
        argv += ["-drive", f"id=disk{i},file={path},format=raw,if=none{ro}",
                 "-device", f"virtio-blk-device,drive=disk{i}"]  # fmt: skip
    for i, nic in enumerate(spec.nics):
        argv += ["-netdev", f"tap,id=net{i},ifname={nic.tap},script=no,downscript=no",
                 "-device", f"virtio-net-device,netdev=net{i},mac={nic.mac}"]  # fmt: skip
    argv += ["-chardev", f"socket,id=qmp,path={paths.api_socket},server=on,wait=off",
             "-mon", "chardev=qmp,mode=control"]  # fmt: skip
    for arg in argv[1:]:
        if "\0" in arg:
            raise NkudoError("QEMU arguments must not contain NUL bytes", code=ErrorCode.INVALID_ARGUMENT)
    return argv


class QemuProvider(VmmProcessProvider):
    name = "qemu"

    def __init__(
        self,
        binary: str = "qemu-system-x86_64",
        *,
        accel: str = "auto",
        kvm_device: str = "/dev/kvm",
        ready_timeout: float = 10.0,
        on_exit: ExitCallback | None = None,
    ) -> None:
        super().__init__(binary, ready_timeout=ready_timeout, on_exit=on_exit, component="provider.qemu")
        if accel not in ACCELS:
            raise NkudoError(
                f"--qemu-accel must be one of {', '.join(ACCELS)} (got {accel!r})", code=ErrorCode.INVALID_ARGUMENT
            )
        self.requested_accel = accel
        self.kvm_device = kvm_device
        self._accel: tuple[str, str] | None = None
        #: Seconds spent in each agent-side step of the last launch (spawn, QMP negotiation), for benchmarks.
        self.last_launch: dict[str, float] = {}

    @property
    def accel(self) -> tuple[str, str]:
        """(accel, reason), decided once per provider on first use."""
        if self._accel is None:
            self._accel = choose_accel(self.requested_accel, self.kvm_device)
            accel, why = self._accel
            if accel == "tcg" and self.requested_accel == "auto":
                self.log.warn("QEMU falls back to TCG (software emulation, much slower than KVM)", reason=why)
            else:
                self.log.info("QEMU accelerator chosen", accel=accel, reason=why)
        return self._accel

    def _qmp(self, paths: VmPaths, timeout: float) -> QmpClient:
        return QmpClient(paths.api_socket, timeout=max(timeout, 0.05))

    def argv(self, spec: LaunchSpec, paths: VmPaths) -> list[str]:
        accel, why = self.accel
        with open(
            paths.vmm_log, "a", encoding="utf-8"
        ) as f:  # what was chosen and why, next to QEMU's own output
            f.write(f"nkudo: accel={accel} ({why})\n")
        return qemu_argv(self.binary, spec, paths, accel, tsc_khz=host_tsc_khz() if accel == "tcg" else None)

    def owns_cmdline(self, args: list[bytes], api_socket: str) -> bool:
        """QEMU's own argv form of the marker: the QMP chardev on ``api_socket``."""
        want = f",path={api_socket},".encode()
        return any(a.startswith(b"socket,id=qmp,") and want in a for a in args)

    def launch(
        self,
        spec: LaunchSpec,
        paths: VmPaths,
        *,
        timeout: float,
        on_spawned: Callable[[ProcessRecord], None] | None = None,
    ) -> ProcessRecord:
        t0 = time.perf_counter()
        times: dict[str, float] = {}

        def spawned(record: ProcessRecord) -> None:
            times["spawned"] = time.perf_counter()
            if on_spawned is not None:
                on_spawned(record)  # durable before QEMU is driven: no unrecorded VMM after a crash
            times["recorded"] = time.perf_counter()

        record = super().launch(spec, paths, timeout=timeout, on_spawned=spawned)
        t_ready = time.perf_counter()
        self.last_launch = {
            "spawn_s": times["spawned"] - t0,
            "record_s": times["recorded"] - times["spawned"],
            "qmp_ready_s": t_ready - times["recorded"],
        }
        return record

    def configure(
        self, handle: proc.ProcessHandle, spec: LaunchSpec, paths: VmPaths, deadline: float
    ) -> None:
        """QEMU got its whole configuration on the command line (-S: not started); wait for QMP."""

        def probe(t: float) -> str:
            with self._qmp(paths, t) as c:
                return c.status()

        status = self.wait_until(handle, paths, deadline, probe, QmpTransportError)
        if status != "prelaunch":
            raise NkudoError(
                f"QEMU started in state {status!r}, expected 'prelaunch'", code=ErrorCode.VMM_START_FAILED
            )

    def restore_argv(self, spec: LaunchSpec, paths: VmPaths) -> list[str]:
        """The VM's own command line, waiting for a migration stream (``-incoming defer``)."""
        return [*self.argv(spec, paths), "-incoming", "defer"]

    def configure_restore(
        self, handle: proc.ProcessHandle, spec: LaunchSpec, paths: VmPaths, snapshot_dir: str, deadline: float
    ) -> None:
        """``migrate-incoming`` from the snapshot's state file, handed over as a read-only descriptor.

        Why ``defer`` + ``fd:``: the descriptor is opened by the agent (read-only, so the snapshot
        cannot be written through it) and passed with ``getfd`` as the snapshot was; ``-S`` on the
        command line leaves the loaded guest ``paused`` until the handler resumes it.
        """

        def probe(t: float) -> str:
            with self._qmp(paths, t) as c:
                return c.status()

        ready = min(deadline, time.monotonic() + self.ready_timeout)
        status = self.wait_until(handle, paths, ready, probe, QmpTransportError)
        if status != "inmigrate":
            raise NkudoError(f"QEMU started in state {status!r}, expected 'inmigrate'", code=ErrorCode.VMM_START_FAILED)
        state_file = os.path.join(snapshot_dir, SNAPSHOT_FILE)
        try:
            fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NkudoError(
                f"cannot open the snapshot's state file {state_file}: {exc.strerror}", code=ErrorCode.SNAPSHOT_INVALID
            ) from None
        try:
            with self._qmp(paths, 10.0) as c:
                try:
                    c.execute("getfd", {"fdname": "nkudo-restore"}, fds=[fd])
                finally:
                    os.close(fd)
                c.execute("migrate-incoming", {"uri": "fd:nkudo-restore"})
                while (status := c.status()) == "inmigrate":
                    info = c.execute("query-migrate")
                    if info.get("status") in ("failed", "cancelled"):
                        raise NkudoError(
                            f"restore {info.get('status')}: {info.get('error-desc', 'no reason given')}",
                            code=ErrorCode.RESTORE_FAILED,
                        )
                    if time.monotonic() >= deadline:
                        raise NkudoError("restore did not complete in time", code=ErrorCode.RESTORE_FAILED)
                    time.sleep(0.02)
        except (QmpConnectionClosedError, QmpTransportError):
            # QEMU exits when an incoming stream cannot be loaded; its reason is in vmm.log.
            if handle.wait(2.0) is None:
                raise
            raise NkudoError(
                f"QEMU exited while loading the snapshot ({handle.status}); see {paths.vmm_log}",
                code=ErrorCode.RESTORE_FAILED,
            ) from None
        if status != "paused":
            raise NkudoError(f"QEMU is {status!r} after the restore, expected 'paused'", code=ErrorCode.RESTORE_FAILED)

    def state(self, paths: VmPaths, *, timeout: float) -> VmStatus | None:
        try:
            with self._qmp(paths, timeout) as c:
                status = c.status(timeout=timeout)
        except (QmpTransportError, QmpConnectionClosedError) as exc:
            if exc.is_timeout:
                raise  # a busy QEMU is not a dead one (see the port): its caller must not replace it
            return None
        return _STATES.get(status, VmStatus.ERROR)

    def _run(self, paths: VmPaths, command: str, timeout: float) -> None:
        with self._qmp(paths, timeout) as c:
            c.execute(command, timeout=timeout)

    def boot(self, paths: VmPaths, *, timeout: float) -> None:
        self._run(paths, "cont", timeout)

    def pause(self, paths: VmPaths, *, timeout: float) -> None:
        self._run(paths, "stop", timeout)

    def resume(self, paths: VmPaths, *, timeout: float) -> None:
        self._run(paths, "cont", timeout)

    def snapshot_complete(self, dest_dir: str) -> bool:
        """Never: the agent itself drives QEMU's migration to completion (query-migrate), so a snapshot whose
        agent died is unfinished by definition and is taken again."""
        return False

    def snapshot(self, paths: VmPaths, dest_dir: str, *, timeout: float) -> None:
        """Write a consistent device + RAM state file (QEMU's migration stream) into ``dest_dir``.

        Why ``fd:``: the ``file:`` migration URI exists from QEMU 8.2 on (Debian 12 ships 7.2); the
        agent opens the file itself and hands QEMU the descriptor with ``getfd`` (SCM_RIGHTS), which
        works on every version and keeps the file inside the directory the handlers chose.
        """
        deadline = time.monotonic() + timeout
        dest = os.path.join(dest_dir, SNAPSHOT_FILE)
        with self._qmp(paths, min(timeout, 10.0)) as c:
            was_running = c.status() == "running"
            if was_running:
                c.execute("stop")
            try:
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    c.execute("getfd", {"fdname": "nkudo-snapshot"}, fds=[fd])
                finally:
                    os.close(fd)
                c.execute("migrate", {"uri": "fd:nkudo-snapshot"})
                info: dict[str, Any] = {}
                while True:
                    info = c.execute("query-migrate")
                    st = info.get("status")
                    if st == "completed":
                        break
                    if st in ("failed", "cancelled"):
                        raise NkudoError(
                            f"snapshot migration {st}: {info.get('error-desc', 'no reason given')}",
                            code=ErrorCode.SNAPSHOT_FAILED,
                        )
                    if time.monotonic() >= deadline:
                        c.execute("migrate_cancel")
                        raise NkudoError(
                            f"snapshot did not complete within {timeout:g}s", code=ErrorCode.SNAPSHOT_FAILED
                        )
                    time.sleep(0.02)
                _fsync_path(dest)
                meta = {
                    "format": "qemu-migration-stream",
                    "file": SNAPSHOT_FILE,
                    "qemu_version": ".".join(map(str, c.version)),
                    "size_bytes": os.path.getsize(dest),
                    "total_time_ms": info.get("total-time"),
                    "restore": "QEMU with the VM's arguments plus -incoming defer, then getfd + "
                    "migrate-incoming fd: of " + SNAPSHOT_FILE + " (MicroVMRestore)",
                }
                tmp = os.path.join(dest_dir, SNAPSHOT_META + ".tmp")
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(meta, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, os.path.join(dest_dir, SNAPSHOT_META))
            finally:
                if was_running:
                    c.execute("cont")

    def stop_recorded(
        self, paths: VmPaths, process: ProcessRecord | None, *, graceful_timeout: float, force: bool
    ) -> str:
        h = self._stopping(process)
        if h is None:
            return "already"
        how = "api"
        if not force and graceful_timeout > 0:
            deadline = time.monotonic() + graceful_timeout
            try:
                with self._qmp(paths, 2.0) as c:
                    if c.status(timeout=2.0) == "running":
                        c.execute("system_powerdown", timeout=2.0)
                        while time.monotonic() < deadline:
                            try:
                                ev = c.wait_event(
                                    ("SHUTDOWN",), timeout=min(0.1, max(deadline - time.monotonic(), 0.01))
                                )
                            except QmpConnectionClosedError:
                                ev = None
                                if h.wait(2.0) is not None:
                                    return "guest"
                            if ev is not None:
                                self.log.info(
                                    "guest powered off",
                                    reason=ev.data.get("reason"),
                                    guest=ev.data.get("guest"),
                                )
                                if h.wait(5.0) is not None:
                                    return "guest"
                                how = "guest"
                                break
                            if h.poll() is not None:
                                return "guest"
            except QmpError as exc:
                self.log.debug("graceful power-down failed", error=str(exc))
        if h.poll() is None:
            try:
                self._run(paths, "quit", 5.0)
            except (QmpCommandError, QmpTransportError, QmpConnectionClosedError) as exc:
                self.log.debug("quit failed", error=str(exc))
        return self._finish_stop(h, how)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
