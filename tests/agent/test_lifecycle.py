"""Full lifecycle through `nkudo-edge apply` against nkudo-ch-sim, real bridge and TAPs in a private netns."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from nkudo.chapi import ChClient
from tests.agent.conftest import Host

CREATE: dict[str, Any] = {
    "action_id": "create-1",
    "type": "MicroVMCreate",
    "params": {
        "vm_id": "vm-1",
        "name": "web",
        "vcpus": 2,
        "memory_mib": 256,
        "kernel_path": "",
        "cmdline": "console=ttyS0",
        "image_path": "",
        "disk_size_gib": 1,
        "nics": [{"bridge": "br0"}],
        "cloud_init": {"user_data": "#cloud-config\nhostname: web\n", "meta_data": "instance-id: vm-1\n"},
    },
}


def _create(h: Host, **over: Any) -> dict[str, Any]:
    a = json.loads(json.dumps(CREATE))
    a["params"]["kernel_path"] = str(h.images / "vmlinux")
    a["params"]["image_path"] = str(h.images / "base.img")
    a["params"].update(over)
    return a


def _act(aid: str, type_: str, **params: Any) -> dict[str, Any]:
    return {"action_id": aid, "type": type_, "params": {"vm_id": "vm-1", **params}}


def _vm_state(h: Host) -> str:
    return ChClient(str(h.vms / "vm-1" / "api.sock")).info().state


def test_full_lifecycle(host: Host) -> None:
    h = host
    rc, doc, err = h.apply([_create(h)])
    assert rc == 0, (doc, err)
    (out,) = doc["outcomes"]
    assert out["status"] == "SUCCEEDED" and out["result"]["status"] == "RUNNING"
    tap = out["result"]["taps"][0]
    mac = out["result"]["macs"][0]

    # Kernel state, read with iproute2: a persistent TAP, owner marker, on br0, admin up.
    taps = h.taps()
    assert list(taps) == [tap]
    lk = taps[tap]
    assert lk["ifalias"] == "nkudo:vm=vm-1"
    assert lk["master"] == "br0"
    assert "UP" in lk["flags"]
    assert lk["linkinfo"]["info_data"]["type"] == "tap"

    # The VMM got a VmConfig that boots: kernel, cmdline, disks (root clone + seed), the TAP, serial file.
    creates = h.requests("vm.create")
    assert len(creates) == 1 and creates[0]["status"] == 204 and creates[0]["schema_valid"] is True
    cfg = creates[0]["body"]
    assert (
        cfg["payload"]["kernel"] == str(h.images / "vmlinux") and cfg["payload"]["cmdline"] == "console=ttyS0"
    )
    assert cfg["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2} and cfg["memory"]["size"] == 256 * 2**20
    assert [d["path"] for d in cfg["disks"]] == [
        str(h.vms / "vm-1" / "rootfs.img"),
        str(h.vms / "vm-1" / "cloud-init.iso"),
    ]
    assert cfg["disks"][1]["readonly"] is True
    assert cfg["net"] == [{"tap": tap, "mac": mac, "id": "net0"}]
    assert _vm_state(h) == "Running"
    rt = h.vms / "vm-1"
    assert (rt / "rootfs.img").stat().st_size == 2**30
    assert (
        subprocess.run(
            ["blkid", "-o", "value", "-s", "LABEL", str(rt / "cloud-init.iso")],
            capture_output=True,
            text=True,
        ).stdout.strip()
        == "cidata"
    )
    assert oct(rt.stat().st_mode & 0o777) == "0o700"
    (vmm_pid,) = h.vmm_pids()

    # pause -> resume -> snapshot (pauses and resumes around it) -> stop -> start -> delete
    rc, doc, err = h.apply([_act("pause-1", "MicroVMPause")])
    assert rc == 0, doc
    assert _vm_state(h) == "Paused"
    rc, doc, _ = h.apply([_act("resume-1", "MicroVMResume")])
    assert rc == 0 and _vm_state(h) == "Running"
    rc, doc, _ = h.apply([_act("snap-1", "MicroVMSnapshot", snapshot_name="s1")])
    assert rc == 0, doc
    res = doc["outcomes"][0]["result"]
    snapdir = h.snaps / "vm-1" / "s1"
    assert res["snapshot_dir"] == str(snapdir) and res["resumed"] is True
    assert {f["name"] for f in res["files"]} >= {"config.json", "state.json", "memory-ranges"}
    for f in res["files"]:
        assert (snapdir / f["name"]).stat().st_size == f["size_bytes"]
    eps = [r["endpoint"] for r in h.requests()]
    i = eps.index("vm.snapshot")
    assert "vm.pause" in eps[:i] and "vm.resume" in eps[i:]
    assert _vm_state(h) == "Running"

    rc, doc, _ = h.apply([_act("stop-1", "MicroVMStop")])
    assert rc == 0, doc
    assert doc["outcomes"][0]["result"]["stopped_by"] == "guest"  # ACPI power button honoured
    assert h.vmm_pids() == []
    assert not os.path.exists(f"/proc/{vmm_pid}") or open(f"/proc/{vmm_pid}/stat").read().split()[2] == "Z"
    assert tap in h.taps()  # resources kept while stopped

    rc, doc, _ = h.apply([_act("start-1", "MicroVMStart")])
    assert rc == 0, doc
    assert doc["outcomes"][0]["result"]["status"] == "RUNNING"
    assert len(h.vmm_pids()) == 1 and _vm_state(h) == "Running"

    rc, doc, _ = h.apply([_act("delete-1", "MicroVMDelete")])
    assert rc == 0, doc
    assert h.vmm_pids() == [] and h.taps() == {}
    assert not rt.exists()
    assert snapdir.exists()  # snapshots are not part of the runtime directory
    assert all(r["schema_valid"] in (True, None) for r in h.requests())


def test_replayed_plan_does_nothing_twice(host: Host) -> None:
    h = host
    plan = [_create(h), _act("pause-1", "MicroVMPause"), _act("resume-1", "MicroVMResume")]
    rc, first, _ = h.apply(plan)
    assert rc == 0, first
    n_requests = len(h.requests())
    rc, again, _ = h.apply(plan)
    assert rc == 0
    assert all(o["replayed"] for o in again["outcomes"])
    assert [o["result"] for o in again["outcomes"]] == [o["result"] for o in first["outcomes"]]
    assert len(h.vmm_pids()) == 1 and len(h.taps()) == 1
    # Only reconcile's read-only vm.info reached the VMM on the replay.
    assert {r["endpoint"] for r in h.requests()[n_requests:]} <= {"vm.info"}


def test_create_twice_with_other_spec_is_refused(host: Host) -> None:
    h = host
    assert h.apply([_create(h)])[0] == 0
    rc, doc, _ = h.apply([{**_create(h, vcpus=4), "action_id": "create-2"}])
    assert rc == 1 and doc["outcomes"][0]["error_code"] == "VM_EXISTS"
    assert len(h.vmm_pids()) == 1


def test_paths_outside_image_roots_are_refused(host: Host) -> None:
    h = host
    rc, doc, _ = h.apply([_create(h, kernel_path="/etc/hostname")])
    assert rc == 1
    o = doc["outcomes"][0]
    assert o["error_code"] == "PATH_NOT_ALLOWED" and "params.kernel_path" in o["error_message"]
    assert h.vmm_pids() == [] and h.taps() == {} and not (h.vms / "vm-1").exists()


def test_command_execute_not_allowed(host: Host, tmp_path: Path) -> None:
    h = host
    marker = tmp_path / "ran"
    rc, doc, _ = h.apply(
        [
            {
                "action_id": "c1",
                "type": "CommandExecute",
                "params": {"command": "/usr/bin/touch", "args": [str(marker)]},
            }
        ]
    )
    assert rc == 1 and doc["outcomes"][0]["error_code"] == "COMMAND_NOT_ALLOWED"
    assert not marker.exists()
    rc, doc, _ = h.apply(
        [{"action_id": "c2", "type": "CommandExecute", "params": {"command": "/usr/bin/touch", "args": [str(marker)]}}],
        "--exec-allow", "/usr/bin/touch",
    )  # fmt: skip
    assert rc == 0 and marker.exists()
