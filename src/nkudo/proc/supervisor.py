"""One thread that notices the exit of many processes at once, through their pidfds.

Why a selector thread: the agent supervises one VMM per VM and must react to
a VMM dying within milliseconds, yet cost nothing while all are healthy. Every
pidfd is registered with one epoll selector; the thread sleeps in
``epoll_wait`` with no timeout until a pidfd turns readable (or it is told to
change its set through an eventfd), so an idle supervisor uses no CPU.

The supervisor registers its own ``dup`` of each pidfd. Closing a
:class:`ProcessHandle` therefore never leaves a stale descriptor in the
selector, and a watch survives the handle being closed.

Handles without a pidfd (the logged fallback) are polled every
``fallback_interval`` seconds by the same thread.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from nkudo.log import get_logger
from nkudo.proc.process import ProcessHandle
from nkudo.proc.status import FALLBACK_POLL_INTERVAL, ExitStatus

log = get_logger("proc.supervisor")

ExitCallback = Callable[[ProcessHandle, ExitStatus], None]

_RETRY_INTERVAL = 0.002  # readable-but-not-yet-reapable children are looked at again after this


@dataclass(eq=False)
class _Entry:
    handle: ProcessHandle
    fd: int  # our dup of the pidfd, -1 in fallback
    future: Future[ExitStatus]
    callbacks: list[ExitCallback] = field(default_factory=list)


class Supervisor:
    """Watch many processes from one thread; each exit resolves a future and runs callbacks.

    Callbacks run in the supervisor thread and must not block; an exception in
    one is logged and does not stop supervision. Use as a context manager or
    call :meth:`close`.
    """

    def __init__(
        self, *, name: str = "nkudo-supervisor", fallback_interval: float = FALLBACK_POLL_INTERVAL
    ) -> None:
        self._name = name
        self._fallback_interval = fallback_interval
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._by_fd: dict[int, _Entry] = {}
        self._by_handle: dict[int, _Entry] = {}
        self._polled: set[_Entry] = set()  # fallback handles and not-yet-reapable children
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False

    # -- public API -----------------------------------------------------------

    def start(self) -> Supervisor:
        """Start the thread (``watch`` does it on first use)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("supervisor is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        return self

    def watch(self, handle: ProcessHandle, callback: ExitCallback | None = None) -> Future[ExitStatus]:
        """Watch ``handle``; the future resolves with its :class:`ExitStatus` (already exited: at once)."""
        self.start()
        with self._lock:
            if self._closed:
                raise RuntimeError("supervisor is closed")
            entry = self._by_handle.get(id(handle))
            if entry is not None:
                if callback is not None:
                    entry.callbacks.append(callback)
                return entry.future
            fut: Future[ExitStatus] = Future()
            if handle.pidfd is None:
                entry = _Entry(handle, -1, fut)
                self._polled.add(entry)
                log.info(
                    "supervising by polling (no pidfd)", pid=handle.pid, interval_s=self._fallback_interval
                )
            else:
                fd = fcntl.fcntl(handle.fileno(), fcntl.F_DUPFD_CLOEXEC, 3)
                entry = _Entry(handle, fd, fut)
                self._by_fd[fd] = entry
                # Level-triggered: an already exited process is reported by the next epoll_wait.
                self._sel.register(fd, selectors.EVENT_READ)
            if callback is not None:
                entry.callbacks.append(callback)
            self._by_handle[id(handle)] = entry
        if entry.fd < 0:
            self._wakeup()  # the thread may be sleeping without a timeout
        return fut

    def unwatch(self, handle: ProcessHandle) -> bool:
        """Stop watching (its future is cancelled); False if it was not watched."""
        with self._lock:
            entry = self._by_handle.get(id(handle))
            if entry is None:
                return False
            self._drop(entry)
        entry.future.cancel()
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_handle)

    def cpu_time(self) -> float:
        """CPU seconds (user+system) the supervisor thread has used, readable from any thread."""
        t = self._thread
        if t is None or t.ident is None or not t.is_alive():
            return 0.0
        return time.clock_gettime(time.pthread_getcpuclockid(t.ident))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread, drop every watch (pending futures are cancelled). Processes keep running."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
        self._wakeup()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._lock:
            entries = list(self._by_handle.values())
            for entry in entries:
                self._drop(entry)
            self._closed = True
            self._sel.close()
            os.close(self._wake)
        for entry in entries:
            entry.future.cancel()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- thread ----------------------------------------------------------------

    def _wakeup(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # closed: the thread is gone anyway

    def _drop(self, entry: _Entry) -> None:
        """Forget ``entry`` (lock held)."""
        self._by_handle.pop(id(entry.handle), None)
        self._polled.discard(entry)
        if entry.fd >= 0 and self._by_fd.get(entry.fd) is entry:
            del self._by_fd[entry.fd]
            try:
                self._sel.unregister(entry.fd)
            except (KeyError, ValueError):
                pass  # moved to the retry set earlier
            os.close(entry.fd)

    def _run(self) -> None:
        log.debug("supervisor started", thread=self._name)
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    retry = any(e.fd >= 0 for e in self._polled)
                    timeout = (
                        (_RETRY_INTERVAL if retry else self._fallback_interval) if self._polled else None
                    )
                events = self._sel.select(timeout)
                done: list[tuple[_Entry, ExitStatus]] = []
                with self._lock:
                    if self._closing:
                        return
                    for key, _mask in events:
                        if key.fd == self._wake:
                            try:
                                os.eventfd_read(self._wake)
                            except BlockingIOError:
                                pass
                            continue
                        entry = self._by_fd.get(key.fd)
                        if entry is None:
                            continue  # unwatched while we were waking up
                        self._examine(entry, done, from_event=True)
                    for entry in list(self._polled):
                        self._examine(entry, done, from_event=False)
                for entry, status in done:
                    self._notify(entry, status)
        except Exception:
            log.exception("supervisor thread crashed; exits are no longer noticed", thread=self._name)
            raise

    def _examine(self, entry: _Entry, done: list[tuple[_Entry, ExitStatus]], *, from_event: bool) -> None:
        """Check one entry (lock held); exited ones go to ``done`` and are dropped."""
        try:
            status = entry.handle._check(entry.fd) if entry.fd >= 0 else entry.handle.poll()
        except Exception:
            log.exception("cannot check process", pid=entry.handle.pid)
            return
        if status is not None:
            self._drop(entry)
            done.append((entry, status))
        elif from_event and entry.fd >= 0:
            # Readable yet not reapable: poll it briefly instead of spinning on a level-triggered fd.
            self._sel.unregister(entry.fd)
            self._polled.add(entry)

    def _notify(self, entry: _Entry, status: ExitStatus) -> None:
        try:
            entry.future.set_result(status)
        except InvalidStateError:
            pass  # cancelled by its owner
        for cb in entry.callbacks:
            try:
                cb(entry.handle, status)
            except Exception:
                log.exception("exit callback failed", pid=entry.handle.pid)
