"""The simulated VMM: Cloud Hypervisor's API semantics without a hypervisor.

Why this shape: the real VMM keeps ``vm_config: Option`` and ``vm: Option``
separately, and that, more than the ``VmState`` enum, decides what every call
answers (``vm.shutdown`` drops the VM but keeps the config, so ``vm.info``
says ``Created`` afterwards; a boot that fails after the VM was built leaves
it in place, so a retry says "already created"). :class:`Vmm` keeps the same
two fields and answers with the status codes and error chains the real
server sends (status mapping of CH HEAD: 404 for "not created"/"missing
config"/unknown device, 400 for config validation, 409 for duplicate ids,
500 for everything else, never 405).

Everything here is synchronous: the server calls :meth:`Vmm.handle` for one
request at a time, and a slow call (boot delay, snapshot delay) blocks the
others, as in CH.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = "53.0.0"
BUILD_VERSION = "v53.0-246-gae44c2971"
E_API = "Error from API"
DEFAULT_MEMORY = 512 << 20

# endpoint -> (HTTP method, body kind): "none" (body-less action), "body" (JSON required), "get".
ROUTES: dict[str, tuple[str, str]] = {
    "vmm.ping": ("GET", "get"),
    "vmm.shutdown": ("PUT", "none"),
    "vm.info": ("GET", "get"),
    "vm.counters": ("GET", "get"),
    "vm.create": ("PUT", "body"),
    "vm.boot": ("PUT", "none"),
    "vm.delete": ("PUT", "none"),
    "vm.shutdown": ("PUT", "none"),
    "vm.reboot": ("PUT", "none"),
    "vm.pause": ("PUT", "none"),
    "vm.resume": ("PUT", "none"),
    "vm.power-button": ("PUT", "none"),
    "vm.nmi": ("PUT", "none"),
    "vm.resize": ("PUT", "body"),
    "vm.resize-disk": ("PUT", "body"),
    "vm.resize-zone": ("PUT", "body"),
    "vm.add-device": ("PUT", "body"),
    "vm.add-user-device": ("PUT", "body"),
    "vm.add-disk": ("PUT", "body"),
    "vm.add-fs": ("PUT", "body"),
    "vm.add-generic-vhost-user": ("PUT", "body"),
    "vm.add-pmem": ("PUT", "body"),
    "vm.add-net": ("PUT", "body"),
    "vm.add-vsock": ("PUT", "body"),
    "vm.add-vdpa": ("PUT", "body"),
    "vm.remove-device": ("PUT", "body"),
    "vm.snapshot": ("PUT", "body"),
    "vm.restore": ("PUT", "body"),
    "vm.receive-migration": ("PUT", "body"),
    "vm.send-migration": ("PUT", "body"),
}

# add-* endpoint -> (config list key, auto-id prefix, ApiError display)
ADD_ENDPOINTS: dict[str, tuple[str, str, str]] = {
    "vm.add-net": ("net", "_net", "The network device could not be added to the VM"),
    "vm.add-disk": ("disks", "_disk", "The disk could not be added to the VM"),
    "vm.add-fs": ("fs", "_fs", "The fs could not be added to the VM"),
    "vm.add-pmem": ("pmem", "_pmem", "The pmem device could not be added to the VM"),
    "vm.add-vsock": ("vsock", "_vsock", "The vsock device could not be added to the VM"),
    "vm.add-vdpa": ("vdpa", "_vdpa", "The vDPA device could not be added to the VM"),
    "vm.add-device": ("devices", "_vfio", "The device could not be added to the VM"),
    "vm.add-user-device": ("user_devices", "_vfio_user", "The user device could not be added to the VM"),
    "vm.add-generic-vhost-user": (
        "generic_vhost_user", "_generic_vhost_user", "The generic vhost-user device could not be added to the VM",
    ),
}
DEVICE_LISTS = ("disks", "net", "fs", "pmem", "devices", "user_devices", "vdpa", "generic_vhost_user")

# VmState::valid_transition
_VALID = {
    "Created": {"Running", "Paused", "BreakPoint"},
    "Running": {"Paused", "Shutdown", "BreakPoint"},
    "Shutdown": {"Running"},
    "Paused": {"Running", "Shutdown"},
    "BreakPoint": {"Created", "Running"},
}


class ApiFailure(Exception):
    """A non-2xx answer: ``status`` plus the error chain (a JSON list on the wire)."""

    def __init__(self, status: int, chain: list[str] | None) -> None:
        super().__init__(status, chain)
        self.status = status
        self.chain = chain


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-able; None means no body
    exit_after: bool = False


@dataclass
class SimOptions:
    """Latency and fault injection (``--sim-*`` flags / ``NKUDO_CH_SIM_*``)."""

    boot_delay: float = 0.0
    latency: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)
    fail: dict[str, tuple[str, int]] = field(default_factory=dict)  # endpoint -> (action, remaining; -1=forever)
    crash_after_boot: float | None = None
    power_off_delay: float = 0.2
    ignore_power_button: bool = False
    no_shutdown: bool = False
    check_payload_files: bool = True


@dataclass
class Vm:
    state: str
    booted_at: float
    next_slot: int = 3


class Vmm:
    """State and request handling of one simulated VMM."""

    def __init__(self, opts: SimOptions, *, emit: Callable[[str, str, dict[str, Any] | None], None],
                 log: Callable[[str, str], None], serial_path: str | None = None) -> None:
        self.opts = opts
        self.config: dict[str, Any] | None = None
        self.vm: Vm | None = None
        self.emit = emit
        self.log = log
        self.serial_path = serial_path
        self.id_counter = 0
        self.poweroff_at: float | None = None
        self.crash_at: float | None = None
        self.exit_requested: int | None = None  # exit status once the loop should stop

    # -- timers (driven by the server loop) ------------------------------------------------

    def next_deadline(self) -> float | None:
        times = [t for t in (self.poweroff_at, self.crash_at) if t is not None]
        return min(times) if times else None

    def tick(self, now: float) -> None:
        if self.crash_at is not None and now >= self.crash_at:
            self.log("error", "nkudo-ch-sim: simulated VMM crash (--sim-crash-after-boot)")
            os._exit(1)  # abrupt, like a panic: no socket cleanup
        if self.poweroff_at is not None and now >= self.poweroff_at and self.vm is not None:
            if self.vm.state != "Running":
                return  # an ACPI event is handled once the vCPUs run again
            self.poweroff_at = None
            self.log("info", "guest powered off (ACPI S5)")
            self.emit("vm", "shutdown", None)
            self.vm = None
            self.crash_at = None
            if not self.opts.no_shutdown:
                self.exit_requested = 0

    # -- dispatch ------------------------------------------------------------------------

    def handle(self, endpoint: str, body: Any, fds: int) -> Reply:
        if endpoint in ADD_ENDPOINTS:
            return self._add(endpoint, body, fds)
        handler: Callable[[Any, int], Reply] = getattr(self, "do_" + endpoint.replace(".", "_").replace("-", "_"))
        return handler(body, fds)

    # -- vmm.* ---------------------------------------------------------------------------

    def do_vmm_ping(self, body: Any, fds: int) -> Reply:
        return Reply(200, {"build_version": BUILD_VERSION, "version": VERSION, "pid": os.getpid(),
                           "features": ["kvm", "nkudo-ch-sim"]})

    def do_vmm_shutdown(self, body: Any, fds: int) -> Reply:
        self._delete()
        return Reply(200, None, exit_after=True)

    # -- vm lifecycle ----------------------------------------------------------------------

    def do_vm_create(self, body: Any, fds: int) -> Reply:
        if self.config is not None:
            raise ApiFailure(500, [E_API, "The VM could not be created", "VM is already created"])
        cfg = dict(body)
        for net in cfg.get("net") or []:
            net.pop("fds", None)  # fds in JSON are ignored (reset) by CH
        self.config = cfg
        self.emit("vm", "created", None)
        return Reply(204)

    def do_vm_boot(self, body: Any, fds: int) -> Reply:
        return self.boot()

    def boot(self) -> Reply:
        what = "The VM could not boot"
        if self.config is None:
            raise ApiFailure(404, [E_API, what, "VM config is missing"])
        if self.vm is not None:
            raise ApiFailure(500, [E_API, what, "VM is already created"])
        self.emit("vm", "booting", None)
        payload = self.config.get("payload") or {}
        if not any(payload.get(k) for k in ("kernel", "firmware", "igvm")):
            raise ApiFailure(500, [E_API, what, "Error validating configuration", "No kernel or firmware specified"])
        self._fill_defaults(self.config)
        self._assign_ids(self.config)
        if self.opts.boot_delay > 0:
            time.sleep(self.opts.boot_delay)
        # Past this point the real VMM has built the Vm: a failure leaves it in place.
        if self.opts.check_payload_files:
            for key, err in (("kernel", "Cannot open the kernel image"), ("firmware", "Error manipulating firmware file"),
                             ("initramfs", "Cannot open the initramfs image")):
                p = payload.get(key)
                if p and not os.path.exists(p):
                    self.vm = Vm("Created", time.monotonic())
                    raise ApiFailure(500, [E_API, what, f"{err}: No such file or directory (os error 2)"])
        self._start_vm("Running")
        self.emit("vm", "booted", None)
        return Reply(204)

    def _start_vm(self, state: str, how: str = "booted") -> None:
        self.vm = Vm(state, time.monotonic())
        if self.opts.crash_after_boot is not None:
            self.crash_at = time.monotonic() + self.opts.crash_after_boot
        if self.serial_path:
            try:
                with open(self.serial_path, "a", encoding="utf-8") as f:
                    f.write(f"nkudo-ch-sim: simulated guest {how} (no real kernel runs)\n")
            except OSError as exc:
                self.log("warn", f"cannot write serial file {self.serial_path}: {exc}")

    def do_vm_info(self, body: Any, fds: int) -> Reply:
        if self.config is None:
            raise ApiFailure(404, [E_API, "The VM info is not available", "VM is not created"])
        state = self.vm.state if self.vm is not None else "Created"
        mem = int((self.config.get("memory") or {}).get("size") or DEFAULT_MEMORY)
        tree = {}
        if self.vm is not None:
            for key in DEVICE_LISTS:
                for dev in self.config.get(key) or []:
                    if dev.get("id"):
                        tree[dev["id"]] = {"id": dev["id"], "resources": [], "children": [], "pci_bdf": None}
        return Reply(200, {"config": self.config, "state": state, "memory_actual_size": mem, "device_tree": tree})

    def do_vm_counters(self, body: Any, fds: int) -> Reply:
        if self.vm is None or self.config is None or self.vm.state not in ("Running", "Paused"):
            raise ApiFailure(500, [E_API, "The VM is not booted"])
        up = max(0.0, time.monotonic() - self.vm.booted_at)
        out: dict[str, dict[str, int]] = {}
        for d in self.config.get("disks") or []:
            n = int(up * 100)
            out[d["id"]] = {"read_bytes": n * 4096, "write_bytes": n * 512, "read_ops": n, "write_ops": n // 8,
                            "read_latency_min": 10, "read_latency_max": 900, "read_latency_avg": 60,
                            "write_latency_min": 12, "write_latency_max": 1200, "write_latency_avg": 80}
        for d in self.config.get("net") or []:
            n = int(up * 10)
            out[d["id"]] = {"rx_bytes": n * 1500, "rx_frames": n, "tx_bytes": n * 900, "tx_frames": n}
        return Reply(200, out)

    def _transition(self, what: str, new: str) -> None:
        if self.vm is None:
            raise ApiFailure(500, [E_API, what, "VM is not running"])
        cur = self.vm.state
        if new not in _VALID[cur]:
            raise ApiFailure(500, [E_API, what, f"invalid VM state transition: {cur} to {new}"])

    def do_vm_pause(self, body: Any, fds: int) -> Reply:
        self._transition("The VM could not be paused", "Paused")
        assert self.vm is not None
        self.emit("vm", "pausing", None)
        self.vm.state = "Paused"
        self.emit("vm", "paused", None)
        return Reply(204)

    def do_vm_resume(self, body: Any, fds: int) -> Reply:
        self._transition("The VM could not resume", "Running")
        assert self.vm is not None
        self.emit("vm", "resuming", None)
        self.vm.state = "Running"
        self.emit("vm", "resumed", None)
        return Reply(204)

    def do_vm_shutdown(self, body: Any, fds: int) -> Reply:
        self._transition("The VM could not shutdown", "Shutdown")
        self.vm = None  # the Vm is dropped; the config stays (vm.info -> Created)
        self.poweroff_at = self.crash_at = None
        self.emit("vm", "shutdown", None)
        return Reply(204)

    def do_vm_reboot(self, body: Any, fds: int) -> Reply:
        if self.vm is None:
            raise ApiFailure(404, [E_API, "The VM could not reboot", "VM is not created"])
        self.emit("vm", "rebooting", None)
        if self.opts.boot_delay > 0:
            time.sleep(self.opts.boot_delay)
        self.poweroff_at = None
        self._start_vm("Running")
        self.emit("vm", "rebooted", None)
        return Reply(204)

    def do_vm_power_button(self, body: Any, fds: int) -> Reply:
        if self.vm is None:
            raise ApiFailure(500, [E_API, "Error triggering power button", "VM is not running"])
        if not self.opts.ignore_power_button and self.poweroff_at is None:
            self.poweroff_at = time.monotonic() + self.opts.power_off_delay
        return Reply(204)

    def do_vm_nmi(self, body: Any, fds: int) -> Reply:
        if self.vm is None:
            raise ApiFailure(500, [E_API, "Error triggering NMI", "VM is not running"])
        return Reply(204)

    def do_vm_delete(self, body: Any, fds: int) -> Reply:
        self._delete()
        return Reply(204)

    def _delete(self) -> None:
        if self.vm is not None:
            self.vm = None
            self.emit("vm", "shutdown", None)
        if self.config is not None:
            self.config = None
            self.emit("vm", "deleted", None)
        self.poweroff_at = self.crash_at = None

    # -- resize ----------------------------------------------------------------------------

    def do_vm_resize(self, body: Any, fds: int) -> Reply:
        what = "The VM could not be resized"
        if self.config is None:
            raise ApiFailure(404, [E_API, what, "VM is not created"])
        cpus = self.config.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
        if body.get("desired_vcpus") is not None:
            if body["desired_vcpus"] > cpus.get("max_vcpus", 1) or body["desired_vcpus"] < 1:
                raise ApiFailure(500, [E_API, what, "Error from CPU manager", "Desired vCPUs out of range"])
            cpus["boot_vcpus"] = body["desired_vcpus"]
        if body.get("desired_ram") is not None:
            self.config.setdefault("memory", {})["size"] = body["desired_ram"]
        if body.get("desired_balloon") is not None:
            self.config.setdefault("balloon", {})["size"] = body["desired_balloon"]
        return Reply(204)

    def do_vm_resize_disk(self, body: Any, fds: int) -> Reply:
        if self.config is None or self.vm is None:
            raise ApiFailure(404, [E_API, "The disk could not be resized", "VM is not created"])
        if not any(d.get("id") == body["id"] for d in self.config.get("disks") or []):
            raise ApiFailure(500, [E_API, "The disk could not be resized", f"Unknown device id {body['id']}"])
        return Reply(204)

    def do_vm_resize_zone(self, body: Any, fds: int) -> Reply:
        if self.config is None:
            raise ApiFailure(404, [E_API, "The memory zone could not be resized", "VM is not created"])
        zones = (self.config.get("memory") or {}).get("zones") or []
        for z in zones:
            if z.get("id") == body["id"]:
                z["size"] = body["desired_ram"]
                return Reply(204)
        raise ApiFailure(500, [E_API, "The memory zone could not be resized", "Failed resizing a memory zone"])

    # -- devices ---------------------------------------------------------------------------

    def _all_ids(self, cfg: dict[str, Any]) -> set[str]:
        ids = {d.get("id") for k in DEVICE_LISTS for d in cfg.get(k) or [] if d.get("id")}
        vs = cfg.get("vsock")
        if isinstance(vs, dict) and vs.get("id"):
            ids.add(vs["id"])
        return {str(i) for i in ids}

    def _new_id(self, prefix: str, cfg: dict[str, Any]) -> str:
        taken = self._all_ids(cfg)
        while True:
            cand = f"{prefix}{self.id_counter}"
            self.id_counter += 1
            if cand not in taken:
                return cand

    def _assign_ids(self, cfg: dict[str, Any]) -> None:
        for key, prefix in (("disks", "_disk"), ("net", "_net"), ("fs", "_fs"), ("pmem", "_pmem"),
                            ("vdpa", "_vdpa"), ("devices", "_vfio"), ("user_devices", "_vfio_user")):
            for dev in cfg.get(key) or []:
                if not dev.get("id"):
                    dev["id"] = self._new_id(prefix, cfg)
        vs = cfg.get("vsock")
        if isinstance(vs, dict) and not vs.get("id"):
            vs["id"] = self._new_id("_vsock", cfg)

    @staticmethod
    def _fill_defaults(cfg: dict[str, Any]) -> None:
        cfg.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
        cfg.setdefault("memory", {"size": DEFAULT_MEMORY})
        for net in cfg.get("net") or []:
            net.setdefault("num_queues", 2)
            net.setdefault("queue_size", 256)

    def _add(self, endpoint: str, body: Any, fds: int) -> Reply:
        key, prefix, what = ADD_ENDPOINTS[endpoint]
        if self.config is None:
            raise ApiFailure(404, [E_API, what, "VM is not created"])
        dev = dict(body)
        dev_id = dev.get("id")
        if isinstance(dev_id, str) and dev_id.startswith("__"):
            raise ApiFailure(400, [E_API, what, "Error validating configuration",
                                   f"Identifier {dev_id} is reserved"])
        if dev_id and dev_id in self._all_ids(self.config):
            raise ApiFailure(409, [E_API, what, "Error validating configuration",
                                   f"Identifier {dev_id} is not unique"])
        if endpoint == "vm.add-net":
            dev.pop("fds", None)
            queues = int(dev.get("num_queues", 2))
            if fds and fds * 2 != queues:
                raise ApiFailure(400, [E_API, what, "Error validating configuration",
                                       f"Number of queues ({queues}) does not match the number of fds "
                                       f"received ({fds}): one fd per queue pair"])
            if fds:
                dev["fds"] = [-1] * fds  # real fds are process-local; the count is what matters
        if endpoint == "vm.add-vsock":
            if self.config.get("vsock"):
                raise ApiFailure(500, [E_API, what, "No more than one virtio-vsock device"])
        if self.vm is None:  # cold add: the config is edited, the device appears at boot
            self._put(key, dev)
            return Reply(204)
        if not dev.get("id"):
            dev["id"] = self._new_id(prefix, self.config)
        self._put(key, dev)
        slot = self.vm.next_slot
        self.vm.next_slot += 1
        return Reply(200, {"id": dev["id"], "bdf": f"0000:00:{slot:02x}.0"})

    def _put(self, key: str, dev: dict[str, Any]) -> None:
        assert self.config is not None
        if key == "vsock":
            self.config["vsock"] = dev
        else:
            self.config.setdefault(key, []).append(dev)

    def do_vm_remove_device(self, body: Any, fds: int) -> Reply:
        what = "The device could not be removed from the VM"
        if self.config is None:
            raise ApiFailure(404, [E_API, what, "VM is not created"])
        dev_id = body.get("id")
        for key in DEVICE_LISTS:
            devs = self.config.get(key) or []
            for i, d in enumerate(devs):
                if d.get("id") == dev_id:
                    del devs[i]
                    return Reply(204)
        vs = self.config.get("vsock")
        if isinstance(vs, dict) and vs.get("id") == dev_id:
            del self.config["vsock"]
            return Reply(204)
        raise ApiFailure(404, [E_API, what, f"No device with id {json.dumps(dev_id)} to remove"])

    # -- snapshot / restore / migration ------------------------------------------------------

    @staticmethod
    def _dir_from_url(url: str, what: str, inner: str) -> Path:
        if not url.startswith("file://"):
            raise ApiFailure(500, [E_API, what, inner, f"Unsupported URL scheme in {url!r}: only file:// is"])
        p = Path(url[len("file://"):])
        if not p.is_dir():
            raise ApiFailure(500, [E_API, what, inner, f"{p} is not a directory"])
        return p

    def do_vm_snapshot(self, body: Any, fds: int) -> Reply:
        what, inner = "The VM could not be snapshotted", "Cannot snapshot VM"
        if self.vm is None or self.config is None:
            raise ApiFailure(500, [E_API, what, "VM is not running"])
        if self.vm.state != "Paused":
            raise ApiFailure(500, [E_API, what, inner, "Trying to snapshot while VM is running"])
        dest = self._dir_from_url(str(body.get("destination_url", "")), what, inner)
        self.emit("vm", "snapshotting", None)
        mem = int((self.config.get("memory") or {}).get("size") or DEFAULT_MEMORY)
        try:
            (dest / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
            state = {"nkudo_ch_sim": {"version": BUILD_VERSION, "vm_state": self.vm.state,
                                      "id_counter": self.id_counter, "memory_size": mem,
                                      "taken_at": time.time()}}
            (dest / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            with open(dest / "memory-ranges", "wb") as f:
                f.truncate(mem)  # sparse: the size of guest RAM, as CH's file is
        except OSError as exc:
            raise ApiFailure(500, [E_API, what, inner, f"Failed to write snapshot: {exc}"]) from None
        self.emit("vm", "snapshotted", None)
        return Reply(204)

    def do_vm_restore(self, body: Any, fds: int) -> Reply:
        what, inner = "The VM could not be restored", "Cannot restore VM"
        if self.config is not None or self.vm is not None:
            raise ApiFailure(500, [E_API, what, "VM is already created"])
        net_fds = body.get("net_fds") or []
        expected = sum(int(n.get("num_fds", 0)) for n in net_fds if isinstance(n, dict))
        if fds != expected:
            raise ApiFailure(400, ["Bad Request"])
        if body.get("prefault") and body.get("memory_restore_mode") == "OnDemand":
            raise ApiFailure(500, [E_API, what, "prefault cannot be used with memory_restore_mode=OnDemand"])
        src = self._dir_from_url(str(body.get("source_url", "")), what, inner)
        missing = [n for n in ("config.json", "state.json", "memory-ranges") if not (src / n).exists()]
        if missing:
            raise ApiFailure(500, [E_API, what, inner, f"Missing snapshot file(s) in {src}: {', '.join(missing)}"])
        try:
            cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
            state = json.loads((src / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ApiFailure(500, [E_API, what, inner, f"Invalid snapshot: {exc}"]) from None
        if not isinstance(cfg, dict) or not isinstance(state, dict):
            raise ApiFailure(500, [E_API, what, inner, "Invalid snapshot: config.json/state.json are not objects"])
        known = {n.get("id") for n in cfg.get("net") or []}
        for n in net_fds:
            if n.get("id") not in known:
                raise ApiFailure(500, [E_API, what, inner, f"No net device with id {n.get('id')!r} in the snapshot"])
        # CH restores guest RAM from memory-ranges: a file shorter than the VM's memory cannot be the snapshot's.
        mem = int((cfg.get("memory") or {}).get("size") or DEFAULT_MEMORY)
        have = (src / "memory-ranges").stat().st_size
        if have < mem:
            raise ApiFailure(500, [E_API, what, inner, f"Failed to restore memory: memory-ranges holds {have} bytes, "
                                                       f"the VM has {mem}"])  # fmt: skip
        # CH re-opens every disk config.json names (and the serial file): a disk that is gone fails the restore.
        if self.opts.check_payload_files:
            for d in cfg.get("disks") or []:
                if d.get("path") and not os.path.exists(d["path"]):
                    raise ApiFailure(500, [E_API, what, inner, f"Cannot open disk path {d['path']}: "
                                                               "No such file or directory (os error 2)"])  # fmt: skip
        serial = cfg.get("serial") or {}
        if serial.get("mode") == "File" and serial.get("file"):
            self.serial_path = str(serial["file"])
        self.emit("vm", "restoring", None)
        self.config = cfg
        self.id_counter = int((state.get("nkudo_ch_sim") or {}).get("id_counter", 0))
        self._start_vm("Running" if body.get("resume") else "Paused", "restored from a snapshot")
        self.emit("vm", "restored", None)
        return Reply(204)

    def do_vm_receive_migration(self, body: Any, fds: int) -> Reply:
        raise ApiFailure(500, [E_API, "Error starting migration receiver", "migration is not simulated by nkudo-ch-sim"])

    def do_vm_send_migration(self, body: Any, fds: int) -> Reply:
        raise ApiFailure(500, [E_API, "Error starting migration sender", "migration is not simulated by nkudo-ch-sim"])
