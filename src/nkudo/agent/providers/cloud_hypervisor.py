"""Cloud Hypervisor adapter: one VMM process per VM, driven over its API socket.

The VMM is spawned detached (own session) through the pidfd spawner, so it
outlives the action that started it and the agent itself (the Go original
killed VMs when the start action's context ended). Works unchanged with the
real ``cloud-hypervisor`` binary and with ``nkudo-ch-sim``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from nkudo.agent.disks import write_atomic
from nkudo.agent.provider import LaunchSpec, ProcessRecord, VmPaths
from nkudo.agent.providers.base import ExitCallback, VmmProcessProvider
from nkudo.chapi import ChApiError, ChClient, ChTransportError, NotFoundError, wait_ready
from nkudo.errors import NkudoError
from nkudo.proc import process as proc
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ErrorCode

_STATES = {
    "Created": VmStatus.CREATED,
    "Running": VmStatus.RUNNING,
    "Paused": VmStatus.PAUSED,
    "Shutdown": VmStatus.CREATED,  # after vm.shutdown the config stays; boot works again
}


def vm_config(spec: LaunchSpec, paths: VmPaths) -> dict[str, Any]:
    """The VmConfig body of ``vm.create`` (validated against Cloud Hypervisor's OpenAPI schema in tests)."""
    payload: dict[str, Any] = {}
    if spec.kernel_path:
        payload["kernel"] = spec.kernel_path
        if spec.cmdline:
            payload["cmdline"] = spec.cmdline
        if spec.initramfs_path:
            payload["initramfs"] = spec.initramfs_path
    elif spec.firmware_path:
        payload["firmware"] = spec.firmware_path
    cfg: dict[str, Any] = {
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus},
        "memory": {"size": spec.memory_mib * 1024 * 1024},
        "payload": payload,
        "serial": {"mode": "File", "file": paths.console_log},
        "console": {"mode": "Off"},
    }
    if spec.disks:
        cfg["disks"] = [{"path": p, "readonly": ro, "id": f"disk{i}"} for i, (p, ro) in enumerate(spec.disks)]
    if spec.nics:
        cfg["net"] = [{"tap": n.tap, "mac": n.mac, "id": f"net{i}"} for i, n in enumerate(spec.nics)]
    return cfg


#: Where the restore source (the snapshot's files, config.json rewritten for this VM) is assembled.
RESTORE_SOURCE = "restore-source"
#: Files of the snapshot directory that are the agent's own, not Cloud Hypervisor's.
_NOT_CH = (".nkudo-vm.json", "rootfs.img", "config.json")


