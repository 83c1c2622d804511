"""Issue 10 item 9: oversized disks are refused before copying, and every failed create is rolled back.

Real failure conditions only: an ext4 loop filesystem (16 TiB file limit) and small tmpfs
mounts under the runtime directory, a missing bridge, a foreign interface holding the TAP
name, and the simulator's own fault flags for the VMM steps. After each failure nothing of
the VM may remain: no ``.partial``, no seed, no TAP, no VMM, no runtime directory, no record.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.disks import clone_image, write_atomic
from nkudo.agent.state import StateStore
from nkudo.net.hostnet import tap_name
from nkudo.vmstate import VmStatus
from tests.agent.conftest import Host
from tests.agent.test_lifecycle import _act, _create
from tests.conftest import skip_or_fail

VM = "vm-1"


def _record(h: Host) -> Any:
    s = StateStore(str(h.state))
    try:
        return s.get_vm(VM)
    finally:
        s.close()


def _nothing_left(h: Host) -> None:
    assert h.vmm_pids() == []
    assert h.taps() == {}
    assert not any(VM in str(lk.get("ifalias", "")) for lk in h.links().values())
    assert not (h.vms / VM).exists()
    assert [p for p in h.vms.rglob("*") if ".partial" in p.name or "seed" in p.name or "iso" in p.name] == []
    assert _record(h) is None


def _failed(doc: dict[str, Any]) -> dict[str, Any]:
    (o,) = doc["outcomes"]
    assert o["status"] in ("FAILED", "TIMED_OUT"), o
    assert o["error_code"] != "INTERNAL", o
    return dict(o)


def _mount(target: Path, *args: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        skip_or_fail(f"cannot mount a test filesystem here: {r.stderr.strip()}")


@pytest.fixture
def ext4_vms(host: Host, tmp_path: Path) -> Iterator[Host]:
    """The runtime directory on a 64 MiB ext4 loop filesystem (max file size 16 TiB with 4k blocks)."""
    if shutil.which("mkfs.ext4") is None:
        skip_or_fail("mkfs.ext4 is not installed")
    img = tmp_path / "vms.ext4"
    with open(img, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(img)], check=True)
    _mount(host.vms, "-t", "ext4", "-o", "loop", str(img))
    try:
        yield host
    finally:
        host.kill_vmms()
        subprocess.run(["umount", "-l", str(host.vms)], check=False)


@pytest.fixture
def tmpfs_vms(host: Host) -> Iterator[Host]:
    """The runtime directory on a 32 MiB tmpfs."""
    _mount(host.vms, "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs")
    try:
        yield host
    finally:
        host.kill_vmms()
        subprocess.run(["umount", "-l", str(host.vms)], check=False)


@pytest.mark.parametrize("gib", [20000, 65536])
def test_oversized_disk_is_refused_before_copying(ext4_vms: Host, gib: int) -> None:
    """Issue 10 item 9: disk_size_gib beyond the filesystem's file size limit ended FAILED INTERNAL
    "File too large", left a .partial copy and a VM stuck in CREATING."""
    h = ext4_vms
    rc, doc, _ = h.apply([_create(h, disk_size_gib=gib)])
    o = _failed(doc)
    assert rc == 1 and o["error_code"] == "DISK_TOO_LARGE", o
    assert "params.disk_size_gib" in o["error_message"]
    _nothing_left(h)


def test_nearly_full_filesystem_is_refused_then_rerun_succeeds(tmpfs_vms: Host) -> None:
    """Issue 10 item 9: a clone that cannot fit failed half-way (ENOSPC, INTERNAL, .partial left);
    now INSUFFICIENT_SPACE before copying, and once there is room the plan is not wedged."""
    h = tmpfs_vms
    with open(h.images / "big.img", "wb") as f:
        f.write(b"\x01" * (40 * 1024 * 1024))  # 40 MiB of real data: more than the tmpfs holds
    create = _create(h, image_path=str(h.images / "big.img"))
    rc, doc, _ = h.apply([create])
    o = _failed(doc)
    assert rc == 1 and o["error_code"] == "INSUFFICIENT_SPACE", o
    assert "params.image_path" in o["error_message"]
    _nothing_left(h)
    # The same plan again replays the recorded failure without touching the host ...
    rc, doc, _ = h.apply([create])
    assert rc == 1 and doc["outcomes"][0]["replayed"] is True
    _nothing_left(h)
    # ... and with room, a new create of the same VM succeeds (no VM_EXISTS, no stale leftovers).
    subprocess.run(["mount", "-o", "remount,size=256m", str(h.vms)], check=True)
    rc, doc, _ = h.apply([{**create, "action_id": "create-2"}])
    assert rc == 0, doc
    assert doc["outcomes"][0]["result"]["status"] == "RUNNING"
    assert len(h.vmm_pids()) == 1 and len(h.taps()) == 1


def test_seed_write_failure_is_rolled_back(tmpfs_vms: Host) -> None:
    """Issue 10 item 9: a failed cloud-init seed write left the TAP, the runtime dir and a CREATING record."""
    h = tmpfs_vms
    with open(h.vms / "filler", "wb") as f:  # fill the filesystem: the seed cannot be written
        try:
            while True:
                f.write(b"\x01" * 65536)
                f.flush()
        except OSError:
            pass
    a = _create(h)
    del a["params"]["image_path"], a["params"]["disk_size_gib"]
    rc, doc, _ = h.apply([a])
    o = _failed(doc)
    assert rc == 1 and o["error_code"] == "INSUFFICIENT_SPACE", o
    _nothing_left(h)
    assert sorted(p.name for p in h.vms.iterdir()) == ["filler"]


def test_tap_failure_on_second_nic_is_rolled_back(host: Host) -> None:
    """Issue 10 item 9: a TAP step failing after the first TAP existed left that TAP and the record."""
    h = host
    a = _create(h, nics=[{"bridge": "br0"}, {"bridge": "no-such-br"}])
    rc, doc, _ = h.apply([a])
    assert rc == 1
    _failed(doc)
    _nothing_left(h)


def test_foreign_interface_on_tap_name_is_left_alone_and_create_rolled_back(host: Host) -> None:
    """Issue 10 item 9: a TAP name held by a foreign device failed the create and left its record."""
    h = host
    name = tap_name(VM, 0)
    subprocess.run(["ip", "-n", h.ns, "link", "add", name, "type", "bridge"], check=True)
    rc, doc, _ = h.apply([_create(h)])
    assert rc == 1
    _failed(doc)
    assert name in h.links()  # never adopted nor deleted
    subprocess.run(["ip", "-n", h.ns, "link", "del", name], check=True)
    _nothing_left(h)


@pytest.mark.parametrize(
    ("flags", "timeout"),
    [
        (("--sim-refuse-start",), None),  # VMM spawn
        (("--sim-fail", "vm.create=500"), None),  # vm.create
        (("--sim-fail", "vm.boot=500"), None),  # vm.boot, VMM already running
        (("--sim-boot-delay", "5"), 1.5),  # deadline while booting
    ],
    ids=["spawn", "vm.create", "vm.boot", "boot-timeout"],
)
def test_vmm_step_failure_is_rolled_back(host: Host, flags: tuple[str, ...], timeout: float | None) -> None:
    """Issue 10 item 9: a create failing at a VMM step left the clone, seed, TAP, runtime dir and a
    CREATING record (6 such records after one run); a rerun after the fault is gone must work."""
    h = host
    h.set_sim_flags(*flags)
    a = _create(h)
    if timeout is not None:
        a["timeout_seconds"] = timeout
    rc, doc, _ = h.apply([a])
    assert rc == 1
    _failed(doc)
    _nothing_left(h)
    h.set_sim_flags()
    rc, doc, _ = h.apply([{**a, "action_id": "create-again", "timeout_seconds": 60}])
    assert rc == 0, doc
    assert len(h.vmm_pids()) == 1 and len(h.taps()) == 1


def test_incomplete_rollback_leaves_an_error_record_that_delete_clears(ext4_vms: Host) -> None:
    """Issue 10 item 9: when a rollback step cannot finish, the record stays (ERROR, saying what is
    left) rather than vanishing with resources still on the host; MicroVMDelete then removes all."""
    h = ext4_vms
    stuck = h.vms / VM / "stuck"
    stuck.parent.mkdir(mode=0o700)
    stuck.write_bytes(b"x")
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # rmtree of the runtime dir fails (EPERM)
    try:
        h.set_sim_flags("--sim-refuse-start")
        rc, doc, _ = h.apply([_create(h)])
        assert rc == 1 and _failed(doc)["error_code"] == "VMM_START_FAILED"
        rec = _record(h)
        assert rec is not None and rec.status == VmStatus.ERROR
        assert "runtime directory" in (rec.last_error or "")
        assert h.taps() == {} and h.vmm_pids() == []
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    rc, doc, _ = h.apply([_act("delete-1", "MicroVMDelete")])
    assert rc == 0, doc
    _nothing_left(h)


def test_failed_clone_and_atomic_write_leave_no_temp_files(tmp_path: Path) -> None:
    """Issue 10 item 9: a clone or atomic write failing part-way (ENOSPC) left its ``.partial`` /
    ``.tmp-<pid>`` file behind, even where no rollback runs (a VM that already existed)."""
    src = tmp_path / "base.img"
    src.write_bytes(b"\x01" * (4 * 1024 * 1024))
    small = tmp_path / "small"
    _mount(small, "-t", "tmpfs", "-o", "size=1m", "tmpfs")
    try:
        with pytest.raises(OSError) as ei:
            clone_image(str(src), str(small / "rootfs.img"))
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as ei:
            write_atomic(str(small / "seed.iso"), b"\x01" * (4 * 1024 * 1024))
        assert ei.value.errno == errno.ENOSPC
        assert sorted(p.name for p in small.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
