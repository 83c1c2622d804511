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
from nkudo.agent import console
from nkudo.agent.provider import LaunchSpec, ProcessRecord, VmPaths, process_record
from nkudo.errors import NkudoError, ValidationError
from nkudo.proc import process as proc
from nkudo.proc.errors import AdoptionRefused, ProcessError
from nkudo.proc.identity import ProcessIdentity, check_identity, identity_after_exec
from nkudo.proc.supervisor import Supervisor
from nkudo.wire.vocab import ErrorCode

VMM_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
ExitCallback = Callable[[ProcessRecord, str, bool], None]


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

    def restore_argv(self, spec: LaunchSpec, paths: VmPaths) -> list[str]:
        """The command line of a VMM that will receive a snapshot (default: the one of :meth:`argv`)."""
        return self.argv(spec, paths)

    def configure_restore(
        self, handle: proc.ProcessHandle, spec: LaunchSpec, paths: VmPaths, snapshot_dir: str, deadline: float
    ) -> None:
        """Wait until the new VMM answers and load the snapshot into it (left Paused) by ``deadline``."""
        raise NotImplementedError

    def stop_recorded(
        self, paths: VmPaths, process: ProcessRecord | None, *, graceful_timeout: float, force: bool
    ) -> str:
        """Power off and end the recorded VMM (if it is still that process); say how, or "already"."""
        raise NotImplementedError

    def stop(
        self, paths: VmPaths, process: ProcessRecord | None, *, graceful_timeout: float, force: bool
    ) -> str:
        """Stop the recorded VMM, then end any other process carrying the VM's marker.

        Why both: the record can be stale or name a launcher, and a VMM that survives a stop
        reported as done keeps its guest running, unreachable. Returns "already" only when no
        such process was found at all; raises ``VMM_STILL_RUNNING`` rather than report a stop
        that did not happen.
        """
        how = self.stop_recorded(paths, process, graceful_timeout=graceful_timeout, force=force)
        return self._end_strays(paths, how)

    # -- launch -----------------------------------------------------------------------------

    def launch(
        self,
        spec: LaunchSpec,
        paths: VmPaths,
        *,
        timeout: float,
        on_spawned: Callable[[ProcessRecord], None] | None = None,
    ) -> ProcessRecord:
        return self._start(
            self.argv, spec, paths, on_spawned,
            lambda h: self.configure(h, spec, paths, time.monotonic() + min(timeout, self.ready_timeout)),
        )  # fmt: skip

    def restore(
        self,
        spec: LaunchSpec,
        paths: VmPaths,
        snapshot_dir: str,
        *,
        timeout: float,
        on_spawned: Callable[[ProcessRecord], None] | None = None,
    ) -> ProcessRecord:
        """Spawn a VMM exactly as :meth:`launch` does (recorded, supervised) and restore into it.

        Why the whole ``timeout`` for the restore and not ``ready_timeout``: loading the guest's
        memory takes time proportional to its size; readiness is bounded inside the hook.
        """
        deadline = time.monotonic() + timeout
        return self._start(
            self.restore_argv, spec, paths, on_spawned,
            lambda h: self.configure_restore(h, spec, paths, snapshot_dir, deadline),
        )  # fmt: skip

    def _start(
        self,
        argv_of: Callable[[LaunchSpec, VmPaths], list[str]],
        spec: LaunchSpec,
        paths: VmPaths,
        on_spawned: Callable[[ProcessRecord], None] | None,
        configure: Callable[[proc.ProcessHandle], None],
    ) -> ProcessRecord:
        # An agent killed between spawning a VMM and recording it leaves an unrecorded VMM on this
        # VM's socket: find it by its command line and end it, so there is never a second one
        # (and its socket is only removed once no process serves it).
        self.end_marker_processes(paths)
        if os.path.exists(paths.api_socket):
            os.unlink(paths.api_socket)  # left by a VMM that died
        argv = argv_of(spec, paths)
        console.prepare_for_launch(paths.console_log)  # the VMM truncates it: keep the last run's console
        handle = proc.spawn(argv, env=VMM_ENV, log_path=paths.vmm_log, marker=paths.api_socket)
        self._handles[handle.pid] = handle
        try:
            if on_spawned is not None:
                # Durable before the VMM gets its config: no unrecorded VMM after a crash. This record
                # may still name a launcher; the marker keeps such a VMM findable (see reconcile).
                on_spawned(process_record(handle.identity))
            configure(handle)
            self._identify_final(handle, paths)
        except BaseException:
            self._terminate(handle)
            raise
        self._supervise(handle)
        return process_record(handle.identity)

    def _identify_final(self, handle: proc.ProcessHandle, paths: VmPaths) -> None:
        """Re-read the identity once the VMM answers: a launcher has exec'd the real binary by now."""
        try:
            final = identity_after_exec(handle.identity)
        except AdoptionRefused as exc:
            raise NkudoError(
                f"the VMM serving {paths.api_socket} cannot be identified after start-up ({exc}); "
                f"a launcher given as the hypervisor binary must exec it with all its arguments",
                code=ErrorCode.VMM_START_FAILED,
            ) from None
        if handle.poll() is not None:  # pidfd: the pid read above was still this child's
            raise NkudoError(
                f"VMM exited during start-up ({handle.status}); see {paths.vmm_log}", code=ErrorCode.VMM_START_FAILED
            )
        if final.exe != handle.identity.exe:
            self.log.info("VMM identity recorded after exec", pid=final.pid, spawned=handle.identity.exe,
                          exe=final.exe)  # fmt: skip
        handle.identity = final

    def wait_until(self, handle: proc.ProcessHandle, paths: VmPaths, deadline: float, probe: Callable[[float], Any],
                   retry_on: type[BaseException] | tuple[type[BaseException], ...]) -> Any:  # fmt: skip
        """Call ``probe(timeout)`` until it answers; fail fast if the VMM exits, clearly at the deadline."""
        while True:
            if handle.poll() is not None:
                raise NkudoError(
                    f"VMM exited during start-up ({handle.status}); see {paths.vmm_log}",
                    code=ErrorCode.VMM_START_FAILED,
                )
            try:
                return probe(min(0.5, max(deadline - time.monotonic(), 0.01)))
            except retry_on:
                if time.monotonic() >= deadline:
                    raise NkudoError(
                        f"VMM control socket {paths.api_socket} not ready in time", code=ErrorCode.VMM_START_FAILED
                    ) from None
                time.sleep(0.005)

    # -- processes ----------------------------------------------------------------------------

    def _supervise(self, h: proc.ProcessHandle) -> None:
        if self._supervisor is None or self._on_exit is None:
            return
        record = process_record(h.identity)
        cb = self._on_exit

        def exited(handle: proc.ProcessHandle, status: proc.ExitStatus) -> None:
            self._handles.pop(handle.pid, None)
            cb(record, str(status), status.kind == "exited" and status.code == 0)

        self._supervisor.watch(h, exited)

    def watch(self, process: ProcessRecord) -> bool:
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

    def _handle(self, process: ProcessRecord) -> proc.ProcessHandle | None:
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

    def is_alive(self, process: ProcessRecord | None) -> bool:
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

    def _stopping(self, process: ProcessRecord | None) -> proc.ProcessHandle | None:
        """The handle of a VMM about to be stopped on purpose (unwatched: its exit is not a crash)."""
        try:
            h = self._handle(process) if process else None
        except ValidationError as exc:  # a corrupt record: the marker sweep still finds the VMM
            self.log.warn("unusable VMM record", error=str(exc))
            h = None
        if h is not None and self._supervisor is not None:
            self._supervisor.unwatch(h)
        return h

    def live_vmms(self, paths: VmPaths) -> list[int]:
        """Pids of live processes carrying this VM's marker (its API socket on their command line)."""
        return find_processes(lambda args: self.owns_cmdline(args, paths.api_socket))

    def end_marker_processes(self, paths: VmPaths, *, timeout: float = 15.0) -> list[int]:
        """End every process carrying this VM's marker; return their pids.

        Why: whatever the record says (gone, launcher exe, corrupt, never written), a process serving
        this VM's socket is this VM's VMM, and a stop or delete that leaves it running orphans the
        guest. Each one is signalled through a pidfd opened and then re-checked against the marker,
        so a pid reused meanwhile is never hit. Raises ``VMM_STILL_RUNNING`` if any outlives ``timeout``.
        """
        ended: list[int] = []
        deadline = time.monotonic() + timeout
        while pids := self.live_vmms(paths):
            for pid in pids:
                try:
                    h = proc.adopt(proc.identify(pid, marker=paths.api_socket))
                except (AdoptionRefused, ProcessError):
                    continue  # exited, or exec'd between the two reads: looked at again below
                self.log.warn("ending a VMM process found by its marker", pid=pid, socket=paths.api_socket)
                self._terminate(h)
                ended.append(pid)
            if time.monotonic() >= deadline:
                left = self.live_vmms(paths)
                if left:
                    raise NkudoError(
                        f"VMM process(es) {', '.join(map(str, left))} serving {paths.api_socket} "
                        f"could not be ended within {timeout:.0f}s",
                        code=ErrorCode.VMM_STILL_RUNNING,
                    )
            time.sleep(0.01)
        return ended

    def _end_strays(self, paths: VmPaths, how: str) -> str:
        """Last step of every stop: no process carrying the marker may outlive a reported stop."""
        return "signal" if self.end_marker_processes(paths) else how

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
