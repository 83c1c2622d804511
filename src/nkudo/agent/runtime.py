"""Assembles the agent from its adapters, and reconciles local state with the host at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from nkudo import log
from nkudo.agent.executor import Executor, Handler, Outcome
from nkudo.agent.hostcmd import normalise_allowlist, run_command
from nkudo.agent.network import HostNetwork
from nkudo.agent.provider import ProcessRecord, Provider, VmPaths
from nkudo.agent.restore import RestoreService
from nkudo.agent.state import StateStore, VmRecord
from nkudo.agent.vms import NetworkPort, VmConfig, VmService
from nkudo.errors import NkudoError, ValidationError
from nkudo.proc.errors import AdoptionRefused, ProcessError
from nkudo.proc.identity import ProcessIdentity, check_identity
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType

_log = log.get_logger("agent")


@dataclass
class AgentConfig:
    state_dir: str = "/var/lib/nkudo-edge/state"
    runtime_dir: str = "/var/lib/nkudo-edge/vms"
    snapshot_dir: str = "/var/lib/nkudo-edge/snapshots"
    image_roots: tuple[str, ...] = ("/var/lib/nkudo-edge/images",)
    cloud_hypervisor_bin: str = "cloud-hypervisor"
    provider: str = "cloud-hypervisor"  # or "qemu"
    qemu_bin: str = "qemu-system-x86_64"
    qemu_accel: str = "auto"  # auto | kvm | tcg (see nkudo.agent.providers.qemu)
    bridge: str = "br0"
    exec_allow: tuple[str, ...] = ()
    net_backend: str = "auto"
    stop_timeout: float = 20.0
    console_max_mib: int = 2  # serial console kept per VM on disk (nkudo.agent.console.rotate)
    extra: dict[str, Any] = field(default_factory=dict)


class Agent:
    """The local half of the agent: store + provider + network + executor."""

    def __init__(
        self, cfg: AgentConfig, *, provider: Provider | None = None, network: NetworkPort | None = None
    ) -> None:
        from nkudo.agent.providers.cloud_hypervisor import CloudHypervisorProvider

        self.cfg = cfg
        for d in (cfg.runtime_dir, cfg.snapshot_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.store = StateStore(cfg.state_dir)
        if provider is None and cfg.provider == "qemu":
            from nkudo.agent.providers.qemu import QemuProvider

            provider = QemuProvider(cfg.qemu_bin, accel=cfg.qemu_accel, on_exit=self._vmm_exited)
        self.provider: Provider = provider or CloudHypervisorProvider(
            cfg.cloud_hypervisor_bin, on_exit=self._vmm_exited
        )
        self.network: NetworkPort = network or HostNetwork(cfg.net_backend)
        self.allow = normalise_allowlist(cfg.exec_allow)
        self.vms = VmService(
            self.store,
            self.provider,
            self.network,
            VmConfig(cfg.runtime_dir, cfg.snapshot_dir, cfg.image_roots, cfg.bridge, cfg.stop_timeout),
        )
        #: Every action type's handler; an executor with reporting callbacks (the daemon's) is built on these.
        self.handlers: dict[str, Handler] = {
            **self.vms.handlers(),
            ActionType.MICROVM_RESTORE: RestoreService(self.vms).restore,
            ActionType.COMMAND_EXECUTE: self._command,
        }
        #: Runs actions with no reporting (``apply``, ``unenroll --delete-vms``).
        self.executor = Executor(self.store, self.handlers)

    def _command(self, ctx: Any, params: Any) -> dict[str, Any]:
        return run_command(
            params.command,
            list(params.args),
            cwd=params.dir,
            timeout=min(float(params.timeout), max(ctx.remaining(), 0.1)),
            allow=self.allow,
        )

    def _vmm_exited(self, process: ProcessRecord, how: str, clean: bool) -> None:
        """A VMM ended without the agent asking (pidfd notification): record what happened to its VM."""
        for vm in self.store.list_vms():
            if (
                vm.process
                and vm.process.get("pid") == process.get("pid")
                and vm.process.get("start_time") == process.get("start_time")
            ):
                status = VmStatus.STOPPED if clean else VmStatus.CRASHED
                self.store.update_vm(
                    vm.vm_id, status=status, process=None, last_error=None if clean else f"VMM {how}"
                )
                (_log.info if clean else _log.warn)(
                    "VMM exited on its own", vm_id=vm.vm_id, how=how, status=status.value
                )
                return

    def close(self) -> None:
        self.provider.close()
        close = getattr(self.network, "close", None)
        if close is not None:
            close()
        self.store.close()

    def device_counters(self, vm: VmRecord) -> dict[str, dict[str, int]]:
        """The hypervisor's own per-device counters of ``vm`` ({} where the provider has none, as QEMU here).

        A capability, not part of the Provider port: the kernel counters (``agent.counters``) serve every
        provider; these add what only the hypervisor sees (block operations, virtio frames).
        """
        read = getattr(self.provider, "device_counters", None)
        if read is None:
            return {}
        return dict(read(self.vms.paths(vm.vm_id), timeout=0.5))

    def reconcile(self) -> dict[str, list[str]]:
        """Re-adopt live VMMs, mark dead ones crashed, sweep TAPs of VMs that no longer exist."""
        report: dict[str, list[str]] = {
            "adopted": [], "unknown": [], "crashed": [], "taps_swept": [], "sockets_removed": [],
        }  # fmt: skip
        for vm in self.store.list_vms():
            p = self.vms.paths(vm.vm_id)
            if vm.process and self.provider.watch(vm.process):
                state = self._answered_state(vm, p)
                if state is not None and state != vm.status:
                    self.store.update_vm(vm.vm_id, status=state)
                report["adopted"].append(vm.vm_id)
                continue
            live = self.provider.live_vmms(p)
            if live:
                # Not provably the recorded VMM (a launcher exec'd after the record was taken, or the
                # record is missing), yet it serves this VM's socket: keep the record, the socket and
                # the process; stop/delete end exactly the processes carrying the marker.
                why = (
                    f"pid(s) {', '.join(map(str, live))} carry this VM's API socket but are not the "
                    f"recorded VMM ({_refusal(vm.process)}); stop or delete the VM to end them"
                )
                self.store.update_vm(vm.vm_id, status=VmStatus.UNKNOWN, last_error=why)
                report["unknown"].append(vm.vm_id)
                _log.warn("VM state unknown: an unverified VMM process serves it", vm_id=vm.vm_id, reason=why)
                continue
            if vm.process or vm.status.has_vmm or vm.status is VmStatus.UNKNOWN:
                self.store.update_vm(
                    vm.vm_id,
                    status=VmStatus.CRASHED,
                    process=None,
                    last_error="the VMM exited while the agent was not watching",
                )
                report["crashed"].append(vm.vm_id)
                _log.warn("VM marked crashed: its VMM is gone", vm_id=vm.vm_id)
            if os.path.exists(p.api_socket):
                os.unlink(p.api_socket)
                report["sockets_removed"].append(p.api_socket)
        known = {vm.vm_id for vm in self.store.list_vms()}
        orphans = sorted({vm_id for vm_id in self.network.owned_taps().values() if vm_id not in known})
        for vm_id in orphans:
            report["taps_swept"].extend(self.network.remove_taps(vm_id))
        if any(report.values()):
            _log.info("reconciled local state", **{k: ",".join(v) for k, v in report.items() if v})
        return report

    def _answered_state(self, vm: VmRecord, p: VmPaths) -> VmStatus | None:
        """The adopted VMM's state, or None (keep the recorded one) when it is too busy to answer now."""
        try:
            return self.provider.state(p, timeout=2.0)
        except NkudoError as exc:
            if not exc.is_timeout:
                raise
            _log.warn("adopted a VMM that did not answer in time; its recorded state is kept",
                      vm_id=vm.vm_id, status=str(vm.status), error=str(exc))  # fmt: skip
            return None

    def run_plan(self, doc: Any) -> tuple[str | None, list[Outcome]]:
        from nkudo.agent.plan import parse_plan

        plan_id, actions = parse_plan(doc)
        return plan_id, self.executor.run_plan(actions)


def _refusal(process: ProcessRecord | None) -> str:
    """Why ``process`` (a stored record) is not the live VMM, in words for ``last_error``."""
    if not process:
        return "no process was recorded"
    try:
        check_identity(ProcessIdentity.from_dict(process))
    except (AdoptionRefused, ProcessError, ValidationError) as exc:
        return str(exc)
    return "the recorded process could not be adopted"
