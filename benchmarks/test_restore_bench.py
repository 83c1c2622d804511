"""Restore of a 256 MiB guest from its snapshot vs a cold boot of the same guest, QEMU TCG, same run.

Both sides end at the same kind of evidence, read from the guest's serial console: a cold boot at the
guest's ready marker (the kernel booted and init ran), a restore at the first counter line the
restored guest prints (its memory came back and it runs). Each side starts a fresh QEMU in a fresh
directory; stopping it is untimed. Gate: the restore is faster than the boot (ratio reported).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import time
from pathlib import Path

import pytest
from tests.qemu import guest

from benchmarks.conftest import Benchmark, GateRunFailed, record, time_sides
from nkudo.agent.provider import LaunchSpec, ProcessRecord, VmPaths
from nkudo.agent.providers.qemu import QemuProvider

ROUNDS = 3
MEMORY_MIB = 256


def _wait_console(path: str, needle: bytes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            if needle in f.read():
                return
        time.sleep(0.005)
    raise GateRunFailed(f"{needle!r} not on {path} within {timeout}s")


def test_restore_vs_cold_boot(tmp_path_factory: pytest.TempPathFactory, benchmark: Benchmark) -> None:
    """Gate: restoring the 256 MiB guest from its snapshot beats booting it (median of 3 each, same run)."""
    kernel = guest.find_kernel()
    if kernel is None or guest.have_qemu() is None or not os.path.exists(guest.BUSYBOX):
        pytest.fail("needs qemu-system-x86, linux-image-cloud-amd64 and busybox-static (scripts/ci-qemu.sh)")
    initrd = str(guest.build_initramfs(tmp_path_factory.mktemp("rb") / "initramfs.cpio.gz", kernel))
    root = Path(f"/tmp/nkrb-{os.getpid()}")
    root.mkdir()
    prov = QemuProvider(accel="tcg")
    running: list[tuple[VmPaths, ProcessRecord]] = []
    ids = itertools.count()

    def fresh() -> tuple[LaunchSpec, VmPaths]:
        vm_id = f"r{next(ids)}"
        d = root / vm_id
        d.mkdir()
        paths = VmPaths(str(d), str(d / "api.sock"), str(d / "vmm.log"), str(d / "console.log"), None, None)
        return LaunchSpec(vm_id, 1, MEMORY_MIB, kernel, None, initrd, guest.CMDLINE), paths

    def cold_boot() -> None:
        spec, paths = fresh()
        running.append((paths, prov.launch(spec, paths, timeout=30)))
        prov.boot(paths, timeout=10)
        _wait_console(paths.console_log, guest.READY_MARKER.encode())

    def restore() -> None:
        spec, paths = fresh()
        running.append((paths, prov.restore(spec, paths, str(snap), timeout=120)))
        prov.resume(paths, timeout=10)
        _wait_console(paths.console_log, b"nkudo-tick ")

    def stop_all() -> None:
        while running:
            paths, rec = running.pop()
            prov.stop(paths, rec, graceful_timeout=0, force=True)

    snap = root / "snap"
    snap.mkdir()
    try:
        # The snapshot: one boot, run a little, pause, write the state file (untimed).
        cold_boot()
        _wait_console(running[-1][0].console_log, b"nkudo-tick 3")
        prov.pause(running[-1][0], timeout=10)
        prov.snapshot(running[-1][0], str(snap), timeout=120)
        stop_all()
        state_mib = round(_size(snap) / 2**20, 1)
        res = time_sides(benchmark, {"restore": restore, "cold_boot": cold_boot}, primary="restore",
                         rounds=ROUNDS, warmup_rounds=0, between=stop_all)  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            stop_all()
        prov.close()
        shutil.rmtree(root, ignore_errors=True)
    ratio = res["cold_boot"].median / res["restore"].median
    record(
        benchmark,
        "qemu_restore_vs_boot",
        restore_s=round(res["restore"].median, 3),
        cold_boot_s=round(res["cold_boot"].median, 3),
        boot_over_restore=round(ratio, 2),
        memory_mib=MEMORY_MIB,
        state_file_mib=state_mib,
    )
    assert ratio > 1.0, f"restore {res['restore'].median:.2f}s is not faster than boot {res['cold_boot'].median:.2f}s"


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir()) if d.exists() else 0
