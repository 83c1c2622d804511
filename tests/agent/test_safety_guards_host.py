"""Safety checks of the edge agent on a real host (namespace, bridge, TAPs, simulator VMMs), each found
by a mutation sweep: the one-line bug named in a test's docstring passed every other test.

Validate before acting, never undo what a failed action did not make, re-check host paths at launch,
own the TAPs, and never let a stale record stop or mark another VM's VMM. The host-free half of the
sweep is in ``test_safety_guards.py``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.provider import ProcessRecord
from nkudo.agent.runtime import Agent
from nkudo.agent.state import StateStore
from nkudo.vmstate import VmStatus
from tests.agent.conftest import Host
from tests.agent.test_lifecycle import _create
from tests.agent.test_restore import _act as _restore_act
from tests.agent.test_restore import _create as _restore_create
from tests.agent.test_restore import _ok as _restore_ok
from tests.agent.test_restore import _run as _restore_run
from tests.agent.test_restore import _setup as _restore_setup
from tests.agent.test_safety_guards import _gone_or_zombie
from tests.agent.test_supervision import _agent as _sup_agent
from tests.agent.test_supervision import _create as _sup_create
from tests.agent.test_supervision import _wait, rig  # noqa: F401 - fixture re-export

# --------------------------------------------------------------------------- VM lifecycle (real host)


def test_failed_re_create_of_an_existing_vm_does_not_roll_it_back(host: Host) -> None:
    """Catches ``if not rec.create_pending:`` -> ``if False:`` in ``VmService.create``: only a create that
    made the VM may undo it; a redelivered create of a finished VM that fails (its VMM will not start)
    must leave the VM, its disk and its TAP alone rather than delete them as a rollback."""
    h = host
    rc, doc, err = h.apply([_create(h, start=False)])
    assert rc == 0, (doc, err)
    rootfs = [p for p in (h.vms / "vm-1").iterdir() if p.suffix in (".img", ".raw")]
    assert rootfs, list((h.vms / "vm-1").iterdir())
    taps = set(h.taps())
    h.kill_vmms()
    h.set_sim_flags("--sim-refuse-start")
    rc, doc, _ = h.apply([{**_create(h, start=False), "action_id": "create-again"}])
    assert rc == 1 and doc["outcomes"][0]["error_code"] == "VMM_START_FAILED", doc
    store = StateStore(str(h.state))
    try:
        assert store.get_vm("vm-1") is not None
    finally:
        store.close()
    assert all(p.exists() for p in rootfs)
    assert set(h.taps()) == taps and taps


def _two_vms_with_a_stale_record(root: Path, images: Path) -> tuple[Agent, ProcessRecord]:
    """vm-1 and vm-2 running under one agent; vm-1's record then names vm-2's pid with another start time,
    as a stale record does once its VMM died unnoticed and the kernel gave the pid to vm-2's VMM."""
    agent = _sup_agent(root, images)
    for vm in ("vm-1", "vm-2"):
        assert agent.executor.run_plan(_sup_create(images, vm))[0].ok
    two = agent.store.get_vm("vm-2")
    assert two is not None and two.process
    one = agent.store.get_vm("vm-1")
    assert one is not None and one.process
    stale = ProcessRecord(**{**two.process, "start_time": two.process["start_time"] - 1})
    stale["marker"] = one.process["marker"]
    agent.store.update_vm("vm-1", process=stale)
    return agent, two.process


