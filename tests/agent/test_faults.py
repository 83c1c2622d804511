"""Faults injected through the simulator end in a clear FAILED/TIMED_OUT result and leak nothing."""

from __future__ import annotations

import time

from nkudo.agent.state import StateStore
from nkudo.vmstate import VmStatus
from tests.agent.conftest import Host
from tests.agent.test_lifecycle import _act, _create


def _no_leak(h: Host) -> None:
    assert h.vmm_pids() == []


def test_vmm_refuses_to_start(host: Host) -> None:
    h = host
    h.set_sim_flags("--sim-refuse-start")
    rc, doc, _ = h.apply([_create(h)])
    o = doc["outcomes"][0]
    assert rc == 1 and o["status"] == "FAILED" and o["error_code"] == "VMM_START_FAILED"
    assert "vmm.log" in o["error_message"]
    _no_leak(h)
    # The operator can retry once the VMM works: the same action converges.
    h.set_sim_flags()
    rc, doc, _ = h.apply([{**_create(h), "action_id": "create-retry"}])
    assert rc == 0, doc
    assert len(h.vmm_pids()) == 1 and len(h.taps()) == 1


def test_vmm_crashes_after_boot_is_marked_crashed(host: Host) -> None:
    h = host
    h.set_sim_flags("--sim-crash-after-boot", "0.3")
    rc, doc, _ = h.apply([_create(h)])
    assert rc == 0, doc
    time.sleep(1.0)
    assert h.vmm_pids() == []
    rc, doc, _ = h.apply([_act("pause-1", "MicroVMPause")])
    o = doc["outcomes"][0]
    assert rc == 1 and o["error_code"] == "VM_NOT_RUNNING"
    s = StateStore(str(h.state))
    vm = s.get_vm("vm-1")
    assert vm is not None and vm.status == VmStatus.CRASHED and vm.process is None
    assert "VMM exited" in (vm.last_error or "")
    s.close()
    assert not (h.vms / "vm-1" / "api.sock").exists()  # stale socket removed
    # Start brings it back with a fresh VMM.
    h.set_sim_flags()
    rc, doc, _ = h.apply([_act("start-1", "MicroVMStart")])
    assert rc == 0 and doc["outcomes"][0]["result"]["status"] == "RUNNING"


def test_server_error_on_pause(host: Host) -> None:
    h = host
    h.set_sim_flags("--sim-fail", "vm.pause=500")
    assert h.apply([_create(h)])[0] == 0
    rc, doc, _ = h.apply([_act("pause-1", "MicroVMPause")])
    o = doc["outcomes"][0]
    assert rc == 1 and o["status"] == "FAILED" and o["error_code"].startswith("CH_")
    assert len(h.vmm_pids()) == 1  # the VM keeps running; nothing leaked or killed


def test_slow_boot_times_out_and_cleans_up(host: Host) -> None:
    h = host
    h.set_sim_flags("--sim-boot-delay", "5")
    a = {**_create(h), "timeout_seconds": 1.5}
    t0 = time.monotonic()
    rc, doc, _ = h.apply([a])
    assert time.monotonic() - t0 < 15
    o = doc["outcomes"][0]
    assert rc == 1 and o["status"] == "TIMED_OUT", o
    # Deleting the half-created VM leaves nothing behind.
    h.set_sim_flags()
    rc, doc, _ = h.apply([_act("delete-1", "MicroVMDelete")])
    assert rc == 0, doc
    _no_leak(h)
    assert h.taps() == {} and not (h.vms / "vm-1").exists()


def test_delete_of_unknown_vm_is_a_clean_noop(host: Host) -> None:
    rc, doc, _ = host.apply([_act("delete-x", "MicroVMDelete")])
    assert rc == 0 and doc["outcomes"][0]["result"]["existed"] is False
