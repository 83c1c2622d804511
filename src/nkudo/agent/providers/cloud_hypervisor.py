"""Cloud Hypervisor adapter: one VMM process per VM, driven over its API socket.

The VMM is spawned detached (own session) through the pidfd spawner, so it
outlives the action that started it and the agent itself (the Go original
killed VMs when the start action's context ended). Works unchanged with the
real ``cloud-hypervisor`` binary and with ``nkudo-ch-sim``.
"""

from __future__ import annotations

import time
from typing import Any

from nkudo.agent.provider import LaunchSpec, ProcessRecord, VmPaths
from nkudo.agent.providers.base import ExitCallback, VmmProcessProvider
from nkudo.chapi import ChApiError, ChClient, ChTransportError, NotFoundError, wait_ready
from nkudo.proc import process as proc
from nkudo.vmstate import VmStatus

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

    def state(self, paths: VmPaths, *, timeout: float) -> VmStatus | None:
        try:
            info = self._client(paths).info(timeout=timeout)
        except ChTransportError:
            return None
        except NotFoundError:  # no VM (config) in this VMM yet (``VmNotCreatedError`` is one too)
            return None
        return _STATES.get(info.state, VmStatus.ERROR)

    def boot(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).boot(timeout=timeout)

    def pause(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).pause(timeout=timeout)

    def resume(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).resume(timeout=timeout)

    def snapshot(self, paths: VmPaths, dest_dir: str, *, timeout: float) -> None:
        self._client(paths).snapshot(dest_dir, timeout=timeout)

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
