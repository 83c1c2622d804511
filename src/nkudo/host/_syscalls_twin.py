"""Pure-Python twin of ``nkudo_native._syscalls`` (cffi), registered in ``nkudo._native``.

Why a module of its own: the loader hands callers either the compiled module
or this one, so both must offer the same ``lib`` function names with the same
contract (``-errno`` on failure, never raising). The one difference is forced
by cffi: a C out-parameter (``nk_cap_effective``'s ``uint64_t *``) is the
return value here.
"""

from __future__ import annotations

import os


class lib:
    """The twin functions, named as in ``ext/syscalls_build.py``."""

    __all__ = ("nk_cap_effective", "nk_pidfd_open", "nk_setns")

    @staticmethod
    def nk_pidfd_open(pid: int, flags: int) -> int:
        try:
            return os.pidfd_open(pid, flags)
        except OSError as exc:
            return -(exc.errno or 1)

    @staticmethod
    def nk_cap_effective() -> int:
        """CapEff of this process from /proc (what capget(2) returns), or ``-errno``."""
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("CapEff:"):
                        return int(line.split()[1], 16)
        except OSError as exc:
            return -(exc.errno or 1)
        return 0

    @staticmethod
    def nk_setns(fd: int, nstype: int) -> int:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, nstype) < 0:
            return -ctypes.get_errno()
        return 0
