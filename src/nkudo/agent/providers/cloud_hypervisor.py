"""Cloud Hypervisor adapter: one VMM process per VM, driven over its API socket.

The VMM is spawned detached (own session) through the pidfd spawner, so it
outlives the action that started it and the agent itself (the Go original
killed VMs when the start action's context ended). Works unchanged with the
real ``cloud-hypervisor`` binary and with ``nkudo-ch-sim``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from nkudo import log
from nkudo.agent.provider import LaunchSpec, VmPaths
from nkudo.chapi import ChApiError, ChClient, ChTransportError, wait_ready
from nkudo.errors import NkudoError
from nkudo.proc import process as proc
from nkudo.proc.errors import AdoptionRefused, ProcessError
from nkudo.proc.identity import ProcessIdentity, check_identity
from nkudo.proc.supervisor import Supervisor
from nkudo.vmstate import VmStatus

_STATES = {
    "Created": VmStatus.CREATED,
    "Running": VmStatus.RUNNING,
    "Paused": VmStatus.PAUSED,
    "Shutdown": VmStatus.CREATED,  # after vm.shutdown the config stays; boot works again
}
VMM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


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


def find_by_marker(api_socket: str) -> list[int]:
    """Pids whose command line names ``api_socket`` as their API socket."""
    want = {api_socket.encode(), b"path=" + api_socket.encode()}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a in want for a in args) and int(entry) != os.getpid():
            out.append(int(entry))
    return out


class CloudHypervisorProvider:
    name = "cloud-hypervisor"

    def __init__(
        self,
        binary: str = "cloud-hypervisor",
        *,
        ready_timeout: float = 10.0,
        extra_args: tuple[str, ...] = (),
        on_exit: Callable[[dict[str, Any], str, bool], None] | None = None,
    ) -> None:
        self.binary = binary
        self.ready_timeout = ready_timeout
        self.extra_args = extra_args
        self.log = log.get_logger("provider.ch")
        self._handles: dict[int, proc.ProcessHandle] = {}
        # Exits the agent did not ask for are reported through on_exit(record, description, clean),
        # noticed by one pidfd-driven supervisor thread (no polling of /proc).
        self._on_exit = on_exit
        self._supervisor: Supervisor | None = Supervisor(name="nkudo-vmm-supervisor") if on_exit else None

    def _supervise(self, h: proc.ProcessHandle) -> None:
        if self._supervisor is None or self._on_exit is None:
            return
        record = h.identity.to_dict()
        cb = self._on_exit

        def exited(handle: proc.ProcessHandle, status: proc.ExitStatus) -> None:
            self._handles.pop(handle.pid, None)
            cb(record, str(status), status.kind == "exited" and status.code == 0)

        self._supervisor.watch(h, exited)

    def watch(self, process: dict[str, Any]) -> bool:
        """Supervise an already running VMM (after adoption); False if it is not alive."""
        h = self._handle(process)
        if h is None:
            return False
        self._supervise(h)
        return True

    def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.close()
            self._supervisor = None

    def _client(self, paths: VmPaths) -> ChClient:
        return ChClient(paths.api_socket)

    def launch(
        self,
        spec: LaunchSpec,
        paths: VmPaths,
        *,
        timeout: float,
        on_spawned: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        # An agent killed between spawning a VMM and recording it leaves an unrecorded VMM on this
        # VM's socket: find it by its command line and end it, so there is never a second one.
        for pid in find_by_marker(paths.api_socket):
            self.log.warn("ending an unrecorded VMM left by an interrupted start", pid=pid, vm_id=spec.vm_id)
            try:
                self._terminate(proc.adopt(proc.identify(pid, marker=paths.api_socket)))
            except (AdoptionRefused, ProcessError):
                pass
        if os.path.exists(paths.api_socket):
            os.unlink(paths.api_socket)  # left by a VMM that died
        argv = [self.binary, "--api-socket", f"path={paths.api_socket}", *self.extra_args]
        handle = proc.spawn(argv, env=VMM_ENV, log_path=paths.vmm_log, marker=paths.api_socket)
        self._handles[handle.pid] = handle
        record = handle.identity.to_dict()
        try:
            if on_spawned is not None:
                on_spawned(record)  # durable before the VMM gets its config: no unrecorded VMM after a crash
            deadline = time.monotonic() + min(timeout, self.ready_timeout)
            while True:
                if handle.poll() is not None:
                    raise NkudoError(
                        f"VMM exited during start-up ({handle.status}); see {paths.vmm_log}",
                        code="VMM_START_FAILED",
                    )
                try:
                    wait_ready(paths.api_socket, timeout=min(0.2, max(deadline - time.monotonic(), 0.01)))
                    break
                except ChApiError:
                    if time.monotonic() >= deadline:
                        raise NkudoError(
                            f"VMM API socket {paths.api_socket} not ready within {min(timeout, self.ready_timeout):g}s",
                            code="VMM_START_FAILED",
                        ) from None
            self._client(paths).create(vm_config(spec, paths), timeout=max(0.5, deadline - time.monotonic()))
        except BaseException:
            self._terminate(handle)
            raise
        self._supervise(handle)
        return record

    def _handle(self, process: dict[str, Any]) -> proc.ProcessHandle | None:
        ident = ProcessIdentity.from_dict(process)
        h = self._handles.get(ident.pid)
        if h is not None and h.identity == ident and h.poll() is None:
            return h
        try:
            h = proc.adopt(ident)
        except (AdoptionRefused, ProcessError):
            return None
        self._handles[ident.pid] = h
        return h

    def is_alive(self, process: dict[str, Any] | None) -> bool:
        if not process:
            return False
        h = self._handles.get(int(process.get("pid", 0)))
        if h is not None:
            return h.poll() is None
        try:
            check_identity(ProcessIdentity.from_dict(process))
            return True
        except (AdoptionRefused, ProcessError, ValueError, KeyError):
            return False

    def state(self, paths: VmPaths, *, timeout: float) -> VmStatus | None:
        try:
            info = self._client(paths).info(timeout=timeout)
        except ChTransportError:
            return None
        except ChApiError as exc:
            if exc.code in ("CH_NOT_FOUND", "CH_VM_NOT_CREATED"):
                return None
            raise
        return _STATES.get(info.state, VmStatus.ERROR)

    def boot(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).boot(timeout=timeout)

    def pause(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).pause(timeout=timeout)

    def resume(self, paths: VmPaths, *, timeout: float) -> None:
        self._client(paths).resume(timeout=timeout)

    def snapshot(self, paths: VmPaths, dest_dir: str, *, timeout: float) -> None:
        self._client(paths).snapshot(dest_dir, timeout=timeout)

    def stop(
        self, paths: VmPaths, process: dict[str, Any] | None, *, graceful_timeout: float, force: bool
    ) -> str:
        h = self._handle(process) if process else None
        if h is None:
            return "already"
        if self._supervisor is not None:
            self._supervisor.unwatch(h)  # this exit is requested, not a crash
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
        if h.wait(5.0) is None:
            how = "signal"
        self._terminate(h)
        return how

    def _terminate(self, h: proc.ProcessHandle) -> None:
        if self._supervisor is not None:
            self._supervisor.unwatch(h)
        try:
            h.stop(term_timeout=5.0, kill_timeout=5.0)
        finally:
            self._handles.pop(h.pid, None)
            h.close()
