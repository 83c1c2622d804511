"""Spawn, adopt, signal, wait for and stop one long-lived process (the VMM) through a pidfd.

Why pidfds: a pid is only a number that the kernel recycles, so signalling
or polling by pid can hit an unrelated process once ours has exited. A pidfd
refers to one process for its whole life: signals sent through it can never
reach a successor, and it becomes readable (``POLLIN``) when the process
exits, so exit is noticed by the event loop without polling ``/proc``.

Exit status: our own children are reaped with ``waitid(P_PIDFD)`` and report
their exit code or signal. An adopted process (spawned by an earlier agent,
now a child of init) can be watched and signalled, but its status goes to its
real parent: :class:`ExitStatus` then says ``kind="unknown"``.

Kernels without pidfd (< 5.4, or a seccomp profile that blocks it; or
``NKUDO_PIDFD=0``) get a logged fallback: signals by pid after an identity
check (a small reuse race remains) and exit detection by polling every
:data:`FALLBACK_POLL_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import fcntl
import os
import select
import shutil
import signal
import threading
import time
from collections.abc import Mapping, Sequence

from nkudo.log import get_logger
from nkudo.proc import pidfd_sys
from nkudo.proc.errors import AdoptionRefused, ProcessError, ProcessGone, SpawnError, StopTimeout
from nkudo.proc.identity import ProcessIdentity, boot_id, check_identity, read_identity
from nkudo.proc.status import FALLBACK_POLL_INTERVAL as FALLBACK_POLL_INTERVAL
from nkudo.proc.status import REAPED_ELSEWHERE, UNKNOWN_NOT_CHILD, signal_name
from nkudo.proc.status import ExitStatus as ExitStatus
from nkudo.proc.status import PidfdSupport as PidfdSupport
from nkudo.proc.status import StopResult as StopResult
from nkudo.proc.status import pidfd_support as pidfd_support

log = get_logger("proc")

DEFAULT_TERM_TIMEOUT = 10.0
DEFAULT_KILL_TIMEOUT = 5.0


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _proc_state(pid: int) -> str | None:
    """One-letter state from /proc/<pid>/stat, None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    tail = data.rpartition(b")")[2].split()
    return tail[0].decode("ascii", "replace") if tail else None