def test_stopping_a_vm_with_a_stale_record_never_ends_another_vms_vmm(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Catches dropping ``h.identity == ident`` in ``VmmProcessProvider._handle``: the handle cached for the
    pid is vm-2's VMM, and stopping vm-1 through its stale record would kill vm-2's guest."""
    root, images = rig
    agent, other = _two_vms_with_a_stale_record(root, images)
    try:
        _, (out,) = agent.run_plan(
            [{"action_id": "stop-1", "type": "MicroVMStop", "params": {"vm_id": "vm-1", "force": True}}]
        )
        assert out.ok, out.to_dict()
        assert not _gone_or_zombie(other["pid"], 0), "vm-2's VMM was ended"
        assert agent.store.get_vm("vm-2").status == VmStatus.RUNNING  # type: ignore[union-attr]
    finally:
        agent.close()


def test_a_vmm_exit_is_recorded_on_its_own_vm_not_on_a_stale_record(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Catches dropping the start-time comparison in ``Agent._vmm_exited``: when vm-2's VMM dies, the
    stale record of vm-1 (same pid, other start time, listed first) must not be the one marked crashed."""
    root, images = rig
    agent, other = _two_vms_with_a_stale_record(root, images)
    try:
        before = agent.store.get_vm("vm-1")
        os.kill(other["pid"], signal.SIGKILL)
        assert _wait(lambda: agent.store.get_vm("vm-2").status == VmStatus.CRASHED)  # type: ignore[union-attr]
        after = agent.store.get_vm("vm-1")
        assert after is not None and before is not None
        assert (after.status, after.process) == (before.status, before.process)
    finally:
        agent.close()


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"kernel_path": None, "cmdline": None, "firmware_path": "/etc/hostname"}, "params.firmware_path"),
        ({"initramfs_path": "/etc/hostname"}, "params.initramfs_path"),
        ({"image_path": "/etc/hostname"}, "params.image_path"),
        ({"disks": [{"path": "/etc/hostname", "readonly": True}]}, "params.disks[0].path"),
    ],
    ids=["firmware", "initramfs", "image", "disk"],
)
def test_every_host_path_is_checked_before_anything_is_created(
    host: Host, over: dict[str, Any], field: str
) -> None:
    """Catches skipping any one line of ``VmService.check_host_paths``: a firmware or initramfs outside the
    image roots would reach the VMM (nothing later re-checks them), and an image or disk would only be
    refused after the VM record and its TAPs were made (and rolled back): validate before acting."""
    h = host
    rc, doc, _ = h.apply([_create(h, **over)])
    (o,) = doc["outcomes"]
    assert rc == 1 and o["error_code"] == "PATH_NOT_ALLOWED", o
    assert o["error_message"].startswith(f"{field} '/etc/hostname' is outside"), o
    assert not [m for m in (x["message"] for x in o["logs"]) if "record created" in m or "rollback" in m], o
    assert h.requests() == [] and h.vmm_pids() == [] and h.taps() == {} and not (h.vms / "vm-1").exists()


def test_disk_paths_are_checked_again_when_the_vmm_is_started(host: Host) -> None:
    """Catches ``P.within_roots(d.path, ...)`` -> ``d.path`` in ``VmService._launch_spec``: a disk that was
    a symlink inside the image roots at create time and now points elsewhere must not reach the VMM."""
    h = host
    real = h.images / "data.img"
    real.write_bytes(b"data")
    link = h.images / "disk.img"
    link.symlink_to(real)
    rc, doc, err = h.apply([_create(h, disks=[{"path": str(link)}])])
    assert rc == 0, (doc, err)
    rc, doc, err = h.apply([{"action_id": "stop-1", "type": "MicroVMStop", "params": {"vm_id": "vm-1"}}])
    assert rc == 0 and h.vmm_pids() == [], (doc, err)
    link.unlink()
    link.symlink_to("/etc/hostname")
    rc, doc, _ = h.apply([{"action_id": "start-1", "type": "MicroVMStart", "params": {"vm_id": "vm-1"}}])
    (o,) = doc["outcomes"]
    assert rc == 1 and o["error_code"] == "PATH_NOT_ALLOWED", o
    assert h.vmm_pids() == []


def test_taps_belong_to_the_agents_user(host: Host) -> None:
    """Catches ``owner_uid=os.geteuid()`` -> ``None`` in ``HostNetwork.ensure_taps``: a persistent TAP without
    an owner can be attached by any local user while no VMM holds it."""
    h = host
    rc, doc, err = h.apply([_create(h, start=False)])
    assert rc == 0, (doc, err)
    taps = h.taps()
    assert taps
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert {n: lk["linkinfo"]["info_data"].get("user") for n, lk in taps.items()} == {n: me for n in taps}


