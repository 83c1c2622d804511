"""Issue 15 (MicroVMRestore): ``vm.restore`` in nkudo-ch-sim follows the real server's rules (reference §7),
with every request body validated against Cloud Hypervisor's OpenAPI file (``schema_valid`` in the journal)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from nkudo.chapi import ChClient, InvalidStateError, ServerError, VmNotCreatedError
from nkudo.chapi.errors import BadRequestError
from tests.chsim.simproc import VM_CONFIG, Sim

Spawn = Callable[..., Sim]


def _snapshot(spawn: Spawn, workdir: Path, config: dict[str, object] | None = None) -> Path:
    snap = workdir / "snap"
    snap.mkdir()
    c = ChClient(spawn(name="src.sock").socket)
    c.create(config or VM_CONFIG)
    c.boot()
    c.pause()
    c.snapshot(snap)
    return snap


def test_restore_refuses_a_vmm_that_already_has_a_vm(spawn: Spawn, workdir: Path) -> None:
    """Issue 15: restore only into a fresh VMM (created, running or paused VM: 500, the VM untouched)."""
    snap = _snapshot(spawn, workdir)
    for state in ("created", "running"):
        s = spawn(name=f"{state}.sock")
        c = ChClient(s.socket)
        c.create(VM_CONFIG)
        if state == "running":
            c.boot()
        with pytest.raises(InvalidStateError) as ei:
            c.restore(snap)
        assert ei.value.messages[-1] == "VM is already created"
        assert c.info().state == ("Running" if state == "running" else "Created")
        assert [r["schema_valid"] for r in s.journal() if r["endpoint"] == "vm.restore"] == [True]


@pytest.mark.parametrize("missing", ["config.json", "state.json", "memory-ranges"])
def test_restore_refuses_an_incomplete_snapshot(spawn: Spawn, workdir: Path, missing: str) -> None:
    """Issue 15: a snapshot directory without one of its three files is refused, and the VMM stays fresh."""
    snap = _snapshot(spawn, workdir)
    (snap / missing).unlink()
    s = spawn(name="dst.sock")
    c = ChClient(s.socket)
    with pytest.raises(ServerError) as ei:
        c.restore(snap)
    assert missing in ei.value.messages[-1]
    with pytest.raises(VmNotCreatedError):
        c.info()  # no half-restored VM
    assert [r["schema_valid"] for r in s.journal() if r["endpoint"] == "vm.restore"] == [True]


def test_restore_refuses_a_truncated_memory_file(spawn: Spawn, workdir: Path) -> None:
    """Issue 15: memory-ranges shorter than the VM's memory cannot be restored (CH fails to restore memory)."""
    snap = _snapshot(spawn, workdir)
    with open(snap / "memory-ranges", "r+b") as f:
        f.truncate(4096)
    c = ChClient(spawn(name="dst.sock").socket)
    with pytest.raises(ServerError) as ei:
        c.restore(snap)
    assert "memory-ranges holds 4096 bytes" in ei.value.messages[-1]


def test_restore_reopens_disks_and_the_serial_file_of_config_json(spawn: Spawn, workdir: Path) -> None:
    """Issue 15: the restored VM uses config.json's disks (a missing one fails) and console file."""
    disk = workdir / "disk.img"
    disk.write_bytes(b"d")
    console = workdir / "console.log"
    snap = _snapshot(spawn, workdir, {**VM_CONFIG, "disks": [{"path": str(disk), "id": "disk0"}],
                                      "serial": {"mode": "File", "file": str(workdir / "old.log")}})  # fmt: skip
    cfg = json.loads((snap / "config.json").read_text())
    cfg["serial"]["file"] = str(console)
    (snap / "config.json").write_text(json.dumps(cfg))
    disk.unlink()
    c = ChClient(spawn(name="dst.sock").socket)
    with pytest.raises(ServerError) as ei:
        c.restore(snap)
    assert f"Cannot open disk path {disk}" in ei.value.messages[-1]
    disk.write_bytes(b"d")
    c.restore(snap, resume=True)
    assert c.info().state == "Running"
    assert "restored from a snapshot" in console.read_text()


def test_restore_body_is_checked_against_the_openapi_file(spawn: Spawn, workdir: Path) -> None:
    """Issue 15: RestoreConfig requires source_url and knows memory_restore_mode's enum (400 otherwise)."""
    snap = _snapshot(spawn, workdir)
    s = spawn(name="dst.sock")
    c = ChClient(s.socket)
    for body in ({"prefault": False}, {"source_url": f"file://{snap}", "memory_restore_mode": "Lazy"}):
        with pytest.raises(BadRequestError):
            c.call("PUT", "vm.restore", body)
    assert [r["schema_valid"] for r in s.journal() if r["endpoint"] == "vm.restore"] == [False, False]
    c.restore(snap)
    assert c.info().state == "Paused"