class ProcessHandle:
    """One supervised process: its identity, its pidfd (None in fallback) and its exit status.

    Thread-safe: the status is computed once (reaping happens once) and cached,
    whether the exit was noticed by :meth:`wait`, :meth:`wait_async` or a
    :class:`~nkudo.proc.supervisor.Supervisor`. Closing the handle closes the
    pidfd only; it never signals the process (a VMM outlives its handle).
    """

    def __init__(
        self,
        identity: ProcessIdentity,
        pidfd: int | None,
        *,
        is_child: bool,
        native: bool | None = None,
        log_path: str | None = None,
    ) -> None:
        self.identity = identity
        self.is_child = is_child
        self.log_path = log_path
        self._pidfd = pidfd
        self._native = native
        self._status: ExitStatus | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def pid(self) -> int:
        return self.identity.pid

    @property
    def pidfd(self) -> int | None:
        """The pidfd, or None in the no-pidfd fallback."""
        return self._pidfd

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once noticed, else None (see :meth:`poll`)."""
        return self._status

    def fileno(self) -> int:
        """The pidfd, for selectors; it turns readable when the process exits."""
        if self._pidfd is None:
            raise ProcessError(f"pid {self.pid} has no pidfd (fallback mode)")
        if self._closed:
            raise ProcessError(f"handle of pid {self.pid} is closed")
        return self._pidfd

    def __repr__(self) -> str:
        state = str(self._status) if self._status else "running"
        return f"<ProcessHandle pid={self.pid} child={self.is_child} pidfd={self._pidfd} {state}>"

    # -- status -------------------------------------------------------------

    def poll(self) -> ExitStatus | None:
        """The exit status if the process has exited (reaping our own child), else None. Never blocks."""
        if self._status is not None:
            return self._status
        if self._pidfd is None:
            return self._poll_fallback()
        if self._closed:
            raise ProcessError(f"handle of pid {self.pid} is closed")
        return self._check(self._pidfd)

    def _check(self, fd: int) -> ExitStatus | None:
        """Status via pidfd ``fd`` (ours or a supervisor's dup of it): readable means exited."""
        with self._lock:
            if self._status is not None:
                return self._status
            if not _readable(fd):
                return None
            try:
                res = pidfd_sys.waitid_pidfd(fd, os.WEXITED | os.WNOHANG, native=self._native)
            except ChildProcessError:
                # Our own child can only be missing if other code reaped it (waitpid(-1) somewhere).
                status = ExitStatus(
                    "unknown", reason=REAPED_ELSEWHERE if self.is_child else UNKNOWN_NOT_CHILD
                )
            else:
                if res is None:
                    return None  # readable a hair before reapable: the caller looks again
                status = ExitStatus.from_wait(res)
            self._status = status
        log.debug("process exited", pid=self.pid, status=str(status))
        return status

    def _poll_fallback(self) -> ExitStatus | None:
        with self._lock:
            if self._status is not None:
                return self._status
            status: ExitStatus | None = None
            if self.is_child:
                try:
                    pid, st = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    status = ExitStatus("unknown", reason=REAPED_ELSEWHERE)
                else:
                    if pid == 0:
                        return None
                    status = ExitStatus.from_waitstatus(st)
            else:
                try:
                    check_identity(self.identity, native=self._native)
                except AdoptionRefused:
                    status = ExitStatus("unknown", reason=UNKNOWN_NOT_CHILD)
                else:
                    if _proc_state(self.pid) in (None, "Z", "X"):
                        status = ExitStatus("unknown", reason=UNKNOWN_NOT_CHILD)
            if status is not None:
                self._status = status
            return status

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """Block until the process exits; None if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller: select.poll | None = None
        while True:
            status = self.poll()
            if status is not None:
                return status
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            if self._pidfd is None:
                time.sleep(
                    FALLBACK_POLL_INTERVAL if remaining is None else min(remaining, FALLBACK_POLL_INTERVAL)
                )
                continue
            if poller is None:
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
            if poller.poll(None if remaining is None else max(1, int(remaining * 1000 + 0.999))):
                if self.poll() is None:
                    time.sleep(0.001)  # readable but not yet reapable: look again shortly

    async def wait_async(self) -> ExitStatus:
        """Await the exit through the running loop (``add_reader`` on a dup of the pidfd).

        A dup per waiter keeps concurrent waiters, cancellation and
        :meth:`close` independent of each other.
        """
        status = self.poll()
        if status is not None:
            return status
        if self._pidfd is None:
            while (status := self.poll()) is None:
                await asyncio.sleep(FALLBACK_POLL_INTERVAL)
            return status
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ExitStatus] = loop.create_future()
        fd = fcntl.fcntl(self._pidfd, fcntl.F_DUPFD_CLOEXEC, 3)

        def on_readable() -> None:
            if fut.done():
                return
            try:
                st = self._check(fd)
            except BaseException as exc:  # surface in the awaiting task, not the loop's handler
                fut.set_exception(exc)
                return
            if st is not None:
                fut.set_result(st)

        loop.add_reader(fd, on_readable)
        try:
            return await fut
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    # -- signals ------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Deliver ``sig`` to this process and no other; :class:`ProcessGone` once it has exited."""
        if self._status is not None:
            raise ProcessGone(f"pid {self.pid} has exited ({self._status})")
        if self._pidfd is not None:
            if self._closed:
                raise ProcessError(f"handle of pid {self.pid} is closed")
            try:
                pidfd_sys.pidfd_send_signal(self._pidfd, sig, native=self._native)
            except ProcessLookupError:
                raise ProcessGone(f"pid {self.pid} has exited")
            return
        # Fallback: an un-reaped child keeps its pid; anything else is re-identified first.
        if not self.is_child:
            try:
                check_identity(self.identity, native=self._native)
            except AdoptionRefused as exc:
                raise ProcessGone(f"pid {self.pid} is no longer the recorded process ({exc.reason})")
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            raise ProcessGone(f"pid {self.pid} has exited")

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # -- graceful stop --------------------------------------------------------

    def _signal_quietly(self, sig: int, sent: list[int]) -> None:
        try:
            self.send_signal(sig)
            sent.append(sig)
        except ProcessGone:
            pass

    def stop(
        self,
        term_timeout: float = DEFAULT_TERM_TIMEOUT,
        kill_timeout: float = DEFAULT_KILL_TIMEOUT,
        *,
        term_signal: int = signal.SIGTERM,
    ) -> StopResult:
        """SIGTERM, wait ``term_timeout``, then SIGKILL and wait ``kill_timeout`` (:class:`StopTimeout`)."""
        t0 = time.monotonic()
        sent: list[int] = []
        status = self.poll()
        if status is None:
            self._signal_quietly(term_signal, sent)
            status = self.wait(term_timeout)
        escalated = False
        if status is None:
            log.warn(
                "process ignored the stop signal; sending SIGKILL",
                pid=self.pid,
                signal=signal_name(term_signal),
                waited_s=term_timeout,
            )
            self._signal_quietly(signal.SIGKILL, sent)
            escalated = True
            status = self.wait(kill_timeout)
            if status is None:
                raise StopTimeout(f"pid {self.pid} still alive {kill_timeout}s after SIGKILL")
        return StopResult(status, escalated, tuple(sent), time.monotonic() - t0)

    async def stop_async(
        self,
        term_timeout: float = DEFAULT_TERM_TIMEOUT,
        kill_timeout: float = DEFAULT_KILL_TIMEOUT,
        *,
        term_signal: int = signal.SIGTERM,
    ) -> StopResult:
        """:meth:`stop` for asyncio: the same escalation, without blocking the loop."""
        t0 = time.monotonic()
        sent: list[int] = []
        status = self.poll()
        if status is None:
            self._signal_quietly(term_signal, sent)
            try:
                status = await asyncio.wait_for(self.wait_async(), term_timeout)
            except TimeoutError:
                status = None
        escalated = False
        if status is None:
            log.warn(
                "process ignored the stop signal; sending SIGKILL",
                pid=self.pid,
                signal=signal_name(term_signal),
                waited_s=term_timeout,
            )
            self._signal_quietly(signal.SIGKILL, sent)
            escalated = True
            try:
                status = await asyncio.wait_for(self.wait_async(), kill_timeout)
            except TimeoutError:
                raise StopTimeout(f"pid {self.pid} still alive {kill_timeout}s after SIGKILL")
        return StopResult(status, escalated, tuple(sent), time.monotonic() - t0)

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Close the pidfd (idempotent). The process keeps running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pidfd is not None:
                os.close(self._pidfd)

    def __enter__(self) -> ProcessHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and self._pidfd is not None:
            try:
                os.close(self._pidfd)
            except OSError:
                pass


def _resolve(argv0: str, env: Mapping[str, str]) -> str:
    """The executable to exec: a path as given, or a name searched in the *child's* PATH."""
    if "/" in argv0:
        return os.path.abspath(argv0)
    found = shutil.which(argv0, path=env.get("PATH", os.defpath))
    if found is None:
        raise SpawnError(
            f"{argv0!r} not found in PATH={env.get('PATH', os.defpath)!r}",
            errno=_errno.ENOENT,
            stage="prepare",
        )
    return os.path.abspath(found)


def _open_high(path: str, flags: int, mode: int = 0o640) -> int:
    """Open close-on-exec at fd >= 3 so the child's dup2 onto 0..2 cannot clobber another."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    if fd >= 3:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: str | os.PathLike[str],
    marker: str | None = None,
    native: bool | None = None,
) -> ProcessHandle:
    """Start ``argv`` detached from the agent and return its handle.

    Never through a shell; the environment is exactly ``env`` (nothing is
    inherited); stdin is ``/dev/null``; stdout and stderr append to
    ``log_path``; every other descriptor is closed; signal dispositions and
    mask are reset; the child leads a new session, so it has no controlling
    terminal and survives the agent being SIGKILLed. The working directory is
    inherited (the agent runs from ``/``). ``marker`` (e.g. the api-socket
    path) must occur in ``argv`` and is recorded for adoption.
    """
    argv = list(argv)
    if not argv:
        raise ValueError("argv must not be empty")
    if marker is not None and not any(marker in a for a in argv):
        raise ValueError(f"marker {marker!r} does not occur in argv")
    path = _resolve(argv[0], env)
    log_file = os.fspath(log_path)
    support = pidfd_support()
    try:
        stdin_fd = _open_high("/dev/null", os.O_RDONLY)
    except OSError as exc:
        raise SpawnError(f"cannot open /dev/null: {exc.strerror}", errno=exc.errno or 0, stage="prepare")
    try:
        try:
            log_fd = _open_high(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            raise SpawnError(
                f"cannot open log file {log_file}: {exc.strerror}", errno=exc.errno or 0, stage="prepare"
            )
        try:
            pid, pidfd = pidfd_sys.spawn(
                path, argv, env, stdin_fd, log_fd, log_fd, want_pidfd=support.available, native=native
            )
        finally:
            os.close(log_fd)
    finally:
        os.close(stdin_fd)
    # Exec has happened (both paths return only after it), so /proc shows the new program;
    # a child that already exited is a zombie whose stat (start time) is still readable.
    start = pidfd_sys.proc_start_time(pid, native=native)
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = os.path.realpath(path)
    ident = ProcessIdentity(pid=pid, start_time=start, exe=exe, boot_id=boot_id(), marker=marker)
    log.info(
        "process spawned",
        pid=pid,
        exe=exe,
        log_file=log_file,
        pidfd=pidfd is not None,
        native=pidfd_sys.is_native(native) and pidfd is not None,
    )
    return ProcessHandle(ident, pidfd, is_child=True, native=native, log_path=log_file)


def adopt(identity: ProcessIdentity, *, native: bool | None = None) -> ProcessHandle:
    """Take over a process recorded by an earlier agent, if it is still that process.

    Checks boot, start time, executable and marker, opens a pidfd, then checks
    again: the pid could have been reused between the first check and the
    open, and only the re-check proves the pidfd refers to the recorded process.
    Raises :class:`AdoptionRefused` otherwise.
    """
    check_identity(identity, native=native)
    support = pidfd_support()
    pidfd: int | None = None
    if support.available:
        try:
            pidfd = pidfd_sys.above_stdio(pidfd_sys.pidfd_open(identity.pid, native=native))
        except ProcessLookupError:
            raise AdoptionRefused(f"pid {identity.pid} exited during adoption", reason="gone")
        try:
            check_identity(identity, native=native)
        except BaseException:
            os.close(pidfd)
            raise
    is_child = _parent_of(identity.pid) == os.getpid()
    log.info("process adopted", pid=identity.pid, exe=identity.exe, pidfd=pidfd is not None, child=is_child)
    return ProcessHandle(identity, pidfd, is_child=is_child, native=native)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            tail = f.read().rpartition(b")")[2].split()
        return int(tail[1])
    except (OSError, IndexError, ValueError):
        return None


def identify(pid: int, *, marker: str | None = None, native: bool | None = None) -> ProcessIdentity:
    """Identity of a running process, e.g. to record one the agent did not spawn itself."""
    return read_identity(pid, marker=marker, native=native)
