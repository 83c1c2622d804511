"""Issue 15: where Cloud Hypervisor is the provider, its ``vm.counters`` add the device counters it has."""

from __future__ import annotations

from typing import Any

from nkudo.agent.counters import VmCounterCollector, metric_families
from nkudo.agent.runtime import Agent, AgentConfig
from tests.agent.conftest import Host
from tests.conftest import entered_netns


def _create(h: Host) -> dict[str, Any]:
    return {"action_id": "c1", "type": "MicroVMCreate", "params": {
        "vm_id": "vm-1", "name": "web", "vcpus": 1, "memory_mib": 64, "kernel_path": str(h.images / "vmlinux"),
        "image_path": str(h.images / "base.img"), "nics": [{"bridge": "br0"}]}}  # fmt: skip


def test_cloud_hypervisor_device_counters_reach_the_metrics(host: Host) -> None:
    """The simulator answers ``vm.counters`` with the real server's shape (per disk and net device, including
    latency min/max/avg, which are not counters); the agent exports the monotonic ones per device."""
    h = host
    rc, doc, err = h.apply([_create(h)])
    assert rc == 0, (doc, err)
    cfg = AgentConfig(state_dir=str(h.state), runtime_dir=str(h.vms), snapshot_dir=str(h.snaps),
                      image_roots=(str(h.images),), cloud_hypervisor_bin=str(h.ch))
    with entered_netns(h.ns):
        agent = Agent(cfg)
        try:
            agent.reconcile()
            (vm,) = agent.store.list_vms()
            direct = agent.device_counters(vm)
            (item,) = VmCounterCollector(device_counters=agent.device_counters).collect([vm])
            families = {f.name: f for f in metric_families([item])}
            plain = VmCounterCollector().collect([vm])[0]
            asked: list[str] = []
            watched = VmCounterCollector(device_counters=lambda v: asked.append(v.vm_id) or agent.device_counters(v))
            beat = watched.heartbeat([vm])  # one API call per VM has no place on the heartbeat path
            watched.collect([vm])
        finally:
            agent.close()
    assert {"disk0", "_net1"} <= set(direct) or len(direct) >= 2, direct
    disk = next(d for d, kv in item.device.items() if "read_bytes" in kv)
    net = next(d for d, kv in item.device.items() if "rx_frames" in kv)
    assert "read_latency_avg" in direct[disk] and "read_latency_avg" not in item.device[disk]
    assert item.device[disk]["read_bytes"] >= direct[disk]["read_bytes"]  # a counter: later reads are not lower
    samples = {(s.labels["device"]): s.value for s in families["nkudo_vm_device_read_bytes"].samples}
    assert samples == {disk: item.device[disk]["read_bytes"]}
    tx = {s.labels["device"]: s.value for s in families["nkudo_vm_device_tx_frames"].samples}
    assert tx == {net: item.device[net]["tx_frames"]}
    assert [c.vm_id for c in beat] == ["vm-1"] and asked == ["vm-1"]  # asked by the scrape, not the heartbeat
    assert plain.device == {}  # without the reader (the QEMU provider) there are no device samples
    rc, doc, err = h.apply([{"action_id": "d1", "type": "MicroVMDelete", "params": {"vm_id": "vm-1"}}])
    assert rc == 0, (doc, err)