def restore_source(snapshot_dir: str, spec: LaunchSpec, paths: VmPaths) -> str:
    """A directory for ``vm.restore``: the snapshot's ``config.json`` rewritten for ``spec``, the rest linked.

    Why not restore from the snapshot directory itself: ``config.json`` names the TAPs, MACs, disks
    and console file of the VM the snapshot was taken of, and Cloud Hypervisor re-opens exactly those
    (a clone must get its own, and the runtime directory they lived in may be gone). The reference
    documents ``config.json`` as the place to change them; the copy is edited, never the snapshot,
    and the state and memory files are symlinked (only read by the VMM).
    """
    with open(os.path.join(snapshot_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise NkudoError(f"{snapshot_dir}/config.json is not an object", code=ErrorCode.SNAPSHOT_INVALID)
    want = vm_config(spec, paths)
    nets = cfg.get("net") or []
    if len(nets) != len(spec.nics) or len(cfg.get("disks") or []) != len(spec.disks):
        raise NkudoError(
            f"{snapshot_dir}/config.json has {len(nets)} NIC(s) and {len(cfg.get('disks') or [])} disk(s); "
            f"the VM has {len(spec.nics)} and {len(spec.disks)}",
            code=ErrorCode.SNAPSHOT_INVALID,
        )
    for net, nic in zip(nets, spec.nics, strict=True):
        net.update(tap=nic.tap, mac=nic.mac)
    for disk, (path, _ro) in zip(cfg.get("disks") or [], spec.disks, strict=True):
        disk["path"] = path
    cfg["serial"] = want["serial"]
    dest = os.path.join(paths.runtime_dir, RESTORE_SOURCE)
    shutil.rmtree(dest, ignore_errors=True)  # what an interrupted attempt assembled
    os.makedirs(dest, mode=0o700)
    for name in sorted(os.listdir(snapshot_dir)):
        if name not in _NOT_CH and not name.startswith("."):
            os.symlink(os.path.join(snapshot_dir, name), os.path.join(dest, name))
    write_atomic(os.path.join(dest, "config.json"), json.dumps(cfg, indent=2).encode())
    return dest


class CloudHypervisorProvider(VmmProcessProvider):
    name = "cloud-hypervisor"

    def __init__(
        self,
        binary: str = "cloud-hypervisor",
        *,
        ready_timeout: float = 10.0,
        extra_args: tuple[str, ...] = (),
        on_exit: ExitCallback | None = None,
    ) -> None:
        super().__init__(binary, ready_timeout=ready_timeout, on_exit=on_exit, component="provider.ch")
        self.extra_args = extra_args

    def _client(self, paths: VmPaths) -> ChClient:
        return ChClient(paths.api_socket)

    def argv(self, spec: LaunchSpec, paths: VmPaths) -> list[str]:
        return [self.binary, "--api-socket", f"path={paths.api_socket}", *self.extra_args]

    def owns_cmdline(self, args: list[bytes], api_socket: str) -> bool:
        want = {api_socket.encode(), b"path=" + api_socket.encode()}
        return any(a in want for a in args)

    def configure(
        self, handle: proc.ProcessHandle, spec: LaunchSpec, paths: VmPaths, deadline: float
    ) -> None:
        self.wait_until(
            handle, paths, deadline, lambda t: wait_ready(paths.api_socket, timeout=t), ChApiError
        )
        self._client(paths).create(vm_config(spec, paths), timeout=max(0.5, deadline - time.monotonic()))

    def configure_restore(
        self, handle: proc.ProcessHandle, spec: LaunchSpec, paths: VmPaths, snapshot_dir: str, deadline: float
    ) -> None:
        """``vm.restore`` (not resumed) from the snapshot, with this VM's TAPs, MACs, disks and console."""
        ready = min(deadline, time.monotonic() + self.ready_timeout)
        self.wait_until(handle, paths, ready, lambda t: wait_ready(paths.api_socket, timeout=t), ChApiError)
        try:
            src = restore_source(snapshot_dir, spec, paths)
        except (OSError, ValueError) as exc:
            raise NkudoError(f"cannot read the snapshot in {snapshot_dir}: {exc}", code=ErrorCode.SNAPSHOT_INVALID) from None
        self._client(paths).restore(src, resume=False, timeout=max(0.5, deadline - time.monotonic()))

    def state(self, paths: VmPaths, *, timeout: float) -> VmStatus | None:
        try:
            info = self._client(paths).info(timeout=timeout)
        except ChTransportError as exc:
            if exc.is_timeout:
                raise  # a busy VMM is not a dead one (see the port): its caller must not replace it
            return None
        except NotFoundError:  # no VM (config) in this VMM yet (``VmNotCreatedError`` is one too)
            return None
        return _STATES.get(info.state, VmStatus.ERROR)

    def boot(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).boot(timeout=timeout)

    def device_counters(self, paths: VmPaths, *, timeout: float) -> dict[str, dict[str, int]]:
        """Cloud Hypervisor's own per-device counters (``vm.counters``), keyed by device id."""
        return self._client(paths).counters(timeout=timeout)

    def pause(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).pause(timeout=timeout)

    def resume(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).resume(timeout=timeout)

    def snapshot(self, paths: VmPaths, dest_dir: str, *, timeout: float) -> None:
        self._client(paths).snapshot(dest_dir, timeout=timeout)

    def snapshot_complete(self, dest_dir: str) -> bool:
        """CH's snapshot is config.json, state.json and memory-ranges; a write cut short leaves a document that
        does not parse. The VMM serves one request at a time, so once it has answered another call, a
        snapshot call left in flight by a killed agent has ended."""
        if not os.path.exists(os.path.join(dest_dir, "memory-ranges")):
            return False
        for name in ("config.json", "state.json"):
            try:
                with open(os.path.join(dest_dir, name), "rb") as f:
                    if not isinstance(json.loads(f.read()), dict):
                        return False
            except (OSError, ValueError):
                return False
        return True

    def stop_recorded(
        self, paths: VmPaths, process: ProcessRecord | None, *, graceful_timeout: float, force: bool
    ) -> str:
        h = self._stopping(process)
        if h is None:
            return "already"
        client = self._client(paths)
        how = "api"
        if not force and graceful_timeout > 0:
            try:
                if self.state(paths, timeout=2.0) == VmStatus.RUNNING:
                    client.power_button(timeout=2.0)
                    deadline = time.monotonic() + graceful_timeout
                    while time.monotonic() < deadline:
                        if h.wait(0.05) is not None:
                            return "guest"
                        if self.state(paths, timeout=1.0) != VmStatus.RUNNING:
                            how = "guest"
                            break
            except ChApiError as exc:
                self.log.debug("power button failed", error=str(exc))
        for call in (client.shutdown, client.shutdown_vmm):
            if h.poll() is not None:
                break
            try:
                call(timeout=5.0)
            except ChApiError as exc:
                self.log.debug("shutdown call failed", error=str(exc))
        return self._finish_stop(h, how)
