"""Issue 15 (per-VM counters from the kernel): a real VMM-like process and a real TAP with real traffic.

The "VMM" is a child process that burns CPU and writes 1 MiB with fsync, recorded in a real state store
with the identity the providers record; the TAP carries the VM's owner marker in a private netns and
gets frames written into its queue. Values are compared with what the test caused and with psutil,
which reads /proc independently.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nkudo.agent.counters import VmCounterCollector
from nkudo.agent.metrics import AgentMetrics
from nkudo.agent.provider import process_record
from nkudo.agent.state import StateStore
from nkudo.net import rtnl
from nkudo.net.hostnet import open_backend
from nkudo.proc.identity import read_identity
from nkudo.vmstate import VmStatus
from nkudo.wire import codec
from nkudo.wire import messages as wm
from tests.agent.test_metrics import run_promtool

FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"\x00" * 46  # 60 bytes
CHILD = """
import os, sys, time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
with open(sys.argv[1], "wb") as f:
    f.write(b"x" * 2**20)
    f.flush()
    os.fsync(f.fileno())
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "disk.img")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(str(tmp_path / "state"))
    yield s
    s.close()


@pytest.fixture
def tap_fd(in_netns: str) -> Iterator[int]:
    """vm-a's TAP (made by HostNet, so it carries the marker) with its queue open and 3 frames sent in."""
    with open_backend("twin") as net:
        name = net.create_tap("vm-a", 0).name
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, rtnl.TUNSETIFF, rtnl.pack_tun_ifreq(name, rtnl.IFF_TAP | rtnl.IFF_NO_PI))
        for _ in range(3):
            os.write(fd, FRAME)
        yield fd
    finally:
        os.close(fd)


def _record(store: StateStore, pid: int, vm_id: str = "vm-a", name: str = "web-1") -> None:
    store.insert_vm(vm_id, name, {"vcpus": 1, "memory_mib": 128}, "/nonexistent", VmStatus.RUNNING)
    store.update_vm(vm_id, process=process_record(read_identity(pid)))


def test_counters_of_a_live_vmm_and_tap(store: StateStore, vmm: subprocess.Popen[str], tap_fd: int) -> None:
    """Issue 15: TAP traffic, CPU seconds, block writes and RSS of the pid-verified VMM, from the kernel."""
    _record(store, vmm.pid)
    col = VmCounterCollector("auto")
    try:
        [c] = col.collect(store.list_vms())
        assert c.vm_id == "vm-a" and c.name == "web-1"
        [(tap, t)] = c.taps.items()
        assert tap.startswith("nk") and (t.rx_packets, t.rx_bytes) == (3, 180)
        assert c.vmm is not None
        ps = psutil.Process(vmm.pid)
        cpu = ps.cpu_times()
        assert c.vmm.cpu_seconds >= 0.25
        assert abs(c.vmm.cpu_seconds - (cpu.user + cpu.system)) < 0.05
        assert c.vmm.write_bytes >= 2**20 and c.vmm.write_bytes == ps.io_counters().write_bytes
        assert abs(c.vmm.rss_bytes - ps.memory_info().rss) < 2**20
        # Counters only grow, and the TAP's rx is what the VM sent.
        os.write(tap_fd, FRAME)
        [c2] = col.collect(store.list_vms())
        assert c2.taps[tap].rx_packets == 4 and c2.vmm is not None and c2.vmm.cpu_seconds >= c.vmm.cpu_seconds
        hb = col.heartbeat(store.list_vms())
        assert len(hb) == 1 and hb[0].vm_id == "vm-a"
        assert (hb[0].tx_packets, hb[0].tx_bytes) == (4, 240)  # the TAP's rx, in the VM's direction
        assert hb[0].write_bytes == c2.vmm.write_bytes and hb[0].cpu_ms == round(c2.vmm.cpu_seconds * 1000)
        assert codec.decode(codec.encode(wm.HeartbeatRequest(vm_counters=hb)), type=wm.HeartbeatRequest).vm_counters == hb
    finally:
        col.close()


def test_gone_sources_report_nothing_not_zeros(store: StateStore, vmm: subprocess.Popen[str], tap_fd: int) -> None:
    """Issue 15: a VM whose TAP is deleted or whose VMM exited reports nothing for it (no fake reset to 0)."""
    _record(store, vmm.pid)
    col = VmCounterCollector("twin")
    try:
        [c] = col.collect(store.list_vms())
        assert c.taps and c.vmm is not None
        with open_backend("twin") as net:
            net.delete_taps([*c.taps], vm_id="vm-a")
        [c] = col.collect(store.list_vms())
        assert c.taps == {} and c.vmm is not None
        hb = col.heartbeat(store.list_vms())
        assert hb[0].rx_bytes is None and hb[0].tx_packets is None and hb[0].cpu_ms is not None
        vmm.send_signal(signal.SIGKILL)
        vmm.wait()  # reaped: the kept /proc files now fail with ESRCH
        [c] = col.collect(store.list_vms())
        assert c.vmm is None and c.compact() is None
        assert col.heartbeat(store.list_vms()) == []
    finally:
        col.close()


def test_a_reused_pid_is_not_counted(store: StateStore, vmm: subprocess.Popen[str]) -> None:
    """Issue 15: the pid is verified against the record (start time, exe) before its /proc files are read."""
    rec = process_record(read_identity(vmm.pid))
    store.insert_vm("vm-a", "web-1", {}, "/nonexistent", VmStatus.RUNNING)
    col = VmCounterCollector("twin")
    try:
        for bad in ({**rec, "start_time": rec["start_time"] + 1}, {**rec, "exe": "/usr/bin/false"},
                    {**rec, "boot_id": "another-boot"}, {"pid": "x"}):
            store.update_vm("vm-a", process=bad)  # type: ignore[arg-type]
            [c] = col.collect(store.list_vms())
            assert c.vmm is None, bad
        store.update_vm("vm-a", process=rec)
        [c] = col.collect(store.list_vms())
        assert c.vmm is not None
    finally:
        col.close()


def test_prometheus_exposition_is_promtool_clean(
    store: StateStore, vmm: subprocess.Popen[str], tap_fd: int, tmp_path: Path
) -> None:
    """Issue 15: per-VM counters exported as counters with vm_id/vm_name labels; promtool finds nothing."""
    _record(store, vmm.pid)
    store.insert_vm("vm-b", "idle", {}, "/nonexistent", VmStatus.STOPPED)  # no TAP, no VMM: no series
    col = VmCounterCollector("auto")
    try:
        text = AgentMetrics(store, [str(tmp_path)], "test", counters=col).render().decode()
    finally:
        col.close()
    run_promtool(text)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("nkudo_vm_network_receive_bytes", "nkudo_vm_network_transmit_bytes",
                 "nkudo_vm_network_transmit_packets", "nkudo_vm_network_receive_drops", "nkudo_vm_cpu_seconds",
                 "nkudo_vm_block_read_bytes", "nkudo_vm_block_write_bytes"):
        assert fams[name].type == "counter", name
        assert {s.labels["vm_id"] for s in fams[name].samples} == {"vm-a"}, name
    assert fams["nkudo_vm_memory_rss_bytes"].type == "gauge"
    [sent] = fams["nkudo_vm_network_transmit_packets"].samples
    assert sent.value == 3 and sent.labels["vm_name"] == "web-1" and sent.labels["device"].startswith("nk")
    [cpu] = fams["nkudo_vm_cpu_seconds"].samples
    assert cpu.name == "nkudo_vm_cpu_seconds_total" and cpu.value >= 0.25
