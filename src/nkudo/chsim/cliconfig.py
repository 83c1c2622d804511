"""Cloud Hypervisor's VM-config command-line flags, parsed into a ``VmConfig`` dict.

Why: the agent may start the VMM in CLI-configured mode (``--kernel`` +
``--cpus`` + ``--disk`` ...), like Flintlock does; the real binary then runs
``vm.create`` + ``vm.boot`` itself. The simulator must accept the same flag
syntax (``key=value,key=value`` with ``[..]`` lists, size suffixes, on/off
toggles), reject unknown keys as CH's option parser does, and produce the
config that ``vm.info`` would later report.
"""

from __future__ import annotations

from typing import Any


class CliError(ValueError):
    """A flag value CH's option parser would reject (exit status 1)."""


def split_options(text: str) -> dict[str, str]:
    """``"a=1,b=[2,3],c"`` -> ``{"a": "1", "b": "[2,3]", "c": ""}`` (commas inside [] or "" kept)."""
    out: dict[str, str] = {}
    depth, quoted = 0, False
    cur: list[str] = []
    parts: list[str] = []
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif ch == "[" and not quoted:
            depth += 1
        elif ch == "]" and not quoted:
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    for p in parts:
        if not p:
            continue
        k, _, v = p.partition("=")
        out[k.strip()] = v.strip().strip('"')
    return out


