"""A real Linux guest through `nkudo-edge apply --provider qemu` (TCG), and the same plan on the simulator.

The guest is Debian's cloud kernel with a BusyBox initramfs built by the tests
(see :mod:`tests.qemu.guest`); it runs on a real TAP in a private network
namespace. What the guest prints on its serial console is the evidence: the
ready marker, a counter that stops while paused, the power-button marker.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import Host
from tests.qemu import guest
from tests.qemu.conftest import last_tick, qemu_pids, wait_for

pytestmark = pytest.mark.slow
QEMU = ("--provider", "qemu", "--qemu-accel", "tcg")


def plan(h: Host) -> list[list[dict[str, Any]]]:
    """The plan, one step per apply run (the test observes the guest between steps)."""

    def act(aid: str, type_: str, **params: Any) -> dict[str, Any]:
        return {"action_id": aid, "type": type_, "params": {"vm_id": "vm-q", **params}}

    return [
        [act("create", "MicroVMCreate", name="q", vcpus=1, memory_mib=256, nics=[{"bridge": "br0"}],
             kernel_path=str(h.images / "vmlinuz"), initramfs_path=str(h.images / "initramfs.cpio.gz"),
             cmdline=guest.CMDLINE)],
        [act("pause", "MicroVMPause")],
        [act("snap", "MicroVMSnapshot", snapshot_name="s1")],
        [act("resume", "MicroVMResume")],
        [act("stop", "MicroVMStop")],
        [act("delete", "MicroVMDelete")],
    ]


def run_step(h: Host, step: list[dict[str, Any]], *extra: str) -> dict[str, Any]:
    rc, doc, err = h.apply(step, *extra, timeout=180)
    assert rc == 0, (doc, err)
    (out,) = doc["outcomes"]
    assert out["status"] == "SUCCEEDED", out
    assert not out.get("replayed"), out  # really executed, not a recorded result
    return dict(out["result"])


def shape(v: Any) -> Any:
    """Keys and value types, recursively (values differ between providers, shapes must not)."""
    if isinstance(v, dict):
        return {k: shape(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        return [shape(v[0])] if v else []
    return type(v).__name__


def run_plan_on_qemu(h: Host) -> list[dict[str, Any]]:
    steps = plan(h)
    console = h.vms / "vm-q" / "console.log"
    results = [run_step(h, steps[0], *QEMU)]
    assert results[0]["status"] == "RUNNING"
    tap = results[0]["taps"][0]
    assert h.taps()[tap]["ifalias"] == "nkudo:vm=vm-q" and h.taps()[tap]["master"] == "br0"
    (pid,) = qemu_pids(h.root)
    assert results[0]["pid"] == pid
    wait_for(console, guest.READY_MARKER, timeout=90)
    ready_line = next(x for x in console.read_text().splitlines() if x.startswith(guest.READY_MARKER))
    assert "eth0" in ready_line, ready_line  # virtio-net on the TAP reached the guest
    vmm_log = (h.vms / "vm-q" / "vmm.log").read_text()
    assert "accel=tcg" in vmm_log

    # Paused: the counter stops (let an in-flight line land first), and stays stopped for a while.
    t0 = last_tick(console)
    while last_tick(console) < t0 + 2:
        time.sleep(0.05)
    results.append(run_step(h, steps[1], *QEMU))
    assert results[-1]["status"] == "PAUSED"
    time.sleep(0.5)
    frozen = last_tick(console)
    time.sleep(1.5)
    assert last_tick(console) == frozen, "the guest kept running while paused"

    # Snapshot of the paused VM: a non-empty state file inside the snapshot directory; still paused.
    results.append(run_step(h, steps[2], *QEMU))
    snap_dir = Path(results[-1]["snapshot_dir"])
    assert snap_dir == h.snaps / "vm-q" / "s1"
    state_file = snap_dir / "vmstate.bin"
    assert state_file.stat().st_size > 1_000_000  # RAM + devices of a 256 MiB guest
    assert {f["name"]: f["size_bytes"] for f in results[-1]["files"]}["vmstate.bin"] == state_file.stat().st_size
    time.sleep(0.5)
    assert last_tick(console) == frozen, "the snapshot let the guest run"

    # Resume: the counter continues from where it stopped.
    results.append(run_step(h, steps[3], *QEMU))
    assert results[-1]["status"] == "RUNNING"
    deadline = time.monotonic() + 10
    while last_tick(console) < frozen + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last_tick(console) >= frozen + 3, "the counter did not continue after resume"
    assert last_tick(console) < frozen + 40  # continued, not restarted nor skipped ahead

    # Graceful stop: power button -> acpid -> poweroff; QEMU exits by itself.
    results.append(run_step(h, steps[4], *QEMU))
    assert results[-1]["stopped_by"] == "guest", results[-1]
    assert guest.POWEROFF_MARKER in console.read_text()
    assert qemu_pids(h.root) == []

    results.append(run_step(h, steps[5], *QEMU))
    assert results[-1]["taps_removed"] == [tap]
    assert h.taps() == {}
    assert not (h.vms / "vm-q").exists()
    assert qemu_pids(h.root) == []
    return results


def test_real_guest_lifecycle_and_same_plan_on_simulator(qhost: Host) -> None:
    h = qhost
    qemu_results = run_plan_on_qemu(h)
    # The same plan, unchanged, on the Cloud Hypervisor provider with the simulator: a second agent
    # (own state, runtime and snapshot directories) in the same namespace, reading the same images.
    sim = Host(h.ns, Path(f"/tmp/nkh-{uuid.uuid4().hex[:8]}"))
    try:
        sim_results = [run_step(sim, step, "--image-root", str(h.images)) for step in plan(h)]
        assert sim.requests("vm.create")  # the simulator really served it
        assert sim.vmm_pids() == [] and sim.taps() == {}
    finally:
        sim.kill_vmms()
        shutil.rmtree(sim.root, ignore_errors=True)
    for q, s in zip(qemu_results, sim_results, strict=True):
        assert shape(q) == shape(s), (q, s)
    assert [r.get("status") for r in qemu_results] == [r.get("status") for r in sim_results]
    assert [r.get("stopped_by") for r in qemu_results] == [r.get("stopped_by") for r in sim_results]
