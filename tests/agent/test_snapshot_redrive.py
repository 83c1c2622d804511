"""A snapshot interrupted after the pause resumes the VM on re-drive, and never leaves a half-written directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.plan import parse_plan
from nkudo.agent.vms import VMM_DONE_FILE
from nkudo.chapi import ChClient
from tests.agent.test_supervision import _agent, _create, rig  # noqa: F401 - fixture re-export


def test_snapshot_redrive_after_crash_mid_snapshot(rig: tuple[Path, Path]) -> None:  # noqa: F811
    root, images = rig
    agent = _agent(root, images)
    try:
        assert agent.executor.run_plan(_create(images))[0].ok
        _, (snap,) = parse_plan(
            {
                "actions": [
                    {
                        "action_id": "s1",
                        "type": "MicroVMSnapshot",
                        "params": {"vm_id": "vm-1", "snapshot_name": "s"},
                    }
                ]
            }
        )
        # The state a SIGKILL leaves after "intent recorded, VM paused, VMM half way through writing":
        parent = root / "n" / "vm-1"
        parent.mkdir(parents=True)
        (parent / ".intent-s").write_text(json.dumps({"was_running": True}))
        (parent / ".partial-s").mkdir()
        (parent / ".partial-s" / "state.json").write_text("{trunc")
        api = ChClient(str(root / "v" / "vm-1" / "api.sock"))
        api.pause()
        agent.store.begin_action(snap.action_id, snap.params_hash, snap.type, snap.vm_id, None)

        out = agent.executor.execute(snap)
        assert out.ok, out.error_message
        assert out.attempts == 2 and out.result["resumed"] is True
        assert api.info().state == "Running"  # resumed although the re-drive found it paused
        assert sorted(f["name"] for f in out.result["files"]) == [
            "config.json",
            "memory-ranges",
            "state.json",
        ]
        assert json.loads((parent / "s" / "state.json").read_text())  # complete, not the truncated one
        assert not (parent / ".partial-s").exists() and not (parent / ".intent-s").exists()

        # The same name again, by another action, is refused (not overwritten).
        _, (again,) = parse_plan(
            {
                "actions": [
                    {
                        "action_id": "s2",
                        "type": "MicroVMSnapshot",
                        "params": {"vm_id": "vm-1", "snapshot_name": "s"},
                    }
                ]
            }
        )
        o2 = agent.executor.execute(again)
        assert o2.error_code == "SNAPSHOT_EXISTS" and api.info().state == "Running"
    finally:
        agent.close()


def _interrupted_after_the_vmm_snapshot(agent: Any, root: Path, images: Path, *, marker: bool
                                       ) -> tuple[Any, Path, Path, ChClient]:
    """vm-1 created, then what a SIGKILL leaves once the VMM finished a snapshot: the intent recorded, the VM
    paused, the VMM's complete files in the staging directory (with the done marker when ``marker``)."""
    assert agent.executor.run_plan(_create(images))[0].ok
    _, (snap,) = parse_plan({"actions": [{"action_id": "s1", "type": "MicroVMSnapshot",
                                          "params": {"vm_id": "vm-1", "snapshot_name": "s"}}]})
    parent = root / "n" / "vm-1"
    parent.mkdir(parents=True)
    (parent / ".intent-s").write_text(json.dumps({"was_running": True}))
    staging = parent / ".partial-s"
    staging.mkdir()
    api = ChClient(str(root / "v" / "vm-1" / "api.sock"))
    api.pause()
    api.snapshot(f"file://{staging}")  # what the interrupted attempt's VMM completed
    if marker:
        (staging / VMM_DONE_FILE).write_bytes(b"")
    return snap, parent, staging, api


@pytest.mark.parametrize("marker", [True, False], ids=["killed-after-the-call", "killed-during-the-call"])
def test_snapshot_redrive_does_not_take_the_hypervisor_snapshot_twice(rig: tuple[Path, Path],  # noqa: F811
                                                                      marker: bool) -> None:
    """A SIGKILL after the VMM finished its snapshot but before the root disk copy was renamed into place
    (a window issue 15's disk copy widened; CI's crash-safety test caught two vm.snapshot calls on one VMM),
    or while the call itself was in flight (the VMM finishes it anyway): the re-drive keeps the VMM's complete
    files, copies the disk and finishes, without a second vm.snapshot."""
    root, images = rig
    agent = _agent(root, images, "--sim-journal", str(root / "journal.jsonl"))
    try:
        snap, parent, staging, api = _interrupted_after_the_vmm_snapshot(agent, root, images, marker=marker)
        (staging / "rootfs.img.partial").write_bytes(b"half a copy")
        agent.store.begin_action(snap.action_id, snap.params_hash, snap.type, snap.vm_id, None)

        out = agent.executor.execute(snap)
        assert out.ok, out.error_message
        journal = [json.loads(x) for x in (root / "journal.jsonl").read_text().splitlines() if x.strip()]
        snaps = [r for r in journal if r.get("kind") == "request" and r.get("endpoint") == "vm.snapshot"]
        assert len(snaps) == 1, snaps  # only the one the interrupted attempt made
        assert api.info().state == "Running"
        final = parent / "s"
        names = {p.name for p in final.iterdir()}
        assert {".nkudo-vm.json", "config.json", "memory-ranges", "state.json"} <= names, names
        assert not any(n.endswith(".partial") or n == VMM_DONE_FILE for n in names), names
        assert not staging.exists() and not (parent / ".intent-s").exists()
    finally:
        agent.close()


def test_snapshot_redrive_retakes_a_snapshot_when_the_vm_ran_in_between(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """The done marker is only trusted while the VM is still paused: a VM that runs again has moved on from
    those files, so the re-drive pauses it and takes a fresh snapshot (the disk copy must match the memory)."""
    root, images = rig
    agent = _agent(root, images, "--sim-journal", str(root / "journal.jsonl"))
    try:
        snap, _, _, api = _interrupted_after_the_vmm_snapshot(agent, root, images, marker=True)
        api.resume()  # someone ran the guest again before the re-drive
        agent.store.begin_action(snap.action_id, snap.params_hash, snap.type, snap.vm_id, None)

        out = agent.executor.execute(snap)
        assert out.ok, out.error_message
        journal = [json.loads(x) for x in (root / "journal.jsonl").read_text().splitlines() if x.strip()]
        assert len([r for r in journal if r.get("kind") == "request" and r.get("endpoint") == "vm.snapshot"]) == 2
        assert api.info().state == "Running"
    finally:
        agent.close()
