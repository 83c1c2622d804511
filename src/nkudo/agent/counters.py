"""Per-VM counters from the kernel, whatever the hypervisor: TAP traffic, VMM CPU time, block I/O, RSS.

Why from the kernel: both providers (Cloud Hypervisor and QEMU) get the same numbers with no API call
into the VMM, so a wedged VMM cannot stall a scrape. Where they come from:

* network: each owned TAP's ``IFLA_STATS64``, all TAPs in **one** netlink dump per collection (the native
  netlink module, else its twin; :meth:`nkudo.net.hostnet.HostNet.tap_stats`). A TAP's *transmit* is what
  the host hands the guest, so the VM's ``receive`` is the TAP's ``tx`` and vice versa (as libvirt does).
* CPU seconds (``utime + stime`` of the whole thread group), RSS: ``/proc/PID/stat``; block I/O bytes
  (``read_bytes``/``write_bytes``, what reached the storage layer): ``/proc/PID/io``.

The PID is the VMM recorded in the state store, verified once per process: a pidfd holds the pid while
its start time, boot and executable are compared with the record, and only then are ``/proc/PID/stat``
and ``/proc/PID/io`` opened and kept open. Those descriptors belong to that process: once it is reaped a
read fails with ESRCH, never shows the pid's next owner. So each later collection is two ``pread`` per
VM, no thread per VM, and everything is collected when asked (a Prometheus scrape, a heartbeat).

Counters only ever come from a live source: a VM whose TAP or VMM is gone reports nothing for it rather
than zeros, which a rate() would read as a counter reset.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nkudo import log
from nkudo.agent.state import VmRecord
from nkudo.errors import NkudoError
from nkudo.net.hostnet import HostNet, open_backend
from nkudo.net.link import LinkCounters
from nkudo.proc import pidfd_sys
from nkudo.proc.identity import ProcessIdentity, boot_id
from nkudo.vmstate import VmStatus
from nkudo.wire import messages as wm

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_DELETED = " (deleted)"
_READ = 4096


@dataclass(slots=True)
class VmmUsage:
    """What the kernel accounts to one VMM process: CPU seconds, block bytes read/written, RSS bytes."""

    cpu_seconds: float
    read_bytes: int
    write_bytes: int
    rss_bytes: int


@dataclass(slots=True)
class VmCounters:
    """One VM's counters at collection time; ``taps`` has only the TAPs that exist, ``vmm`` None without a VMM."""

    vm_id: str
    name: str
    taps: dict[str, LinkCounters] = field(default_factory=dict)
    vmm: VmmUsage | None = None
    #: The hypervisor's own counters by device id (Cloud Hypervisor's ``vm.counters``); empty elsewhere.
    device: dict[str, dict[str, int]] = field(default_factory=dict)

    def compact(self) -> wm.VmCounters | None:
        """The heartbeat's form: network summed over the VM's TAPs, in the VM's direction; None if empty."""
        if not self.taps and self.vmm is None:
            return None
        out = wm.VmCounters(vm_id=self.vm_id)
        if self.taps:
            c = self.taps.values()
            out.rx_bytes, out.rx_packets = sum(t.tx_bytes for t in c), sum(t.tx_packets for t in c)
            out.rx_drops = sum(t.tx_dropped for t in c)
            out.tx_bytes, out.tx_packets = sum(t.rx_bytes for t in c), sum(t.rx_packets for t in c)
            out.tx_drops = sum(t.rx_dropped for t in c)
        if (u := self.vmm) is not None:
            out.cpu_ms, out.rss_bytes = round(u.cpu_seconds * 1000), u.rss_bytes
            out.read_bytes, out.write_bytes = u.read_bytes, u.write_bytes
        return out


class _ProcFiles:
    """``/proc/PID/stat`` and ``/proc/PID/io`` of one verified VMM, kept open across collections."""

    __slots__ = ("io", "stat")

    def __init__(self, stat: int, io: int) -> None:
        self.stat = stat
        self.io = io

    def close(self) -> None:
        for fd in (self.stat, self.io):
            try:
                os.close(fd)
            except OSError:
                pass

    def read(self) -> tuple[int, VmmUsage]:
        """(start time, usage) now; ``OSError`` (ESRCH) once the process has been reaped."""
        start, cpu, rss = _parse_stat(os.pread(self.stat, _READ, 0))
        rd, wr = _parse_io(os.pread(self.io, _READ, 0))
        return start, VmmUsage(cpu_seconds=cpu, read_bytes=rd, write_bytes=wr, rss_bytes=rss)


def _parse_stat(raw: bytes) -> tuple[int, float, int]:
    """(start time in ticks, CPU seconds, RSS bytes) of ``/proc/PID/stat``; the comm may hold ') '."""
    f = raw[raw.rindex(b")") + 2 :].split(None, 22)  # only as far as rss: this runs per VM per scrape
    # Fields after the comm, 0-based: state=0 ... utime=11 stime=12 ... starttime=19 ... rss=21.
    return int(f[19]), (int(f[11]) + int(f[12])) / _CLK_TCK, int(f[21]) * _PAGE


