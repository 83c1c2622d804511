"""Small syscall probes (native ``nkudo_native._sys`` via cffi, with a twin).

Both implementations return ``-errno`` on failure rather than raising, so the
callers share one error path.
"""

from __future__ import annotations

import os

from nkudo import _native

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def _pidfd_open_py(pid: int, flags: int = 0) -> int:
    try:
        return os.pidfd_open(pid, flags)
    except OSError as exc:
        return -(exc.errno or 1)


def _cap_effective_py() -> int:
    """CapEff of this process from /proc (what capget(2) returns)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError as exc:
        return -(exc.errno or 1)
    return 0


def pidfd_open(pid: int, flags: int = 0, *, native: bool | None = None) -> int:
    """Return a pidfd (caller closes it) or ``-errno``."""
    mod = _native.load("sys") if native is not False else None
    if mod is not None:
        return int(mod.lib.nk_pidfd_open(pid, flags))
    return _pidfd_open_py(pid, flags)


def cap_effective(*, native: bool | None = None) -> int:
    """The effective capability mask of this process, or ``-errno``."""
    mod = _native.load("sys") if native is not False else None
    if mod is not None:
        out = mod.ffi.new("uint64_t *")
        rc = int(mod.lib.nk_cap_effective(out))
        return rc if rc < 0 else int(out[0])
    return _cap_effective_py()


CLONE_NEWNET = 0x40000000


def _setns_py(fd: int, nstype: int) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) < 0:
        return -ctypes.get_errno()
    return 0


def setns(fd: int, nstype: int = 0, *, native: bool | None = None) -> int:
    """Move the calling thread into the namespace behind ``fd``; 0 or ``-errno``."""
    mod = _native.load("sys") if native is not False else None
    if mod is not None:
        return int(mod.lib.nk_setns(fd, nstype))
    return _setns_py(fd, nstype)


def pidfd_supported(*, native: bool | None = None) -> tuple[bool, int]:
    """Probe pidfd_open on our own pid: (works, errno)."""
    fd = pidfd_open(os.getpid(), 0, native=native)
    if fd < 0:
        return False, -fd
    os.close(fd)
    return True, 0
