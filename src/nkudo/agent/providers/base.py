"""What every VMM-per-VM provider shares: spawning, recording, adoption, supervision, termination.

A hypervisor adapter subclasses :class:`VmmProcessProvider` and supplies the three things
that differ: the command line (:meth:`argv`), how to recognise its own orphans on the host
(:meth:`owns_cmdline`) and how to make a freshly spawned VMM ready (:meth:`configure`).
The rest (the launch sequence that records the process before configuring it, identity-checked
adoption after agent restarts, pidfd supervision, SIGTERM/SIGKILL escalation) is written once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from nkudo import log
from nkudo.agent.provider import LaunchSpec, VmPaths
from nkudo.errors import NkudoError
from nkudo.proc import process as proc
from nkudo.proc.errors import AdoptionRefused, ProcessError
from nkudo.proc.identity import ProcessIdentity, check_identity
from nkudo.proc.supervisor import Supervisor

VMM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
ExitCallback = Callable[[dict[str, Any], str, bool], None]


def find_processes(matches: Callable[[list[bytes]], bool]) -> list[int]:
    """Pids (other than ours) whose NUL-split command line satisfies ``matches``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if matches(args):
            out.append(int(entry))
    return out


class VmmProcessProvider:
    name = "vmm"

    def __init__(
        self,
        binary: str,
        *,
        ready_timeout: float = 10.0,
        on_exit: ExitCallback | None = None,
        component: str = "provider",
    ) -> None:
        self.binary = binary
        self.ready_timeout = ready_timeout
        self.log = log.get_logger(component)
        self._handles: dict[int, proc.ProcessHandle] = {}
        # Exits the agent did not ask for are reported through on_exit(record, description, clean),
        # noticed by one pidfd-driven supervisor thread (no polling of /proc).
        self._on_exit = on_exit
        self._supervisor: Supervisor | None = Supervisor(name="nkudo-vmm-supervisor") if on_exit else None

    # -- hooks ------------------------------------------------------------------------------

    def argv(self, spec: LaunchSpec, paths: VmPaths) -> list[str]:
        raise NotImplementedError

    def owns_cmdline(self, args: list[bytes], api_socket: str) -> bool:
        """Whether a process with this command line is a VMM of ours serving ``api_socket``."""
        raise NotImplementedError

    def configure(
        self, handle: proc.ProcessHandle, spec: LaunchSpec, paths: VmPaths, deadline: float
    ) -> None:
        """Wait until the new VMM answers and give it the VM's configuration (not booted)."""
        raise NotImplementedError

    # -- launch -----------------------------------------------------------------------------

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
        for pid in find_processes(lambda args: self.owns_cmdline(args, paths.api_socket)):
            self.log.warn("ending an unrecorded VMM left by an interrupted start", pid=pid, vm_id=spec.vm_id)
            try:
                self._terminate(proc.adopt(proc.identify(pid, marker=paths.api_socket)))
            except (AdoptionRefused, ProcessError):
                pass
        if os.path.exists(paths.api_socket):
            os.unlink(paths.api_socket)  # left by a VMM that died
        argv = self.argv(spec, paths)
        handle = proc.spawn(argv, env=VMM_ENV, log_path=paths.vmm_log, marker=paths.api_socket)
        self._handles[handle.pid] = handle
        record = handle.identity.to_dict()
        try:
            if on_spawned is not None:
                on_spawned(record)  # durable before the VMM gets its config: no unrecorded VMM after a crash
            self.configure(handle, spec, paths, time.monotonic() + min(timeout, self.ready_timeout))
        except BaseException:
            self._terminate(handle)
            raise
        self._supervise(handle)
        return record

    def wait_until(self, handle: proc.ProcessHandle, paths: VmPaths, deadline: float, probe: Callable[[float], Any],
                   retry_on: type[BaseException] | tuple[type[BaseException], ...]) -> Any:  # fmt: skip
        """Call ``probe(timeout)`` until it answers; fail fast if the VMM exits, clearly at the deadline."""
        while True:
            if handle.poll() is not None:
                raise NkudoError(
                    f"VMM exited during start-up ({handle.status}); see {paths.vmm_log}",
                    code="VMM_START_FAILED",
                )
            try:
                return probe(min(0.5, max(deadline - time.monotonic(), 0.01)))
            except retry_on:
                if time.monotonic() >= deadline:
                    raise NkudoError(
                        f"VMM control socket {paths.api_socket} not ready in time", code="VMM_START_FAILED"
                    ) from None
                time.sleep(0.005)

    # -- processes ----------------------------------------------------------------------------

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

    def _stopping(self, process: dict[str, Any] | None) -> proc.ProcessHandle | None:
        """The handle of a VMM about to be stopped on purpose (unwatched: its exit is not a crash)."""
        h = self._handle(process) if process else None
        if h is not None and self._supervisor is not None:
            self._supervisor.unwatch(h)
        return h

    def _finish_stop(self, h: proc.ProcessHandle, how: str) -> str:
        """After the hypervisor was asked to quit: give it 5 s, then signals; say how it ended."""
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
