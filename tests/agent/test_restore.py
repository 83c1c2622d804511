"""Issue 15 (MicroVMRestore) on the Cloud Hypervisor provider with the simulator: the same VM brought back
after a delete, a clone under a new id next to the original, the refusals, the rollback of a failed
restore and SIGKILLs at any point of a restore plan."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.executor import Outcome
from nkudo.agent.plan import parse_plan
from nkudo.agent.runtime import Agent
from nkudo.agent.vms import stable_mac
from nkudo.chapi import ChClient
from tests.agent.conftest import EDGE, Host
from tests.agent.test_supervision import _agent, rig  # noqa: F401 - fixture re-export


def _act(aid: str, type_: str, vm: str = "vm-1", **params: Any) -> dict[str, Any]:
    return {"action_id": aid, "type": type_, "params": {"vm_id": vm, **params}}


def _create(images: Path, vm: str = "vm-1") -> dict[str, Any]:
    return _act(f"c-{vm}", "MicroVMCreate", vm, name=vm, vcpus=1, memory_mib=64,
                kernel_path=str(images / "vmlinux"), image_path=str(images / "base.img"),
                nics=[{"bridge": "br0"}])  # fmt: skip


def _run(agent: Agent, *actions: dict[str, Any]) -> list[Outcome]:
    return agent.executor.run_plan(parse_plan({"actions": list(actions)})[1])


def _ok(agent: Agent, *actions: dict[str, Any]) -> list[dict[str, Any]]:
    outs = _run(agent, *actions)
    for o in outs:
        assert o.ok, (o.action_id, o.error_code, o.error_message)
    return [o.result for o in outs]


def _digest(d: Path) -> dict[str, str]:
    """Content and mtime of every file in a snapshot directory (proof it was only read)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() + f"@{p.stat().st_mtime_ns}"
            for p in sorted(d.iterdir())}  # fmt: skip


def _setup(root: Path, images: Path) -> Agent:
    with open(images / "base.img", "wb") as f:
        f.truncate(64 << 20)
        f.write(b"original rootfs")
    return _agent(root, images, "--sim-journal", str(root / "journal.jsonl"))


