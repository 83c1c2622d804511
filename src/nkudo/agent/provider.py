"""The hypervisor port: what the VM handlers need from a VMM, and nothing more.

A second hypervisor (QEMU, Firecracker) is one new adapter implementing
:class:`Provider`; handlers, executor, state and networking stay as they are.
The adapter owns its process (spawn, adopt, stop) and its control channel;
the handlers own desired state, files, TAPs and the state store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NotRequired, Protocol, TypedDict

from nkudo.vmstate import VmStatus

if TYPE_CHECKING:
    from nkudo.proc.identity import ProcessIdentity


class ProcessRecord(TypedDict):
    """The stored identity of a VMM process, as the provider hands it to the VM service.

    Why a ``TypedDict`` and not ``ProcessIdentity`` itself: the record is persisted as JSON in
    the state store and read back unvalidated, so a corrupt one still reaches the provider, which
    refuses it (``ProcessIdentity.from_dict``) and falls back to the VM's marker, and the
    reconciler can say why in ``last_error``. The keys are ``ProcessIdentity.to_dict``'s.
    """

    pid: int
    start_time: int
    exe: str
    boot_id: str
    marker: NotRequired[str]


def process_record(ident: ProcessIdentity) -> ProcessRecord:
    """The record of a live process's identity (what ``launch`` returns and ``on_spawned`` gets)."""
    rec = ProcessRecord(pid=ident.pid, start_time=ident.start_time, exe=ident.exe, boot_id=ident.boot_id)
    if ident.marker is not None:
        rec["marker"] = ident.marker
    return rec


@dataclass
class VmPaths:
    """Files of one VM, all inside its runtime directory."""

    runtime_dir: str
    api_socket: str
    vmm_log: str
    console_log: str
    rootfs: str | None
    seed_iso: str | None


@dataclass
class NicPlan:
    tap: str
    mac: str
    bridge: str


@dataclass
class LaunchSpec:
    """Everything a provider needs to start a VM, resolved and validated by the handlers."""

    vm_id: str
    vcpus: int
    memory_mib: int
    kernel_path: str | None
    firmware_path: str | None
    initramfs_path: str | None
    cmdline: str | None
    disks: list[tuple[str, bool]] = field(default_factory=list)  # (path, readonly)
    nics: list[NicPlan] = field(default_factory=list)


class Provider(Protocol):
    name: str

    def launch(
        self,
        spec: LaunchSpec,
        paths: VmPaths,
        *,
        timeout: float,
        on_spawned: Callable[[ProcessRecord], None] | None = None,
    ) -> ProcessRecord:
        """Start the VMM and hand it the VM config (not booted). Return the process identity record.

        ``on_spawned(record)`` is called as soon as the process exists, before it is configured,
        so the caller can persist it: a crash after that point never leaves an unknown VMM. That
        record may still name a launcher (``/bin/sh`` wrapper, ``env``, ``nice``); the returned one
        is read again after the VMM answered, i.e. after the launcher's final exec.
        """

    def is_alive(self, process: ProcessRecord | None) -> bool:
        """Whether the recorded VMM process still exists (identity-checked)."""

    def state(self, paths: VmPaths, *, timeout: float) -> VmStatus | None:
        """The VM state the VMM reports, or None when the VMM does not serve its API (no socket, refused,
        closed, or no VM in it yet).

        A VMM that accepts but does not answer within ``timeout`` raises its timeout error (``is_timeout``)
        instead: a busy or stopped VMM is not a dead one, and a caller that replaces a VMM that does not
        serve (start, restore) must never replace one that is merely slow, with the guest in it.
        """

    def boot(self, paths: VmPaths, *, timeout: float) -> None: ...

    def pause(self, paths: VmPaths, *, timeout: float) -> None: ...

    def resume(self, paths: VmPaths, *, timeout: float) -> None: ...

    def snapshot(self, paths: VmPaths, dest_dir: str, *, timeout: float) -> None: ...

    def snapshot_complete(self, dest_dir: str) -> bool:
        """Whether ``dest_dir`` holds a whole snapshot written by a call the agent did not see end (it was
        killed while the VMM wrote): a re-drive then keeps it instead of taking it again."""

    def restore(
        self,
        spec: LaunchSpec,
        paths: VmPaths,
        snapshot_dir: str,
        *,
        timeout: float,
        on_spawned: Callable[[ProcessRecord], None] | None = None,
    ) -> ProcessRecord:
        """Start a fresh VMM and restore the snapshot in ``snapshot_dir`` into it, left Paused.

        ``spec`` is the restored VM's (its TAPs, MACs, disks and console, which for a clone differ
        from the snapshot's); ``on_spawned`` as for :meth:`launch`. The snapshot's files are only read.
        """

    def stop(
        self, paths: VmPaths, process: ProcessRecord | None, *, graceful_timeout: float, force: bool
    ) -> str:
        """Power the VM off and end the VMM; return how ("guest", "api", "signal", "already").

        Never returns while a process carrying the VM's marker (its API socket path) is alive,
        whether or not ``process`` still identifies it: such a process is signalled through a
        pidfd after its marker is re-checked, or ``VMM_STILL_RUNNING`` is raised.
        """

    def live_vmms(self, paths: VmPaths) -> list[int]:
        """Pids of live processes carrying the VM's marker, recorded or not (never forget a VMM)."""

    def watch(self, process: ProcessRecord) -> bool:
        """Supervise a running VMM found at start-up; unrequested exits go to the agent's callback."""

    def close(self) -> None: ...