def _parse_io(raw: bytes) -> tuple[int, int]:
    """(read_bytes, write_bytes) of ``/proc/PID/io``."""
    f = raw.split(None, 12)
    if f[8:9] == [b"read_bytes:"] and f[10:11] == [b"write_bytes:"]:
        return int(f[9]), int(f[11])
    f = raw.split()
    d = dict(zip(f[::2], f[1::2], strict=False))
    return int(d[b"read_bytes:"]), int(d[b"write_bytes:"])


def open_vmm(record: object) -> _ProcFiles | None:
    """Open the stat and io files of the recorded VMM if it is still that process, else None.

    A pidfd pins the pid while the start time, boot and executable are checked against the record; the
    ``/proc/PID`` files are opened under it, so they are the recorded process's or the check fails.
    """
    try:
        ident = ProcessIdentity.from_dict(record)  # type: ignore[arg-type]
    except (NkudoError, TypeError):
        return None
    if ident.boot_id != boot_id():
        return None
    try:
        pidfd = pidfd_sys.pidfd_open(ident.pid)
    except OSError:
        return None
    try:
        dfd = os.open(f"/proc/{ident.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            files = _ProcFiles(os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd), -1)
            try:
                files.io = os.open("io", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
                exe = os.readlink("exe", dir_fd=dfd)
                start = files.read()[0]
            except BaseException:
                files.close()
                raise
        finally:
            os.close(dfd)
    except OSError:
        return None
    finally:
        alive = not _exited(pidfd)
        os.close(pidfd)
    if not alive or start != ident.start_time or exe not in (ident.exe, ident.exe + _DELETED):
        files.close()
        return None
    return files


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


class VmCounterCollector:
    """Collects :class:`VmCounters` for the VMs of the state store; thread-safe, one instance per agent.

    Holds one netlink socket (opened on first use, in the agent's network namespace) and the open
    ``/proc`` files of the VMMs it has verified; the files of a VMM not seen in a collection are closed.
    """

    def __init__(
        self,
        backend: str = "auto",
        device_counters: Callable[[VmRecord], dict[str, dict[str, int]]] | None = None,
    ) -> None:
        self.backend = backend
        #: Reads the hypervisor's per-device counters of a VM with a live VMM (``Agent.device_counters``).
        self._device = device_counters
        self._lock = threading.Lock()
        self._net: HostNet | None = None
        self._procs: dict[tuple[int, int], _ProcFiles] = {}
        self._log = log.get_logger("counters")

    def close(self) -> None:
        with self._lock:
            if self._net is not None:
                self._net.close()
                self._net = None
            for files in self._procs.values():
                files.close()
            self._procs.clear()

    def collect(self, vms: Iterable[VmRecord], *, device: bool = True) -> list[VmCounters]:
        """Counters of every VM in ``vms`` that is not deleted (an empty :class:`VmCounters` if none exist).

        ``device=False`` skips the hypervisor's device counters (one API call per VM): the heartbeat's compact
        form does not carry them, and a VMM that does not answer must not delay a heartbeat.
        """
        with self._lock:
            taps = self._tap_stats()
            out: list[VmCounters] = []
            seen: set[tuple[int, int]] = set()
            for vm in vms:
                if vm.status is VmStatus.DELETED:
                    continue
                c = VmCounters(vm.vm_id, vm.name, taps.get(vm.vm_id, {}))
                c.vmm = self._vmm(vm.process, seen)
                if device and c.vmm is not None and self._device is not None and vm.status in _BOOTED:
                    c.device = self._device_counters(vm)
                out.append(c)
            for key in [k for k in self._procs if k not in seen]:
                self._procs.pop(key).close()
            return out

    def _device_counters(self, vm: VmRecord) -> dict[str, dict[str, int]]:
        assert self._device is not None
        try:
            raw = self._device(vm)
        except NkudoError as exc:  # a VMM that does not answer costs its device counters, not the scrape
            self._log.warning("counters: hypervisor counters unavailable", vm_id=vm.vm_id, error=exc.code)
            return {}
        return {dev: {k: v for k, v in kv.items() if k in _DEVICE_COUNTERS and type(v) is int and v >= 0}
                for dev, kv in raw.items() if isinstance(dev, str) and isinstance(kv, dict)}

    def _tap_stats(self) -> dict[str, dict[str, LinkCounters]]:
        try:
            if self._net is None:
                self._net = open_backend(self.backend)
            return self._net.tap_stats()
        except NkudoError as exc:  # no counters beat no scrape: say why once per collection
            self._log.warning("counters: cannot dump TAP statistics", error=str(exc))
            return {}

    def _vmm(self, record: object, seen: set[tuple[int, int]]) -> VmmUsage | None:
        if not isinstance(record, dict):
            return None
        pid, start = record.get("pid"), record.get("start_time")
        if type(pid) is not int or type(start) is not int:  # a corrupt record: ProcessIdentity would refuse it
            return None
        k = (pid, start)
        files = self._procs.get(k)
        if files is None:
            files = open_vmm(record)
            if files is None:
                return None
            self._procs[k] = files
        try:
            _start, usage = files.read()
        except (OSError, ValueError, IndexError, KeyError):
            self._procs.pop(k).close()
            return None
        seen.add(k)
        return usage

    def heartbeat(self, vms: Iterable[VmRecord]) -> list[wm.VmCounters]:
        """The heartbeat's compact counters (never raises: a heartbeat is sent without them instead)."""
        try:
            items = self.collect(vms, device=False)
        except Exception as exc:  # counters are an extra; the heartbeat itself must go out
            self._log.warning("counters: collection failed", error=repr(exc))
            return []
        return [c for c in (x.compact() for x in items) if c is not None]


#: (family name, help, LinkCounters field giving the VM's direction), in exposition order.
_NET_FAMILIES: Sequence[tuple[str, str, str]] = (
    ("nkudo_vm_network_receive_bytes_total", "Bytes the VM received on its TAP", "tx_bytes"),
    ("nkudo_vm_network_transmit_bytes_total", "Bytes the VM sent on its TAP", "rx_bytes"),
    ("nkudo_vm_network_receive_packets_total", "Packets the VM received on its TAP", "tx_packets"),
    ("nkudo_vm_network_transmit_packets_total", "Packets the VM sent on its TAP", "rx_packets"),
    ("nkudo_vm_network_receive_drops_total", "Packets for the VM dropped on its TAP", "tx_dropped"),
    ("nkudo_vm_network_transmit_drops_total", "Packets from the VM dropped on its TAP", "rx_dropped"),
    ("nkudo_vm_network_receive_errors_total", "Receive errors of the VM's TAP", "tx_errors"),
    ("nkudo_vm_network_transmit_errors_total", "Transmit errors of the VM's TAP", "rx_errors"),
)


#: Cloud Hypervisor's per-device counters that are monotonic (its latency min/max/avg are not: not exported).
_DEVICE_COUNTERS: dict[str, str] = {
    "read_bytes": "Bytes read by the VM's block device (hypervisor counter)",
    "write_bytes": "Bytes written by the VM's block device (hypervisor counter)",
    "read_ops": "Read operations of the VM's block device (hypervisor counter)",
    "write_ops": "Write operations of the VM's block device (hypervisor counter)",
    "rx_bytes": "Bytes received by the VM's network device (hypervisor counter)",
    "rx_frames": "Frames received by the VM's network device (hypervisor counter)",
    "tx_bytes": "Bytes sent by the VM's network device (hypervisor counter)",
    "tx_frames": "Frames sent by the VM's network device (hypervisor counter)",
}
_BOOTED = frozenset({VmStatus.RUNNING, VmStatus.PAUSED})


def metric_families(items: Sequence[VmCounters]) -> Iterator[Metric]:
    """The Prometheus families of the counters (every family present, samples only for live sources)."""
    labels = ["vm_id", "vm_name", "device"]
    for name, doc, attr in _NET_FAMILIES:
        fam = CounterMetricFamily(name, doc, labels=labels)
        for c in items:
            for dev, t in sorted(c.taps.items()):
                fam.add_metric([c.vm_id, c.name, dev], getattr(t, attr))
        yield fam
    cpu = CounterMetricFamily("nkudo_vm_cpu_seconds_total", "CPU seconds used by the VM's VMM process",
                              labels=["vm_id", "vm_name"])
    rd = CounterMetricFamily("nkudo_vm_block_read_bytes_total", "Bytes the VM's VMM read from storage",
                             labels=["vm_id", "vm_name"])
    wr = CounterMetricFamily("nkudo_vm_block_write_bytes_total", "Bytes the VM's VMM wrote to storage",
                             labels=["vm_id", "vm_name"])
    rss = GaugeMetricFamily("nkudo_vm_memory_rss_bytes", "Resident memory of the VM's VMM process in bytes",
                            labels=["vm_id", "vm_name"])
    for c in items:
        if c.vmm is not None:
            lv = [c.vm_id, c.name]
            cpu.add_metric(lv, c.vmm.cpu_seconds)
            rd.add_metric(lv, c.vmm.read_bytes)
            wr.add_metric(lv, c.vmm.write_bytes)
            rss.add_metric(lv, c.vmm.rss_bytes)
    yield from (cpu, rd, wr, rss)
    for key, doc in _DEVICE_COUNTERS.items():
        fam = CounterMetricFamily(f"nkudo_vm_device_{key}_total", doc, labels=labels)
        for c in items:
            for dev, kv in sorted(c.device.items()):
                if key in kv:
                    fam.add_metric([c.vm_id, c.name, dev], kv[key])
        yield fam
