"""Small syscall probes: ``nkudo_native._syscalls`` (cffi) or its twin, chosen by ``nkudo._native``.

Both implementations return ``-errno`` on failure rather than raising, so the
callers share one error path. ``native=None`` means "native if loaded",
``True`` demands it (:class:`nkudo._native.NativeUnavailable` otherwise),
``False`` forces the twin.
"""

from __future__ import annotations

import os

from nkudo import _native

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CLONE_NEWNET = 0x40000000


def pidfd_open(pid: int, flags: int = 0, *, native: bool | None = None) -> int:
    """Return a pidfd (caller closes it) or ``-errno``."""
    return int(_native.binding("syscalls", native).lib.nk_pidfd_open(pid, flags))


def cap_effective(*, native: bool | None = None) -> int:
    """The effective capability mask of this process, or ``-errno``."""
    b = _native.binding("syscalls", native)
    if not b.native:
        return int(b.lib.nk_cap_effective())
    out = b.module.ffi.new("uint64_t *")
    rc = int(b.lib.nk_cap_effective(out))
    return rc if rc < 0 else int(out[0])


def setns(fd: int, nstype: int = 0, *, native: bool | None = None) -> int:
    """Move the calling thread into the namespace behind ``fd``; 0 or ``-errno``."""
    return int(_native.binding("syscalls", native).lib.nk_setns(fd, nstype))


def pidfd_supported(*, native: bool | None = None) -> tuple[bool, int]:
    """Probe pidfd_open on our own pid: (works, errno)."""
    fd = pidfd_open(os.getpid(), 0, native=native)
    if fd < 0:
        return False, -fd
    os.close(fd)
    return True, 0
