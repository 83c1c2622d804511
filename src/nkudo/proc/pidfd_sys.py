"""Thin pidfd syscall layer of process control: ``nkudo_native._pidfd`` or its twin, via ``nkudo._native``.

Why a layer of its own: both implementations must give the same results and
raise the same exceptions, so every caller (and the equivalence tests) goes
through these functions. The native functions return ``-errno``; this module
turns that into the ``OSError`` subclass the stdlib twin raises
(``ProcessLookupError`` for ESRCH, ``ChildProcessError`` for ECHILD, ...).

``native=None`` means "native if loaded" (``NKUDO_NATIVE=0`` forces the twin),
``True`` requires the native module (:class:`nkudo._native.NativeUnavailable`
otherwise), ``False`` forces the twin (:mod:`nkudo.proc._pidfd_twin`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from nkudo import _native
from nkudo.proc.errors import SpawnError

P_PIDFD = 3  # os.P_PIDFD (Linux 5.4)
PIDFD_NONBLOCK = 0o4000  # os.PIDFD_NONBLOCK exists only from Python 3.12
CLD_EXITED = 1
CLD_KILLED = 2
CLD_DUMPED = 3

# Stage numbers written by the native child (ext/pidfd_build.py) -> SpawnError.stage.
_STAGES = {0: "prepare", 1: "signals", 2: "setsid", 3: "stdio", 4: "exec"}


class WaitResult(NamedTuple):
    """What waitid(2) reported: ``code`` is CLD_EXITED/CLD_KILLED/CLD_DUMPED."""

    pid: int
    code: int
    status: int


def _raise(neg_errno: int, filename: str | None = None) -> None:
    err = -neg_errno
    if filename is None:
        raise OSError(err, os.strerror(err))
    raise OSError(err, os.strerror(err), filename)


def is_native(native: bool | None = None) -> bool:
    """Whether calls with this ``native`` preference go to the compiled module."""
    return _native.binding("pidfd", native).native


def pidfd_open(pid: int, flags: int = 0, *, native: bool | None = None) -> int:
    """A close-on-exec pidfd for ``pid`` (caller closes it)."""
    b = _native.binding("pidfd", native)
    if not b.native:
        return int(b.lib.nk_pidfd_open(pid, flags))
    r = int(b.lib.nk_pidfd_open(pid, flags))
    if r < 0:
        _raise(r)
    return r


def pidfd_send_signal(pidfd: int, sig: int, flags: int = 0, *, native: bool | None = None) -> None:
    """Signal the process behind ``pidfd``; ``ProcessLookupError`` once it has exited."""
    b = _native.binding("pidfd", native)
    if not b.native:
        b.lib.nk_pidfd_send_signal(pidfd, sig, flags)
        return
    r = int(b.lib.nk_pidfd_send_signal(pidfd, sig, flags))
    if r < 0:
        _raise(r)


def waitid_pidfd(pidfd: int, options: int, *, native: bool | None = None) -> WaitResult | None:
    """waitid(P_PIDFD): reaps our child; None if WNOHANG and nothing to report.

    ``ChildProcessError`` (ECHILD) when the process is not our child: its
    status cannot be known.
    """
    b = _native.binding("pidfd", native)
    if not b.native:
        got = b.lib.nk_waitid_pidfd(pidfd, options)
        return None if got is None else WaitResult(*got)
    out = b.module.ffi.new("int[3]")
    r = int(b.lib.nk_waitid_pidfd(pidfd, options, out, out + 1, out + 2))
    if r < 0:
        _raise(r)
    if out[0] == 0:
        return None
    return WaitResult(int(out[0]), int(out[1]), int(out[2]))


def proc_start_time(pid: int, *, native: bool | None = None) -> int:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    ``FileNotFoundError`` when no such process; ``OSError(EPROTO)`` if the file
    cannot be parsed.
    """
    b = _native.binding("pidfd", native)
    if not b.native:
        return int(b.lib.nk_proc_start_time(pid))
    path = f"/proc/{pid}/stat"
    out = b.module.ffi.new("unsigned long long *")
    r = int(b.lib.nk_proc_start_time(pid, out))
    if r < 0:
        _raise(r, path)
    return int(out[0])


def _check_args(path: str, argv: Sequence[str], env: Mapping[str, str]) -> None:
    if not argv:
        raise ValueError("argv must not be empty")
    for s in (path, *argv, *env.keys(), *env.values()):
        if not isinstance(s, str):
            raise TypeError(f"argv and env must be str, got {type(s).__name__}")
        if "\0" in s:
            raise ValueError("embedded null byte")
    for k in env:
        if not k or "=" in k:
            raise ValueError(f"illegal environment variable name {k!r}")


def spawn(
    path: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    stdin_fd: int,
    out_fd: int,
    err_fd: int,
    *,
    want_pidfd: bool = True,
    native: bool | None = None,
) -> tuple[int, int | None]:
    """Start ``path`` in a new session with the given stdio; return ``(pid, pidfd)``.

    Native: clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD), so the pidfd exists from
    the first instant.
    Twin: posix_spawn then pidfd_open, race-free too because nobody can reap
    (and so free the pid of) our child before we open it. The descriptors must
    be >= 3. Raises :class:`SpawnError` (``errno``, ``stage``).
    """
    _check_args(path, argv, env)
    if min(stdin_fd, out_fd, err_fd) < 3:
        raise ValueError("stdio descriptors must be >= 3")
    b = _native.binding("pidfd", native if want_pidfd else False)
    if not b.native:
        pid = int(b.lib.nk_spawn(path, argv, env, stdin_fd, out_fd, err_fd))
        if not want_pidfd:
            return pid, None
        return pid, above_stdio(os.pidfd_open(pid))
    ffi = b.module.ffi
    keep = [ffi.new("char[]", os.fsencode(a)) for a in argv]
    c_argv = ffi.new("char *[]", [*keep, ffi.NULL])
    keep_env = [ffi.new("char[]", os.fsencode(f"{k}={v}")) for k, v in env.items()]
    c_envp = ffi.new("char *[]", [*keep_env, ffi.NULL])
    out = ffi.new("int[2]")
    r = int(b.lib.nk_spawn(os.fsencode(path), c_argv, c_envp, stdin_fd, out_fd, err_fd, out, out + 1))
    if r < 0:
        err = -r
        stage = _STAGES.get(int(out[1]), "exec")
        raise SpawnError(f"cannot execute {path} ({stage}): {os.strerror(err)}", errno=err, stage=stage)
    return r, above_stdio(int(out[0]))


def above_stdio(fd: int) -> int:
    """Move a pidfd off 0..2 (possible when the agent runs with stdio closed).

    Why: code that later re-opens stdio (daemonisation, log rotation) would
    silently replace the pidfd with a file.
    """
    if fd >= 3:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)
