"""The shared wire schemas: what the agent decodes is what the control plane validates."""

from __future__ import annotations

import msgspec
import pytest

from nkudo.wire import actions as wa
from nkudo.wire import codec
from nkudo.wire import messages as wm


def test_every_action_type_parses_minimal_params() -> None:
    minimal = {
        "MicroVMCreate": {"vm_id": "v1", "name": "v1", "vcpus": 1, "memory_mib": 128, "nics": [],
                          "firmware_path": "/fw/hypervisor-fw"},
        "MicroVMStart": {"vm_id": "v1"}, "MicroVMStop": {"vm_id": "v1", "force": True},
        "MicroVMDelete": {"vm_id": "v1"}, "MicroVMPause": {"vm_id": "v1"}, "MicroVMResume": {"vm_id": "v1"},
        "MicroVMSnapshot": {"vm_id": "v1", "snapshot_name": "s-1"},
        "MicroVMRestore": {"vm_id": "v1", "snapshot_name": "s-1"},
        "CommandExecute": {"command": "/usr/bin/uptime"},
    }
    assert set(minimal) == set(wa.ACTION_TYPES)
    for typ, params in minimal.items():
        parsed = wa.parse_params(typ, params)
        assert type(parsed).__name__ == typ
    ce = wa.parse_params("CommandExecute", minimal["CommandExecute"])
    assert isinstance(ce, wa.CommandExecute) and ce.args == [] and ce.timeout == 60 and ce.dir == "/"
    mc = wa.parse_params("MicroVMCreate", minimal["MicroVMCreate"])
    assert isinstance(mc, wa.MicroVMCreate) and mc.start is True


@pytest.mark.parametrize(("params", "field"), [
    ({"vm_id": "v", "name": "v", "vcpus": 1, "memory_mib": 128, "nics": [], "kernel_path": "/k",
      "cloud_init": {"user_data": "", "meta_data": "", "vendor": ""}}, "params.cloud_init.vendor"),
    ({"vm_id": "v", "name": "v", "vcpus": 1, "memory_mib": 10**9, "nics": [], "kernel_path": "/k"},
     "params.memory_mib"),
    ({"vm_id": "v", "name": "v", "vcpus": 1, "memory_mib": 128, "nics": [{"bridge": "a-very-long-bridge-name"}],
      "kernel_path": "/k"}, "params.nics[0].bridge"),
    ({"vm_id": "v", "name": "v", "vcpus": 1, "memory_mib": 128, "kernel_path": "/k"}, "params.nics"),
])
def test_bad_params_name_the_field(params: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(codec.WireError) as ei:
        wa.parse_params("MicroVMCreate", params)
    assert ei.value.field == field


def test_cross_field_rules() -> None:
    base = {"vm_id": "v", "name": "v", "vcpus": 1, "memory_mib": 128, "nics": []}
    for extra in ({}, {"kernel_path": "/k", "firmware_path": "/f"}, {"firmware_path": "/f", "initramfs_path": "/i"},
                  {"kernel_path": "/k", "disk_size_gib": 10}):
        with pytest.raises(codec.WireError):
            wa.parse_params("MicroVMCreate", {**base, **extra})


def test_messages_roundtrip_and_strictness() -> None:
    hb = wm.HeartbeatRequest(heartbeat_seq=3, vms=[wm.VMSummary(vm_id="a", state="RUNNING")])
    assert codec.decode(codec.encode(hb), wm.HeartbeatRequest) == hb
    with pytest.raises(codec.WireError) as ei:
        codec.decode(b'{"vms": [{"vm_id": "a", "state": "BOGUS"}]}', wm.HeartbeatRequest)
    assert ei.value.field == "vms[0].state"
    with pytest.raises(codec.WireError) as ei:
        codec.decode(b'{"lines": [], "execution_id": "x"}', wm.LogBatch)
    assert ei.value.field in ("execution_id", "lines")
    with pytest.raises(codec.WireError):
        codec.decode(b"\xff", wm.HeartbeatRequest)
    too_many = {"execution_id": "0" * 8 + "-0000-0000-0000-" + "0" * 12,
                "lines": [{"seq": i, "message": "x"} for i in range(wm.MAX_LOG_LINES + 1)]}
    with pytest.raises(codec.WireError) as ei:
        codec.decode(msgspec.json.encode(too_many), wm.LogBatch)
    assert ei.value.field == "lines"
