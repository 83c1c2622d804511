"""Pure-Python twin of ``nkudo_native._pidfd`` (cffi), registered in ``nkudo._native``.

Why a module of its own: the loader hands :mod:`nkudo.proc.pidfd_sys` the
compiled module or this one, so both offer the same ``lib`` function names.
The compiled functions return ``-errno`` and fill C out-parameters; these take
Python arguments, return the values and raise the ``OSError`` (or
:class:`SpawnError`) that ``pidfd_sys`` builds from a native ``-errno``, so the
callers of ``pidfd_sys`` see one behaviour.
"""

from __future__ import annotations

import errno as _errno
import os
import signal
from collections.abc import Mapping, Sequence

from nkudo.proc.errors import SpawnError

P_PIDFD = 3  # os.P_PIDFD (Linux 5.4)


def _parse_start_time(data: bytes) -> int | None:
    _head, sep, tail = data.rpartition(b")")
    if not sep:
        return None
    fields = tail.split()
    # tail starts at field 3 (state); field 22 is starttime.
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


class lib:
    """The twin functions, named as in ``ext/pidfd_build.py``."""

    __all__ = ("nk_pidfd_open", "nk_pidfd_send_signal", "nk_proc_start_time", "nk_spawn", "nk_waitid_pidfd")

    nk_pidfd_open = staticmethod(os.pidfd_open)

    @staticmethod
    def nk_pidfd_send_signal(pidfd: int, sig: int, flags: int) -> None:
        signal.pidfd_send_signal(pidfd, sig, None, flags)

    @staticmethod
    def nk_waitid_pidfd(pidfd: int, options: int) -> tuple[int, int, int] | None:
        """``(pid, code, status)``; None if WNOHANG and nothing to report."""
        res = os.waitid(P_PIDFD, pidfd, options)
        if res is None or res.si_pid == 0:
            return None
        return (res.si_pid, res.si_code, res.si_status)

    @staticmethod
    def nk_proc_start_time(pid: int) -> int:
        path = f"/proc/{pid}/stat"
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
        finally:
            os.close(fd)
        value = _parse_start_time(data)
        if value is None:
            raise OSError(_errno.EPROTO, os.strerror(_errno.EPROTO), path)
        return value

    @staticmethod
    def nk_spawn(
        path: str, argv: Sequence[str], env: Mapping[str, str], stdin_fd: int, out_fd: int, err_fd: int
    ) -> int:
        """posix_spawn with the same child set-up as the native clone path; returns the pid.

        posix_spawn has no close-all action, so every *inheritable* fd >= 3 is closed
        explicitly; non-inheritable ones (the Python default, PEP 446) close at exec.
        """
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, stdin_fd, 0),
            (os.POSIX_SPAWN_DUP2, out_fd, 1),
            (os.POSIX_SPAWN_DUP2, err_fd, 2),
        ]
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd < 3:
                continue
            try:
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:
                continue  # the listdir descriptor itself, already closed
        sigdef = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
        try:
            return os.posix_spawn(
                path,
                list(argv),
                dict(env),
                file_actions=actions,
                setsid=True,
                setsigmask=(),
                setsigdef=sigdef,
            )
        except OSError as exc:
            err = exc.errno or _errno.EIO
            raise SpawnError(
                f"cannot execute {path} (exec): {os.strerror(err)}", errno=err, stage="exec"
            ) from None
