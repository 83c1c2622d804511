"""A snapshot interrupted after the pause resumes the VM on re-drive, and never leaves a half-written directory."""

from __future__ import annotations

import json
from pathlib import Path

from nkudo.agent.plan import parse_plan
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