def parse_size(v: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = v.strip()
    try:
        if s and s[-1].upper() in mult:
            return int(s[:-1]) * mult[s[-1].upper()]
        return int(s)
    except ValueError:
        raise CliError(f"invalid size {v!r}") from None


def _toggle(v: str) -> bool:
    low = v.lower()
    if low in ("on", "true", ""):
        return True
    if low in ("off", "false"):
        return False
    raise CliError(f"invalid toggle {v!r} (on/off)")


def _int(v: str) -> int:
    try:
        return int(v, 0)
    except ValueError:
        raise CliError(f"invalid integer {v!r}") from None


def _int_list(v: str) -> list[int]:
    inner = v.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    return [_int(x) for x in inner.split(",") if x.strip()]


def _check(flag: str, opts: dict[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise CliError(f"Error parsing --{flag}: unknown option {unknown[0]!r}")


_DISK_KEYS = {"path", "readonly", "direct", "iommu", "num_queues", "queue_size", "vhost_user", "socket",
              "bw_size", "bw_one_time_burst", "bw_refill_time", "ops_size", "ops_one_time_burst",
              "ops_refill_time", "id", "pci_segment", "pci_device_id", "rate_limit_group", "queue_affinity",
              "serial", "backing_files", "sparse", "image_type", "lock_granularity"}
_NET_KEYS = {"tap", "ip", "mask", "mac", "host_mac", "mtu", "fd", "iommu", "num_queues", "queue_size", "id",
             "vhost_user", "socket", "vhost_mode", "bw_size", "bw_one_time_burst", "bw_refill_time", "ops_size",
             "ops_one_time_burst", "ops_refill_time", "pci_segment", "pci_device_id", "offload_tso",
             "offload_ufo", "offload_csum"}
_CPU_KEYS = {"boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features", "nested",
             "core_scheduling"}
_MEM_KEYS = {"size", "mergeable", "shared", "hugepages", "hugepage_size", "hotplug_method", "hotplug_size",
             "hotplugged_size", "prefault", "reserve", "thp"}


def disk(text: str) -> dict[str, Any]:
    o = split_options(text)
    _check("disk", o, _DISK_KEYS)
    d: dict[str, Any] = {}
    for k, v in o.items():
        if k in ("readonly", "direct", "iommu", "vhost_user", "backing_files", "sparse"):
            d[k] = _toggle(v)
        elif k in ("num_queues", "queue_size", "pci_segment", "pci_device_id"):
            d[k] = _int(v)
        elif k == "socket":
            d["vhost_socket"] = v
        elif k == "image_type":
            d[k] = {"raw": "Raw", "qcow2": "Qcow2", "vhd": "FixedVhd", "vhdx": "Vhdx"}.get(v.lower(), v)
        elif k == "lock_granularity":
            d[k] = {"byte-range": "ByteRange", "full": "Full"}.get(v.lower(), v)
        elif k.startswith(("bw_", "ops_")):
            continue  # rate limiter fields: accepted, not modelled
        else:
            d[k] = v
    return d


def net(text: str) -> dict[str, Any]:
    o = split_options(text)
    _check("net", o, _NET_KEYS)
    d: dict[str, Any] = {}
    for k, v in o.items():
        if k in ("iommu", "vhost_user", "offload_tso", "offload_ufo", "offload_csum"):
            d[k] = _toggle(v)
        elif k in ("num_queues", "queue_size", "mtu", "pci_segment", "pci_device_id"):
            d[k] = _int(v)
        elif k == "socket":
            d["vhost_socket"] = v
        elif k == "vhost_mode":
            d[k] = v.capitalize()
        elif k == "fd":
            d["fds"] = _int_list(v)
        elif k.startswith(("bw_", "ops_")):
            continue
        else:
            d[k] = v
    if "fds" in d and "num_queues" not in d:
        d["num_queues"] = 2 * len(d["fds"])
    return d


def cpus(text: str) -> dict[str, Any]:
    o = split_options(text)
    _check("cpus", o, _CPU_KEYS)
    boot = _int(o["boot"]) if "boot" in o else 1
    d: dict[str, Any] = {"boot_vcpus": boot, "max_vcpus": _int(o["max"]) if "max" in o else boot}
    if "kvm_hyperv" in o:
        d["kvm_hyperv"] = _toggle(o["kvm_hyperv"])
    if "max_phys_bits" in o:
        d["max_phys_bits"] = _int(o["max_phys_bits"])
    if "nested" in o:
        d["nested"] = _toggle(o["nested"])
    if "topology" in o:
        t = [_int(x) for x in o["topology"].split(":")]
        if len(t) != 4:
            raise CliError("Error parsing --cpus: topology must be threads:cores:dies:packages")
        d["topology"] = dict(zip(("threads_per_core", "cores_per_die", "dies_per_package", "packages"), t,
                                 strict=True))
    return d


def memory(text: str) -> dict[str, Any]:
    o = split_options(text)
    _check("memory", o, _MEM_KEYS)
    d: dict[str, Any] = {"size": parse_size(o.get("size", "512M"))}
    for k in ("mergeable", "shared", "hugepages", "prefault", "thp"):
        if k in o:
            d[k] = _toggle(o[k])
    for k in ("hugepage_size", "hotplug_size", "hotplugged_size"):
        if k in o:
            d[k] = parse_size(o[k])
    if "hotplug_method" in o:
        d["hotplug_method"] = {"acpi": "Acpi", "virtio-mem": "VirtioMem"}.get(o["hotplug_method"], o["hotplug_method"])
    return d


def console(text: str, flag: str) -> dict[str, Any]:
    """``off|null|pty|tty|file=<p>|socket=<p>`` (+ ``iommu``/``id``) -> ConsoleConfig."""
    o = split_options(text)
    modes = {"off": "Off", "null": "Null", "pty": "Pty", "tty": "Tty"}
    d: dict[str, Any] = {}
    for k, v in o.items():
        if k in modes and v == "":
            d["mode"] = modes[k]
        elif k == "file":
            d.update(mode="File", file=v)
        elif k == "socket":
            d.update(mode="Socket", socket=v)
        elif k == "iommu":
            d["iommu"] = _toggle(v)
        elif k == "id" and flag == "console":
            continue
        else:
            raise CliError(f"Error parsing --{flag}: invalid value {text!r}")
    if "mode" not in d:
        raise CliError(f"Error parsing --{flag}: no mode in {text!r}")
    return d


def build_config(ns: Any) -> dict[str, Any]:
    """The VmConfig the real binary would create from the parsed flags."""
    payload: dict[str, Any] = {}
    for k in ("kernel", "firmware", "cmdline", "initramfs", "igvm"):
        v = getattr(ns, k, None)
        if v is not None:
            payload[k] = v
    cfg: dict[str, Any] = {
        "payload": payload,
        "cpus": cpus(ns.cpus or "boot=1"),
        "memory": memory(ns.memory or "size=512M"),
        "serial": console(ns.serial or "null", "serial"),
        "console": console(ns.console or "tty", "console"),
        "rng": {"src": "/dev/urandom"},
    }
    if ns.rng:
        cfg["rng"] = {"src": split_options(ns.rng).get("src", "/dev/urandom")}
    disks = [disk(t) for group in ns.disk or [] for t in group]
    if disks:
        cfg["disks"] = disks
    nets = [net(t) for group in ns.net or [] for t in group]
    if nets:
        cfg["net"] = nets
    if ns.vsock:
        o = split_options(ns.vsock)
        cfg["vsock"] = {"cid": _int(o.get("cid", "0")), "socket": o.get("socket", "")}
        if "id" in o:
            cfg["vsock"]["id"] = o["id"]
    for flag in ("pvpanic", "watchdog"):
        if getattr(ns, flag, False):
            cfg[flag] = True
    return cfg
