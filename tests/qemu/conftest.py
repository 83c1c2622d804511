"""Fixtures for the real-guest tests: the Debian cloud kernel, a BusyBox initramfs, a host netns."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.conftest import Host, host  # noqa: F401  (re-exported fixture)
from tests.conftest import live_pids, skip_or_fail
from tests.qemu import guest


@pytest.fixture(scope="session")
def guest_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(kernel, initramfs) for the real guest; skips (or fails in CI) when the packages are missing."""
    kernel = guest.find_kernel()
    missing = [
        what
        for what, ok in (
            ("qemu-system-x86", guest.have_qemu()),
            ("linux-image-cloud-amd64", kernel),
            ("busybox-static", os.path.exists(guest.BUSYBOX)),
        )
        if not ok
    ]
    if missing:
        msg = "Debian packages missing: " + " ".join(missing) + " (scripts/ci-qemu.sh installs them)"
        skip_or_fail(msg)
    assert kernel is not None
    d = tmp_path_factory.mktemp("guest")
    return Path(kernel), guest.build_initramfs(d / "initramfs.cpio.gz", kernel)


def qemu_pids(under: Path) -> list[int]:
    """Live QEMU processes whose command line names a path under ``under``."""
    return live_pids(str(under).encode(), b"qemu-system")


@pytest.fixture
def qhost(host: Host, guest_images: tuple[Path, Path]) -> Iterator[Host]:  # noqa: F811
    """The agent test host with the guest kernel and initramfs in its image root; kills stray QEMUs."""
    kernel, initrd = guest_images
    shutil.copyfile(kernel, host.images / "vmlinuz")
    shutil.copyfile(initrd, host.images / "initramfs.cpio.gz")
    try:
        yield host
    finally:
        for pid in qemu_pids(host.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while qemu_pids(host.root) and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_for(path: Path, needle: str, timeout: float) -> float:
    """Seconds until ``needle`` appears in ``path`` (fails the test on timeout, with the log tail)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and needle in path.read_text(errors="replace"):
            return time.monotonic() - t0
        time.sleep(0.02)
    tail = path.read_text(errors="replace")[-2000:] if path.exists() else "(no file)"
    pytest.fail(f"{needle!r} not in {path} within {timeout}s; tail:\n{tail}")


def last_tick(path: Path) -> int:
    ticks = [
        int(x.split()[1])
        for x in path.read_text(errors="replace").splitlines()
        if x.startswith("nkudo-tick ")
    ]
    return ticks[-1] if ticks else 0