def _requests(root: Path, endpoint: str) -> list[dict[str, Any]]:
    recs = [json.loads(x) for x in (root / "journal.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if r.get("kind") == "request" and r.get("endpoint") == endpoint]


def _owned_taps() -> dict[str, str]:
    out = subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {lk["ifname"]: lk.get("ifalias", "") for lk in json.loads(out)
            if lk.get("linkinfo", {}).get("info_kind") == "tun"}  # fmt: skip


def test_restore_same_vm_after_delete(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Issue 15 (MicroVMRestore): a deleted VM comes back from its snapshot with its TAP name, MAC and disk."""
    root, images = rig
    agent = _setup(root, images)
    try:
        (created,) = _ok(agent, _create(images))
        rootfs = root / "v" / "vm-1" / "rootfs.img"
        with open(rootfs, "r+b") as f:
            f.write(b"written by the guest")
        (snap,) = _ok(agent, _act("s", "MicroVMSnapshot", snapshot_name="s1"))
        snap_dir = Path(snap["snapshot_dir"])
        assert (snap_dir / "rootfs.img").read_bytes()[:20] == b"written by the guest"
        before = _digest(snap_dir)
        _ok(agent, _act("d", "MicroVMDelete"))
        assert not (root / "v" / "vm-1").exists() and _owned_taps() == {}

        (res,) = _ok(agent, _act("r", "MicroVMRestore", snapshot_name="s1"))
        assert res["status"] == "RUNNING" and res["taps"] == created["taps"] and res["macs"] == created["macs"]
        assert res["source_vm_id"] == "vm-1" and res["snapshot_dir"] == str(snap_dir)
        info = ChClient(str(root / "v" / "vm-1" / "api.sock")).info()
        assert info.state == "Running"
        assert info.config["net"][0]["tap"] == created["taps"][0] and info.config["net"][0]["mac"] == created["macs"][0]
        assert rootfs.read_bytes()[:20] == b"written by the guest"  # the snapshot's disk, not the image
        (req,) = _requests(root, "vm.restore")
        assert req["status"] == 204 and req["schema_valid"] is True and req["body"]["resume"] is False
        assert _requests(root, "vm.resume")[-1]["status"] == 204
        assert _owned_taps() == {created["taps"][0]: "nkudo:vm=vm-1"}
        rec = agent.store.get_vm("vm-1")
        assert rec is not None and not rec.create_pending and rec.status.value == "RUNNING"
        assert _digest(snap_dir) == before
        # A second restore of a VM whose VMM runs is refused and leaves it alone.
        (again,) = _run(agent, _act("r2", "MicroVMRestore", snapshot_name="s1"))
        assert again.error_code == "VM_EXISTS" and ChClient(str(root / "v" / "vm-1" / "api.sock")).info().state == "Running"
    finally:
        agent.close()


def test_restore_same_vm_after_its_vmm_crashed(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Issue 15 (MicroVMRestore): a VM whose VMM died comes back in place; a failed restore of it keeps the
    record (for a delete or another restore) and ends only the VMM it started."""
    root, images = rig
    agent = _setup(root, images)
    try:
        (created,) = _ok(agent, _create(images))
        _ok(agent, _act("s", "MicroVMSnapshot", snapshot_name="s1"))
        broken = root / "n" / "vm-1" / "s2"
        shutil.copytree(root / "n" / "vm-1" / "s1", broken)
        (broken / "memory-ranges").unlink()
        paths = agent.vms.paths("vm-1")
        (pid,) = agent.provider.live_vmms(paths)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while agent.store.get_vm("vm-1").status.value != "CRASHED" and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        assert agent.store.get_vm("vm-1").status.value == "CRASHED"  # type: ignore[union-attr]

        (failed,) = _run(agent, _act("r1", "MicroVMRestore", snapshot_name="s2"))
        assert not failed.ok and "memory-ranges" in (failed.error_message or "")
        rec = agent.store.get_vm("vm-1")
        assert rec is not None and rec.status.value == "STOPPED" and "restore failed" in (rec.last_error or "")
        assert (root / "v" / "vm-1" / "rootfs.img").exists() and _owned_taps() == {created["taps"][0]: "nkudo:vm=vm-1"}
        assert agent.provider.live_vmms(paths) == []

        (res,) = _ok(agent, _act("r2", "MicroVMRestore", snapshot_name="s1"))
        assert res["status"] == "RUNNING" and res["taps"] == created["taps"]
        assert ChClient(str(root / "v" / "vm-1" / "api.sock")).info().state == "Running"
        assert len(agent.provider.live_vmms(paths)) == 1
    finally:
        agent.close()


def test_restore_clone_next_to_the_original(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Issue 15 (MicroVMRestore): a clone gets new TAPs, MACs and runtime dir; the snapshot is never modified."""
    root, images = rig
    agent = _setup(root, images)
    try:
        (created,) = _ok(agent, _create(images))
        (snap,) = _ok(agent, _act("s", "MicroVMSnapshot", snapshot_name="s1"))
        snap_dir = Path(snap["snapshot_dir"])
        before = _digest(snap_dir)
        (res,) = _ok(agent, _act("r", "MicroVMRestore", "vm-2", snapshot_name="s1", source_vm_id="vm-1", start=False))
        assert res["status"] == "PAUSED" and res["macs"] == [stable_mac("vm-2", 0)]
        assert res["taps"] and set(res["taps"]).isdisjoint(created["taps"])
        info = ChClient(str(root / "v" / "vm-2" / "api.sock")).info()
        assert info.state == "Paused"
        net, disk = info.config["net"][0], info.config["disks"][0]
        assert (net["tap"], net["mac"]) == (res["taps"][0], stable_mac("vm-2", 0))
        assert disk["path"] == str(root / "v" / "vm-2" / "rootfs.img")
        assert info.config["serial"]["file"] == str(root / "v" / "vm-2" / "console.log")
        assert ChClient(str(root / "v" / "vm-1" / "api.sock")).info().state == "Running"  # the original runs on
        assert _owned_taps() == {created["taps"][0]: "nkudo:vm=vm-1", res["taps"][0]: "nkudo:vm=vm-2"}
        rec = agent.store.get_vm("vm-2")
        assert rec is not None and rec.name == "vm-2" and rec.spec["nics"][0]["mac"] == stable_mac("vm-2", 0)
        assert _digest(snap_dir) == before
        assert json.loads((snap_dir / "config.json").read_text())["net"][0]["tap"] == created["taps"][0]
        (resumed,) = _ok(agent, _act("go", "MicroVMResume", "vm-2"))
        assert resumed["status"] == "RUNNING"
    finally:
        agent.close()


def test_restore_refusals_create_nothing(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Issue 15 (MicroVMRestore validation): missing, foreign or escaping snapshots are refused naming the field."""
    root, images = rig
    agent = _setup(root, images)
    try:
        _ok(agent, _create(images), _act("s", "MicroVMSnapshot", snapshot_name="s1"))
        snaps = root / "n"
        (snaps / "vm-9" / "bare").mkdir(parents=True)  # a directory this agent did not write
        for name in ("config.json", "state.json", "memory-ranges"):
            shutil.copy(snaps / "vm-1" / "s1" / name, snaps / "vm-9" / "bare" / name)
        outside = root / "elsewhere"
        shutil.copytree(snaps / "vm-1", outside / "vm-1")
        (snaps / "evil").symlink_to(outside / "vm-1")
        cases = [
            ({"snapshot_name": "nope", "source_vm_id": "vm-1"}, "SNAPSHOT_NOT_FOUND"),
            ({"snapshot_name": "s1", "source_vm_id": "vm-7"}, "SNAPSHOT_NOT_FOUND"),
            ({"snapshot_name": "bare", "source_vm_id": "vm-9"}, "SNAPSHOT_INVALID"),
            ({"snapshot_name": "s1", "source_vm_id": "evil"}, "PATH_ESCAPE"),
        ]
        for i, (params, code) in enumerate(cases):
            (o,) = _run(agent, _act(f"r{i}", "MicroVMRestore", "vm-new", **params))
            assert o.error_code == code and "params.snapshot_name" in (o.error_message or ""), (params, o.error_message)
        assert agent.store.get_vm("vm-new") is None and not (root / "v" / "vm-new").exists()
        assert set(_owned_taps().values()) == {"nkudo:vm=vm-1"}
    finally:
        agent.close()


def test_failed_restore_rolls_back(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Issue 15 (MicroVMRestore rollback): a restore the VMM refuses leaves no record, VMM, TAP or directory."""
    root, images = rig
    agent = _setup(root, images)
    try:
        _ok(agent, _create(images), _act("s", "MicroVMSnapshot", snapshot_name="s1"))
        broken = root / "n" / "vm-1" / "s2"
        shutil.copytree(root / "n" / "vm-1" / "s1", broken)
        (broken / "memory-ranges").unlink()
        (o,) = _run(agent, _act("r", "MicroVMRestore", "vm-3", snapshot_name="s2", source_vm_id="vm-1"))
        assert not o.ok and "memory-ranges" in (o.error_message or ""), o.error_message
        assert agent.store.get_vm("vm-3") is None and not (root / "v" / "vm-3").exists()
        assert set(_owned_taps().values()) == {"nkudo:vm=vm-1"}
        assert agent.provider.live_vmms(agent.vms.paths("vm-3")) == []
        assert _requests(root, "vm.restore")[-1]["status"] == 500
    finally:
        agent.close()


# ------------------------------------------------------------------------------- SIGKILL at any point

def _argv(h: Host, plan: Path) -> list[str]:
    return [
        "ip", "netns", "exec", h.ns, EDGE, "--log-level", "error", "--state-dir", str(h.state), "apply", "--json",
        "--plan", str(plan), "--runtime-dir", str(h.vms), "--snapshot-dir", str(h.snaps), "--image-root",
        str(h.images), "--cloud-hypervisor-bin", str(h.ch), "--bridge", "br0",
    ]  # fmt: skip


@pytest.mark.slow
def test_sigkill_during_restore_then_rerun(host: Host) -> None:
    """Issue 15 (MicroVMRestore crash safety): a SIGKILL at any point of a restore plan and a rerun leave
    one restored VM per id, one VMM each, their own TAPs only, and no VMM restored twice."""
    h = host
    setup = [_act("c", "MicroVMCreate", "vm-a", name="vm-a", vcpus=1, memory_mib=128,
                  kernel_path=str(h.images / "vmlinux"), image_path=str(h.images / "base.img"),
                  nics=[{"bridge": "br0"}, {"bridge": "br0"}]),
             _act("s", "MicroVMSnapshot", "vm-a", snapshot_name="snap1"), _act("d", "MicroVMDelete", "vm-a")]  # fmt: skip
    rc, doc, err = h.apply(setup)
    assert rc == 0, (doc, err)
    plan = h.root / "restore.json"
    plan.write_text(json.dumps({"actions": [
        _act("r-a", "MicroVMRestore", "vm-a", snapshot_name="snap1"),
        _act("r-b", "MicroVMRestore", "vm-b", snapshot_name="snap1", source_vm_id="vm-a"),
    ]}))  # fmt: skip

    def reset() -> None:
        h.kill_vmms()
        for tap in h.taps():
            subprocess.run(["ip", "-n", h.ns, "link", "del", tap], check=False)
        for d in (h.state, h.vms):
            shutil.rmtree(d, ignore_errors=True)
        h.journal.unlink(missing_ok=True)

    h.set_sim_flags("--sim-delay", "vm.restore=0.3")  # a restore takes time: kills land inside it too
    reset()
    t0 = time.monotonic()
    r = subprocess.run(_argv(h, plan), capture_output=True, text=True, timeout=120)
    full = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    reset()
    rounds, landed = 10, 0
    for i in range(rounds):
        p = subprocess.Popen(_argv(h, plan), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.9 * full * (i + 0.5) / rounds)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            landed += 1
        p.wait()
        r = subprocess.run(_argv(h, plan), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (i, r.stdout, r.stderr)
        outs = {o["action_id"]: o for o in json.loads(r.stdout)["outcomes"]}
        assert {o["status"] for o in outs.values()} == {"SUCCEEDED"}, (i, outs)
        assert len(h.vmm_pids()) == 2, (i, h.vmm_pids())
        owners = Counter(t["ifalias"] for t in h.taps().values())
        assert owners == {"nkudo:vm=vm-a": 2, "nkudo:vm=vm-b": 2}, (i, owners)
        assert sorted(os.listdir(h.vms)) == ["vm-a", "vm-b"]
        per_vmm: dict[int, Counter[str]] = {}
        pid = 0
        for line in h.journal.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "start":
                pid = rec["pid"]
                per_vmm[pid] = Counter()
            elif rec.get("status") in (200, 204):
                per_vmm[pid][rec["endpoint"]] += 1
        assert all(c["vm.restore"] <= 1 for c in per_vmm.values()), (i, per_vmm)
        for vm in ("vm-a", "vm-b"):
            assert ChClient(str(h.vms / vm / "api.sock")).info().state == "Running", (i, vm)
        reset()
    assert landed >= rounds // 2, f"only {landed} kills landed mid-run"
    assert sorted(p.name for p in (h.snaps / "vm-a" / "snap1").iterdir() if not p.name.startswith(".")) == [
        "config.json", "memory-ranges", "rootfs.img", "state.json"]  # fmt: skip
