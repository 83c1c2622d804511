"""Issue 15 (MicroVMRestore) with a real guest under QEMU (TCG): the memory comes back, the guest does not boot again.

The guest prints ``nkudo-tick N`` every 0.2 s (see :mod:`tests.qemu.guest`). It is paused, the last tick
noted, snapshotted and deleted; the restored VM's console (a fresh file: the runtime directory went with
the delete) must continue right after that tick and must not show the boot marker. A clone restored
under a new id next to the original then runs on its own: pausing one does not stop the other.
One real boot in all; the rest are restores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import Host
from tests.qemu import guest
from tests.qemu.conftest import last_tick, qemu_pids, wait_for
from tests.qemu.test_lifecycle_real import run_step

pytestmark = pytest.mark.slow
QEMU = ("--provider", "qemu", "--qemu-accel", "tcg")


def act(aid: str, type_: str, vm: str = "vm-q", **params: Any) -> list[dict[str, Any]]:
    return [{"action_id": aid, "type": type_, "params": {"vm_id": vm, **params}}]


def first_tick(path: Path) -> int:
    ticks = [int(x.split()[1]) for x in path.read_text(errors="replace").splitlines() if x.startswith("nkudo-tick ")]
    return ticks[0] if ticks else 0


def wait_ticks(path: Path, above: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and last_tick(path) > above:
            return last_tick(path)
        time.sleep(0.05)
    tail = path.read_text(errors="replace")[-1500:] if path.exists() else "(no file)"
    pytest.fail(f"{path}: no tick above {above} within {timeout}s; tail:\n{tail}")


def test_restore_continues_the_guest_and_clones_run_independently(qhost: Host) -> None:
    """Issue 15 (MicroVMRestore, QEMU): restore after delete continues the counter; a clone runs on its own."""
    h = qhost
    console = h.vms / "vm-q" / "console.log"
    created = run_step(h, act("create", "MicroVMCreate", name="q", vcpus=1, memory_mib=256, nics=[{"bridge": "br0"}],
                              kernel_path=str(h.images / "vmlinuz"), initramfs_path=str(h.images / "initramfs.cpio.gz"),
                              cmdline=guest.CMDLINE), *QEMU)  # fmt: skip
    wait_for(console, guest.READY_MARKER, timeout=90)
    wait_ticks(console, 3)
    run_step(h, act("pause", "MicroVMPause"), *QEMU)
    time.sleep(0.5)
    frozen = last_tick(console)
    snap = run_step(h, act("snap", "MicroVMSnapshot", snapshot_name="s1"), *QEMU)
    snap_dir = Path(snap["snapshot_dir"])
    state_before = (snap_dir / "vmstate.bin").stat()
    run_step(h, act("delete", "MicroVMDelete"), *QEMU)
    assert qemu_pids(h.root) == [] and h.taps() == {} and not console.exists()

    # Same VM back: same TAP and MAC, and the guest continues from the frozen tick without booting.
    res = run_step(h, act("restore", "MicroVMRestore", snapshot_name="s1"), *QEMU)
    assert res["status"] == "RUNNING" and res["taps"] == created["taps"] and res["macs"] == created["macs"]
    wait_ticks(console, frozen + 2)
    text = console.read_text(errors="replace")
    assert guest.READY_MARKER not in text, "the restored guest booted again"
    assert frozen < first_tick(console) <= frozen + 2, (frozen, first_tick(console))
    assert len(qemu_pids(h.root)) == 1

    # A clone under a new id while the original runs: own TAP, own console, counters independent.
    clone_console = h.vms / "vm-c" / "console.log"
    clone = run_step(h, act("clone", "MicroVMRestore", "vm-c", snapshot_name="s1", source_vm_id="vm-q"), *QEMU)
    assert clone["status"] == "RUNNING" and set(clone["taps"]).isdisjoint(created["taps"])
    assert clone["macs"] != created["macs"]
    assert {t["ifalias"] for t in h.taps().values()} == {"nkudo:vm=vm-q", "nkudo:vm=vm-c"}
    assert len(qemu_pids(h.root)) == 2
    wait_ticks(clone_console, frozen + 2)
    assert guest.READY_MARKER not in clone_console.read_text(errors="replace")
    assert frozen < first_tick(clone_console) <= frozen + 2
    run_step(h, act("pause-orig", "MicroVMPause"), *QEMU)
    time.sleep(0.5)
    orig_frozen, clone_at = last_tick(console), last_tick(clone_console)
    wait_ticks(clone_console, clone_at + 3)
    assert last_tick(console) == orig_frozen, "the original kept running while paused"
    run_step(h, act("resume-orig", "MicroVMResume"), *QEMU)
    wait_ticks(console, orig_frozen + 2)

    # The snapshot was only read.
    after = (snap_dir / "vmstate.bin").stat()
    assert (after.st_size, after.st_mtime_ns) == (state_before.st_size, state_before.st_mtime_ns)
    for aid, vm in (("del-q", "vm-q"), ("del-c", "vm-c")):
        run_step(h, act(aid, "MicroVMDelete", vm), *QEMU)
    assert qemu_pids(h.root) == [] and h.taps() == {}