def test_a_snapshot_copied_under_another_vm_is_refused(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Catches dropping ``meta.vm_id != src`` in ``RestoreService._snapshot``: a snapshot directory of vm-1
    copied under vm-9's directory (its record still says vm-1) is not vm-9's snapshot and is not restored."""
    root, images = rig
    agent = _restore_setup(root, images)
    try:
        _restore_ok(agent, _restore_create(images), _restore_act("s", "MicroVMSnapshot", snapshot_name="s1"))
        snaps = root / "n"
        shutil.copytree(snaps / "vm-1" / "s1", snaps / "vm-9" / "s1")
        (o,) = _restore_run(
            agent, _restore_act("r", "MicroVMRestore", "vm-new", snapshot_name="s1", source_vm_id="vm-9")
        )
        assert (
            o.error_code == "SNAPSHOT_INVALID"
            and o.error_message
            and "params.snapshot_name" in o.error_message
        ), o
        assert agent.store.get_vm("vm-new") is None and not (root / "v" / "vm-new").exists()
    finally:
        agent.close()


def test_a_vms_runtime_directory_that_is_a_symlink_out_is_refused(host: Host, tmp_path: Path) -> None:
    """Catches ``P.safe_join(runtime_dir, vm_id)`` -> ``os.path.join`` in ``VmService.paths``: a planted
    ``<runtime-dir>/<vm id>`` symlink would make the agent clone disks, write the seed and bind the API
    socket wherever it points."""
    h = host
    outside = tmp_path / "outside"
    outside.mkdir()
    h.vms.mkdir(parents=True, exist_ok=True)
    (h.vms / "vm-1").symlink_to(outside)
    rc, doc, _ = h.apply([_create(h)])
    (o,) = doc["outcomes"]
    assert rc == 1 and o["error_code"] == "PATH_ESCAPE", o
    assert list(outside.iterdir()) == [] and h.vmm_pids() == [] and h.taps() == {}


def test_snapshot_directory_symlinked_out_is_refused(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Catches ``P.safe_join(snapshot_dir, vm_id, name)`` -> ``os.path.join`` in ``VmService.snapshot``: a
    planted ``<snapshot-dir>/<vm id>`` symlink would have the VMM write the guest's memory wherever it points."""
    root, images = rig
    agent = _restore_setup(root, images)
    outside = root / "outside"
    outside.mkdir()
    try:
        _restore_ok(agent, _restore_create(images))
        (root / "n").mkdir(exist_ok=True)
        (root / "n" / "vm-1").symlink_to(outside)
        (o,) = _restore_run(agent, _restore_act("s", "MicroVMSnapshot", snapshot_name="s1"))
        assert o.error_code == "PATH_ESCAPE", (o.error_code, o.error_message)
        assert list(outside.iterdir()) == []
        assert agent.store.get_vm("vm-1").status == VmStatus.RUNNING  # type: ignore[union-attr]
    finally:
        agent.close()


def test_snapshot_directories_are_private(rig: tuple[Path, Path]) -> None:  # noqa: F811
    """Catches ``mode=0o700`` -> ``0o755`` for a VM's snapshot directory (and its staging directory, which
    becomes the snapshot): a guest's memory image must not be readable by other users, whatever the mode
    of the snapshot root the operator made."""
    root, images = rig
    agent = _restore_setup(root, images)
    try:
        (root / "n").chmod(0o755)
        _restore_ok(agent, _restore_create(images), _restore_act("s", "MicroVMSnapshot", snapshot_name="s1"))
        for d in (root / "n" / "vm-1", root / "n" / "vm-1" / "s1"):
            assert oct(d.stat().st_mode & 0o777) == "0o700", d
    finally:
        agent.close()
