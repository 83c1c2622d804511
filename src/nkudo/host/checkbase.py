"""The vocabulary of the preflight checks: statuses, one result, the validated inputs.

Why a module of its own: every check module and the runner in
:mod:`nkudo.host.checks` share these, and the inputs cache the KVM probe so
that two checks reading it run it once.
"""

from __future__ import annotations

import os

from nkudo.host import kvm as _kvm

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

MIN_CH_VERSION = (48, 0)  # first release with JSON error lists; the API the agent targets
MIN_KERNEL_PIDFD = (5, 3)
RECOMMENDED_KERNEL = (5, 13)

TUNGETFEATURES = 0x800454CF
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000


class CheckResult:
    __slots__ = ("data", "detail", "duration_ms", "id", "remedy", "status", "title")

    def __init__(
        self,
        id: str,
        title: str,
        status: str,
        detail: str,
        remedy: str = "",
        data: Mapping[str, object] | None = None,
    ) -> None:
        self.id = id
        self.title = title
        self.status = status
        self.detail = detail
        self.remedy = remedy if status in (WARN, FAIL) else ""
        self.data: dict[str, object] = dict(data or {})
        self.duration_ms = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            k: getattr(self, k) for k in ("id", "title", "status", "detail", "remedy", "duration_ms", "data")
        }


class CheckOptions:
    """Inputs of the checks (already validated by the CLI)."""

    def __init__(
        self,
        *,
        kvm_device: str = "/dev/kvm",
        tun_device: str = "/dev/net/tun",
        cloud_hypervisor_bin: str = "cloud-hypervisor",
        bridge: str = "br0",
        state_dir: str = "/var/lib/nkudo-edge/state",
        runtime_dir: str = "/var/lib/nkudo-edge/vms",
        min_disk_gib: float = 10.0,
        min_memory_mib: int = 1024,
        netbird_enabled: bool = False,
        skip: tuple[str, ...] = (),
        qemu_bin: str | None = None,
    ) -> None:
        self.kvm_device = kvm_device
        self.tun_device = tun_device
        self.cloud_hypervisor_bin = cloud_hypervisor_bin
        self.bridge = bridge
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.min_disk_gib = min_disk_gib
        self.min_memory_mib = min_memory_mib
        self.netbird_enabled = netbird_enabled
        self.skip = skip
        self.qemu_bin = qemu_bin or os.environ.get("NKUDO_QEMU_BIN") or "qemu-system-x86_64"
        self._kvm: _kvm.KvmReport | None = None
        self._smoke: _kvm.SmokeReport | None = None

    def kvm_report(self) -> _kvm.KvmReport:
        if self._kvm is None:
            self._kvm = _kvm.probe_kvm(self.kvm_device, create_vm=True)
        return self._kvm

    def kvm_smoke(self) -> _kvm.SmokeReport:
        if self._smoke is None:
            self._smoke = _kvm.smoke_test(self.kvm_device)
        return self._smoke
