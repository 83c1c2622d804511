"""cffi syscall shims against their twins, on the real kernel."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from nkudo.host import syscalls
from tests.conftest import require_native


def test_cap_effective_native_equals_twin() -> None:
    require_native("syscalls")
    assert syscalls.cap_effective(native=True) == syscalls.cap_effective(native=False)
    if os.geteuid() == 0:
        assert syscalls.cap_effective() & (1 << syscalls.CAP_NET_ADMIN)


@pytest.mark.parametrize("native", [True, False])
def test_pidfd_open_own_pid(native: bool) -> None:
    if native:
        require_native("syscalls")
    fd = syscalls.pidfd_open(os.getpid(), native=native)
    assert fd >= 0
    os.close(fd)


def test_pidfd_open_errors_agree() -> None:
    require_native("syscalls")
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: the pid no longer exists
    for pid, flags, expected in (
        (p.pid, 0, errno.ESRCH),
        (os.getpid(), 0x7FFF0000, errno.EINVAL),
        (-5, 0, errno.EINVAL),
    ):
        assert syscalls.pidfd_open(pid, flags, native=True) == -expected
        assert syscalls.pidfd_open(pid, flags, native=False) == -expected


def test_setns_errors_agree() -> None:
    require_native("syscalls")
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert syscalls.setns(fd, 0, native=True) == syscalls.setns(fd, 0, native=False) == -errno.EINVAL
    finally:
        os.close(fd)
    assert syscalls.pidfd_supported() == (True, 0)
