"""Preflight checks run by ``nkudo-edge check`` before a host is enrolled.

Each check returns a :class:`CheckResult` (id, status, one-line detail and, when
not passing, a remedy the operator can act on). Checks never raise: a missing
device, a bad path or a permission error becomes a failing result. The order
and the ids are part of the CLI contract (``--skip ID``, ``--json``).

This module is the table and the runner; the checks live in
:mod:`nkudo.host.checks_virt` and :mod:`nkudo.host.checks_system`, their
vocabulary in :mod:`nkudo.host.checkbase` and the facts they read in
:mod:`nkudo.host.probes` (all re-exported here, the public import path).
"""

from __future__ import annotations

import time

from nkudo.host.checkbase import (
    FAIL,
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    MIN_CH_VERSION,
    MIN_KERNEL_PIDFD,
    PASS,
    RECOMMENDED_KERNEL,
    SKIP,
    TUNGETFEATURES,
    WARN,
    CheckOptions,
    CheckResult,
)
from nkudo.host.checks_system import (
    check_bridge,
    check_cgroup,
    check_disk,
    check_memory,
    check_netbird,
    check_privileges,
    check_state_dir,
)
from nkudo.host.checks_virt import (
    check_cloud_hypervisor,
    check_cpu_virt,
    check_kernel,
    check_kvm,
    check_kvm_exec,
    check_pidfd,
    check_qemu,
    check_tun,
    check_vhost_net,
)
from nkudo.host.probes import (
    cgroup_info,
    cpu_flags,
    kernel_version,
    meminfo,
    nearest_existing,
    parse_ch_version,
    qemu_version_from_binary,
    which,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CHECKS",
    "CHECK_IDS",
    "FAIL",
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "MIN_CH_VERSION",
    "MIN_KERNEL_PIDFD",
    "PASS",
    "RECOMMENDED_KERNEL",
    "SKIP",
    "TITLES",
    "TUNGETFEATURES",
    "WARN",
    "CheckOptions",
    "CheckResult",
    "cgroup_info",
    "check_bridge",
    "check_cgroup",
    "check_cloud_hypervisor",
    "check_cpu_virt",
    "check_disk",
    "check_kernel",
    "check_kvm",
    "check_kvm_exec",
    "check_memory",
    "check_netbird",
    "check_pidfd",
    "check_privileges",
    "check_qemu",
    "check_state_dir",
    "check_tun",
    "check_vhost_net",
    "cpu_flags",
    "kernel_version",
    "meminfo",
    "nearest_existing",
    "parse_ch_version",
    "qemu_version_from_binary",
    "run_checks",
    "summarize",
    "which",
]


CHECKS: dict[str, Callable[[CheckOptions], CheckResult]] = {
    "kvm": check_kvm,
    "kvm_exec": check_kvm_exec,
    "cpu_virt": check_cpu_virt,
    "kernel": check_kernel,
    "tun": check_tun,
    "vhost_net": check_vhost_net,
    "cloud_hypervisor": check_cloud_hypervisor,
    "qemu": check_qemu,
    "bridge": check_bridge,
    "state_dir": check_state_dir,
    "disk": check_disk,
    "memory": check_memory,
    "netbird": check_netbird,
    "cgroup": check_cgroup,
    "privileges": check_privileges,
    "pidfd": check_pidfd,
}
CHECK_IDS = tuple(CHECKS)
TITLES = {
    "kvm": "KVM available",
    "kvm_exec": "KVM can execute guest code",
    "cpu_virt": "CPU virtualization",
    "kernel": "Kernel",
    "tun": "TUN/TAP device",
    "vhost_net": "vhost-net device",
    "cloud_hypervisor": "Cloud Hypervisor binary found",
    "qemu": "QEMU binary found",
    "bridge": "Bridge exists",
    "state_dir": "State directory writable",
    "disk": "Disk space sufficient",
    "memory": "Memory sufficient",
    "netbird": "NetBird installed",
    "cgroup": "cgroup v2 controllers",
    "privileges": "Privileges",
    "pidfd": "pidfd support",
}


def run_checks(opts: CheckOptions) -> list[CheckResult]:
    results = []
    for cid, fn in CHECKS.items():
        start = time.perf_counter()
        if cid in opts.skip:
            res = CheckResult(cid, TITLES.get(cid, cid), SKIP, "skipped by --skip")
        else:
            try:
                res = fn(opts)
            except Exception as exc:  # a check must never crash the command
                res = CheckResult(
                    cid, cid, FAIL, f"check crashed: {type(exc).__name__}: {exc}", "report this as a bug"
                )
        res.duration_ms = round((time.perf_counter() - start) * 1000, 3)
        results.append(res)
    return results


def summarize(results: list[CheckResult]) -> dict[str, int]:
    counts = {PASS: 0, WARN: 0, FAIL: 0, SKIP: 0}
    for r in results:
        counts[r.status] += 1
    return counts
