"""A VMM that dies while the agent runs is noticed through its pidfd and its VM marked crashed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nkudo.agent.plan import parse_plan
from nkudo.agent.runtime import Agent, AgentConfig
from nkudo.vmstate import VmStatus


def _wait(pred: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def rig(in_netns: str) -> Iterator[tuple[Path, Path]]:
    subprocess.run(["ip", "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", "br0", "up"], check=True)
    root = Path(f"/tmp/nks-{uuid.uuid4().hex[:8]}")
    (root / "images").mkdir(parents=True)
    (root / "images" / "vmlinux").write_bytes(b"k")
    yield root, root / "images"
    out = subprocess.run(
        ["pgrep", "-f", f"--api-socket path={root}/"], capture_output=True, text=True
    ).stdout.split()
    for pid in out:
        os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _agent(root: Path, images: Path, *flags: str) -> Agent:
    ch = root / f"ch-{uuid.uuid4().hex[:4]}"
    ch.write_text(
        f"#!{sys.executable}\nimport sys\nfrom nkudo.chsim.main import main\nsys.exit(main({list(flags)!r} + sys.argv[1:]))\n"
    )
    ch.chmod(0o755)
    return Agent(AgentConfig(state_dir=str(root / "s"), runtime_dir=str(root / "v"), snapshot_dir=str(root / "n"),
                             image_roots=(str(images),), cloud_hypervisor_bin=str(ch)))  # fmt: skip


def _create(images: Path, vm: str = "vm-1") -> list:  # type: ignore[type-arg]
    return parse_plan({"actions": [{"action_id": f"c-{vm}", "type": "MicroVMCreate", "params": {
        "vm_id": vm, "name": vm, "vcpus": 1, "memory_mib": 64, "kernel_path": str(images / "vmlinux"),
        "nics": [{"bridge": "br0"}]}}]})[1]  # fmt: skip


def test_crash_while_running_is_noticed(rig: tuple[Path, Path]) -> None:
    root, images = rig
    agent = _agent(root, images, "--sim-crash-after-boot", "0.3")
    try:
        (o,) = agent.executor.run_plan(_create(images))
        assert o.ok, o.error_message
        assert _wait(lambda: agent.store.get_vm("vm-1").status == VmStatus.CRASHED)  # type: ignore[union-attr]
        vm = agent.store.get_vm("vm-1")
        assert vm is not None and vm.process is None and "exited with code 1" in (vm.last_error or "")
    finally:
        agent.close()


def test_requested_stop_is_not_a_crash_and_guest_poweroff_is_a_stop(rig: tuple[Path, Path]) -> None:
    root, images = rig
    agent = _agent(root, images)
    try:
        assert agent.executor.run_plan(_create(images))[0].ok
        _, stop = parse_plan(
            {"actions": [{"action_id": "s", "type": "MicroVMStop", "params": {"vm_id": "vm-1"}}]}
        )
        assert agent.executor.run_plan(stop)[0].ok
        time.sleep(0.3)
        assert agent.store.get_vm("vm-1").status == VmStatus.STOPPED  # type: ignore[union-attr]
        _, start = parse_plan(
            {"actions": [{"action_id": "g", "type": "MicroVMStart", "params": {"vm_id": "vm-1"}}]}
        )
        assert agent.executor.run_plan(start)[0].ok
        vm = agent.store.get_vm("vm-1")
        assert vm is not None and vm.process is not None
        # The guest powers itself off (ACPI power button from outside the agent): a clean exit is a stop.
        from nkudo.chapi import ChClient

        ChClient(str(root / "v" / "vm-1" / "api.sock")).power_button()
        assert _wait(lambda: agent.store.get_vm("vm-1").status == VmStatus.STOPPED)  # type: ignore[union-attr]
    finally:
        agent.close()


def test_adopted_vmm_is_supervised_after_restart(rig: tuple[Path, Path]) -> None:
    root, images = rig
    first = _agent(root, images)
    assert first.executor.run_plan(_create(images))[0].ok
    pid = first.store.get_vm("vm-1").process["pid"]  # type: ignore[index,union-attr]
    first.close()  # the agent goes away; the VMM keeps running
    assert os.path.exists(f"/proc/{pid}")
    second = _agent(root, images)
    try:
        report = second.reconcile()
        assert report["adopted"] == ["vm-1"]
        os.kill(pid, signal.SIGKILL)
        assert _wait(lambda: second.store.get_vm("vm-1").status == VmStatus.CRASHED)  # type: ignore[union-attr]
    finally:
        second.close()


def test_reconcile_sweeps_only_our_orphaned_taps(rig: tuple[Path, Path]) -> None:
    from nkudo.net.hostnet import open_backend

    root, images = rig
    subprocess.run(["ip", "tuntap", "add", "foreign0", "mode", "tap"], check=True)
    with open_backend("auto") as net:
        orphan = net.create_tap("gone-vm", 0, bridge="br0").name  # carries the marker of a VM we do not know
    agent = _agent(root, images)
    try:
        assert agent.executor.run_plan(_create(images))[0].ok
        kept = agent.store.get_vm("vm-1").taps  # type: ignore[union-attr]
        report = agent.reconcile()
        assert report["taps_swept"] == [orphan]
        links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
        names = {lk["ifname"] for lk in json.loads(links)}
        assert orphan not in names and "foreign0" in names and set(kept) <= names
    finally:
        agent.close()
