"""MicroVM action handlers: desired state, files, TAPs and records around a :class:`Provider`.

Every handler converges: run twice (a redelivery, or a re-drive after the
agent was killed mid-action) it reaches the same end state without a second
VMM, a second TAP or a second copy of anything. Each step checks what already
exists before acting, and records progress in the state store as it goes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nkudo.agent import console
from nkudo.agent import paths as P
from nkudo.agent.disks import check_room, clone_image, fsync_dir, os_failure, write_atomic
from nkudo.agent.executor import ActionContext
from nkudo.agent.provider import LaunchSpec, NicPlan, Provider, VmPaths
from nkudo.agent.rollback import rollback_create
from nkudo.agent.snapshots import META_FILE, ROOTFS_FILE, SnapshotMeta, encode_meta
from nkudo.agent.state import StateStore, VmRecord
from nkudo.errors import NkudoError
from nkudo.vmstate import VmStatus
from nkudo.wire import actions as A
from nkudo.wire.codec import convert, to_builtins
from nkudo.wire.vocab import ActionType, ErrorCode


class NetworkPort(Protocol):
    def ensure_taps(self, vm_id: str, nics: list[tuple[str, str]]) -> list[NicPlan]:
        """Create (or re-use our own) TAPs for (bridge, mac) pairs, attached and up."""

    def remove_taps(self, vm_id: str) -> list[str]:
        """Delete every TAP owned by ``vm_id``; return their names."""

    def owned_taps(self) -> dict[str, str]:
        """All TAPs carrying the nkudo owner marker: name -> vm_id."""


def stable_mac(vm_id: str, index: int) -> str:
    """A locally administered unicast MAC derived from the VM id (stable across restarts)."""
    d = hashlib.sha256(f"nkudo:{vm_id}:{index}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in d[:5])


@dataclass
class VmConfig:
    runtime_dir: str
    snapshot_dir: str
    image_roots: tuple[str, ...]
    default_bridge: str = "br0"
    stop_timeout: float = 20.0


class VmService:
    def __init__(self, store: StateStore, provider: Provider, network: NetworkPort, cfg: VmConfig) -> None:
        self.store = store
        self.provider = provider
        self.network = network
        self.cfg = cfg

    # ----------------------------------------------------------- helpers

    def handlers(self) -> dict[str, Callable[[ActionContext, Any], dict[str, Any]]]:
        return {
            ActionType.MICROVM_CREATE: self.create,
            ActionType.MICROVM_START: self.start,
            ActionType.MICROVM_STOP: self.stop,
            ActionType.MICROVM_DELETE: self.delete,
            ActionType.MICROVM_PAUSE: self.pause,
            ActionType.MICROVM_RESUME: self.resume,
            ActionType.MICROVM_SNAPSHOT: self.snapshot,
        }

    def paths(self, vm_id: str, *, with_disks: bool = True) -> VmPaths:
        d = P.safe_join(self.cfg.runtime_dir, vm_id, field="params.vm_id")
        return VmPaths(
            runtime_dir=d,
            api_socket=P.check_socket_path(os.path.join(d, "api.sock")),
            vmm_log=os.path.join(d, "vmm.log"),
            console_log=os.path.join(d, "console.log"),
            rootfs=os.path.join(d, "rootfs.img") if with_disks else None,
            seed_iso=os.path.join(d, "cloud-init.iso") if with_disks else None,
        )

    def get(self, vm_id: str) -> VmRecord:
        """The VM's record; ``VM_NOT_FOUND`` naming ``params.vm_id`` when there is none."""
        return self._vm(vm_id)

    def launch_spec(self, rec: VmRecord, p: VmPaths) -> LaunchSpec:
        """What the provider needs to start (or restore) the VM of ``rec``, paths re-checked."""
        return self._launch_spec(rec, p)

    def result(self, rec: VmRecord, status: VmStatus, **extra: Any) -> dict[str, Any]:
        """The result of a VM action (the same shape for every handler that leaves a VM)."""
        return self._result(rec, status, **extra)

    def check_host_paths(self, params: A.MicroVMCreate) -> None:
        """Every host path a VM spec names lies inside the image roots (before anything is created)."""
        if params.kernel_path:
            P.within_roots(params.kernel_path, self.cfg.image_roots, "params.kernel_path")
        if params.firmware_path:
            P.within_roots(params.firmware_path, self.cfg.image_roots, "params.firmware_path")
        if params.initramfs_path:
            P.within_roots(params.initramfs_path, self.cfg.image_roots, "params.initramfs_path")
        if params.image_path:
            P.within_roots(params.image_path, self.cfg.image_roots, "params.image_path")
        for i, d in enumerate(params.disks or []):
            P.within_roots(d.path, self.cfg.image_roots, f"params.disks[{i}].path")

    def write_seed(self, ctx: ActionContext, params: A.MicroVMCreate, p: VmPaths) -> None:
        """The cloud-init seed ISO, once (it is derived from the spec only)."""
        if params.cloud_init and p.seed_iso and not os.path.exists(p.seed_iso):
            from nkudo.agent.seed import write_seed_iso

            try:
                n = write_seed_iso(
                    p.seed_iso,
                    params.cloud_init.user_data,
                    params.cloud_init.meta_data,
                    params.cloud_init.network_config,
                )
            except OSError as exc:
                raise os_failure(exc, "writing the cloud-init seed failed", field="params.cloud_init") from None
            ctx.log("cloud-init seed written", bytes=n)

    def _vm(self, vm_id: str) -> VmRecord:
        rec = self.store.get_vm(vm_id)
        if rec is None:
            raise NkudoError(
                f"VM {vm_id!r} does not exist on this host", code=ErrorCode.VM_NOT_FOUND, field="params.vm_id"
            )
        return rec

    def _launch_spec(self, rec: VmRecord, p: VmPaths) -> LaunchSpec:
        spec = convert(rec.spec, A.MicroVMCreate)
        disks: list[tuple[str, bool]] = []
        if spec.image_path is not None and p.rootfs:
            disks.append((p.rootfs, False))
        for d in spec.disks or []:
            disks.append((P.within_roots(d.path, self.cfg.image_roots, "params.disks.path"), d.readonly))
        if spec.cloud_init is not None and p.seed_iso:
            disks.append((p.seed_iso, True))
        return LaunchSpec(
            vm_id=rec.vm_id,
            vcpus=spec.vcpus,
            memory_mib=spec.memory_mib,
            kernel_path=spec.kernel_path,
            firmware_path=spec.firmware_path,
            initramfs_path=spec.initramfs_path,
            cmdline=spec.cmdline,
            disks=disks,
            nics=list(rec.nics),
        )

    def _ensure_running_vmm(self, ctx: ActionContext, rec: VmRecord, p: VmPaths, *, boot: bool) -> VmStatus:
        """Make sure a VMM with our config runs (launch if needed) and, if asked, that the guest runs."""
        state: VmStatus | None = None
        if rec.process and self.provider.is_alive(rec.process):
            state = self.provider.state(p, timeout=min(5.0, max(ctx.remaining(), 0.1)))
        if state is None:
            if rec.process:
                # A recorded VMM that no longer answers: make sure it is gone before starting another.
                self.provider.stop(p, rec.process, graceful_timeout=0, force=True)
            ctx.check_deadline("starting the VMM")
            spec = self._launch_spec(rec, p)
            process = self.provider.launch(
                spec,
                p,
                timeout=max(ctx.remaining(), 0.1),
                on_spawned=lambda proc_rec: self.store.update_vm(
                    rec.vm_id, process=proc_rec, status=VmStatus.CREATING
                ),
            )
            self.store.update_vm(rec.vm_id, process=process, status=VmStatus.CREATED, last_error=None)
            rec.process = process
            ctx.log("VMM started", pid=process.get("pid"))
            state = VmStatus.CREATED
        if boot and state == VmStatus.CREATED:
            ctx.check_deadline("booting")
            self.provider.boot(p, timeout=max(ctx.remaining(), 0.1))
            state = self.provider.state(p, timeout=min(5.0, max(ctx.remaining(), 0.1)))
            if state != VmStatus.RUNNING:
                raise NkudoError(
                    f"VM {rec.vm_id} did not reach Running after boot (state {state})", code=ErrorCode.BOOT_FAILED
                )
            ctx.log("VM booted")
        if boot and state == VmStatus.PAUSED:
            pass  # start of a paused VM: leave it paused, the operator asked for Resume semantics elsewhere
        self.store.update_vm(rec.vm_id, status=state)
        return state

    def _result(self, rec: VmRecord, status: VmStatus, **extra: Any) -> dict[str, Any]:
        out = {
            "vm_id": rec.vm_id,
            "status": status.value,
            "pid": rec.process.get("pid") if rec.process else None,
            "taps": rec.taps,
        }
        out.update(extra)
        return out

    # ---------------------------------------------------------- handlers

    def create(self, ctx: ActionContext, params: A.MicroVMCreate) -> dict[str, Any]:
        vm_id = params.vm_id
        p = self.paths(vm_id, with_disks=True)
        spec = to_builtins(params)
        spec.pop("start", None)
        rec = self.store.get_vm(vm_id)
        if rec is not None:
            if rec.spec != spec:
                raise NkudoError(
                    f"VM {vm_id!r} already exists with a different specification; delete it first",
                    code=ErrorCode.VM_EXISTS,
                    field="params.vm_id",
                )
        else:
            self.check_host_paths(params)  # every host path the plan names, before anything is created
            # Marked pending until the create succeeds: only such a record is rolled back on failure.
            self.store.insert_vm(
                vm_id, params.name, spec, p.runtime_dir, VmStatus.CREATING, create_pending=True
            )
            rec = self._vm(vm_id)
            ctx.log("VM record created")
        if not rec.create_pending:
            return self._create_steps(ctx, params, rec, p)  # exists already: never torn down
        try:
            return self._create_steps(ctx, params, rec, p)
        except Exception:
            # Issue 10 item 9: a failed create leaves nothing (or an ERROR record a delete clears).
            rollback_create(ctx, self.store, self.provider, self.network, vm_id, p)
            raise

    def _create_steps(
        self, ctx: ActionContext, params: A.MicroVMCreate, rec: VmRecord, p: VmPaths
    ) -> dict[str, Any]:
        vm_id = rec.vm_id
        try:
            os.makedirs(p.runtime_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise os_failure(exc, f"cannot create the runtime directory {p.runtime_dir}") from None

        # Network: deterministic TAP names, owner marker, attached and up.
        nics = [(n.bridge, n.mac or stable_mac(vm_id, i)) for i, n in enumerate(params.nics)]
        planned = self.network.ensure_taps(vm_id, nics)
        taps = [n.tap for n in planned]
        if rec.taps != taps or rec.nics != planned:
            self.store.update_vm(vm_id, taps=taps, nics=planned)
            rec = self._vm(vm_id)
            ctx.log("TAPs ready", taps=",".join(taps))

        # Disks: clone once (atomic rename means an existing file is complete).
        if params.image_path and p.rootfs and not os.path.exists(p.rootfs):
            src = P.within_roots(params.image_path, self.cfg.image_roots, "params.image_path")
            grow = params.disk_size_gib * 1024**3 if params.disk_size_gib else None
            check_room(src, p.runtime_dir, grow)  # DISK_TOO_LARGE / INSUFFICIENT_SPACE before any copy
            try:
                method = clone_image(src, p.rootfs, grow)
            except OSError as exc:
                raise os_failure(exc, f"cloning {src!r} failed", field="params.image_path") from None
            ctx.log("root disk cloned", method=method)
        self.write_seed(ctx, params, p)

        with console.on_failure(p.runtime_dir):  # issue 15: a timeout shows the console, not only "timed out"
            state = self._ensure_running_vmm(ctx, rec, p, boot=params.start)
        rec = self._vm(vm_id)
        if rec.create_pending:
            self.store.update_vm(vm_id, create_pending=False)
        return self._result(rec, state, runtime_dir=p.runtime_dir, macs=[m for _, m in nics])

    def start(self, ctx: ActionContext, params: A.MicroVMStart) -> dict[str, Any]:
        rec = self._vm(params.vm_id)
        p = self.paths(rec.vm_id)
        if not rec.taps and rec.spec.get("nics"):
            raise NkudoError(f"VM {rec.vm_id} has no TAPs recorded", code=ErrorCode.VM_BROKEN)
        with console.on_failure(p.runtime_dir):
            state = self._ensure_running_vmm(ctx, rec, p, boot=True)
        return self._result(self._vm(rec.vm_id), state)

    def stop(self, ctx: ActionContext, params: A.MicroVMStop) -> dict[str, Any]:
        rec = self._vm(params.vm_id)
        p = self.paths(rec.vm_id)
        # Always through the provider, even when the record looks dead: it also ends any process
        # carrying this VM's marker (a launcher-exec'd or unrecorded VMM), and raises rather than
        # let a stop be reported while one lives.
        how = self.provider.stop(
            p,
            rec.process,
            graceful_timeout=0 if params.force else min(self.cfg.stop_timeout, max(ctx.remaining() / 2, 0.1)),
            force=params.force,
        )
        self.store.update_vm(rec.vm_id, status=VmStatus.STOPPED, process=None)
        ctx.log("VM stopped", how=how)
        return self._result(self._vm(rec.vm_id), VmStatus.STOPPED, stopped_by=how)

    def delete(self, ctx: ActionContext, params: A.MicroVMDelete) -> dict[str, Any]:
        rec = self.store.get_vm(params.vm_id)
        p = self.paths(params.vm_id)
        # First end every VMM of this VM (recorded or only found by its marker): TAPs and files
        # are removed only once nothing runs on them.
        self.provider.stop(p, rec.process if rec else None, graceful_timeout=0, force=True)
        if rec is not None and rec.process:
            self.store.update_vm(rec.vm_id, status=VmStatus.STOPPED, process=None)
        removed = self.network.remove_taps(params.vm_id)
        if os.path.isdir(p.runtime_dir):
            shutil.rmtree(p.runtime_dir)
            fsync_dir(self.cfg.runtime_dir)
        if rec is not None:
            self.store.delete_vm(params.vm_id)
        ctx.log("VM deleted", taps_removed=",".join(removed))
        return {
            "vm_id": params.vm_id,
            "status": VmStatus.DELETED.value,
            "taps_removed": removed,
            "existed": rec is not None,
        }

    def _require_vmm(self, rec: VmRecord) -> VmPaths:
        if not rec.process or not self.provider.is_alive(rec.process):
            raise NkudoError(f"VM {rec.vm_id} is not running (status {rec.status})", code=ErrorCode.VM_NOT_RUNNING)
        return self.paths(rec.vm_id)

    def pause(self, ctx: ActionContext, params: A.MicroVMPause) -> dict[str, Any]:
        rec = self._vm(params.vm_id)
        p = self._require_vmm(rec)
        state = self.provider.state(p, timeout=5.0)
        if state == VmStatus.RUNNING:
            self.provider.pause(p, timeout=max(ctx.remaining(), 0.1))
            state = VmStatus.PAUSED
        elif state != VmStatus.PAUSED:
            raise NkudoError(f"VM {rec.vm_id} cannot be paused in state {state}", code=ErrorCode.INVALID_STATE)
        self.store.update_vm(rec.vm_id, status=VmStatus.PAUSED)
        return self._result(rec, VmStatus.PAUSED)

    def resume(self, ctx: ActionContext, params: A.MicroVMResume) -> dict[str, Any]:
        rec = self._vm(params.vm_id)
        p = self._require_vmm(rec)
        state = self.provider.state(p, timeout=5.0)
        if state == VmStatus.PAUSED:
            self.provider.resume(p, timeout=max(ctx.remaining(), 0.1))
        elif state != VmStatus.RUNNING:
            raise NkudoError(f"VM {rec.vm_id} cannot be resumed in state {state}", code=ErrorCode.INVALID_STATE)
        self.store.update_vm(rec.vm_id, status=VmStatus.RUNNING)
        return self._result(rec, VmStatus.RUNNING)

    def snapshot(self, ctx: ActionContext, params: A.MicroVMSnapshot) -> dict[str, Any]:
        """Pause if running, snapshot, resume: crash-safe at every step.

        The VMM writes into a hidden staging directory that is renamed to the final name only
        when complete, so a snapshot directory is never half-written. Whether the VM was
        running is recorded (``.intent-<name>``) before it is paused, so a re-drive after a
        crash knows to resume it even though it now finds the VM paused.
        """
        rec = self._vm(params.vm_id)
        dest = P.safe_join(
            self.cfg.snapshot_dir, rec.vm_id, params.snapshot_name, field="params.snapshot_name"
        )
        parent = os.path.dirname(dest)
        staging = os.path.join(parent, f".partial-{params.snapshot_name}")
        intent_path = os.path.join(parent, f".intent-{params.snapshot_name}")
        intent = _read_json(intent_path)
        if os.path.isdir(dest) and intent is None:
            if ctx.attempt == 1:
                raise NkudoError(
                    f"snapshot {params.snapshot_name!r} of VM {rec.vm_id} already exists",
                    code=ErrorCode.SNAPSHOT_EXISTS,
                )
            return {
                "vm_id": rec.vm_id,
                "snapshot_dir": dest,
                "files": _listing(dest),
            }  # finished before a crash
        p = self._require_vmm(rec)
        if intent is None:
            state = self.provider.state(p, timeout=5.0)
            if state not in (VmStatus.RUNNING, VmStatus.PAUSED):
                raise NkudoError(
                    f"VM {rec.vm_id} cannot be snapshotted in state {state}", code=ErrorCode.INVALID_STATE
                )
            intent = {"was_running": state == VmStatus.RUNNING}
            os.makedirs(parent, mode=0o700, exist_ok=True)
            write_atomic(intent_path, json.dumps(intent).encode())
        was_running = bool(intent["was_running"])
        if not os.path.isdir(dest):
            vmm_done = os.path.join(staging, VMM_DONE_FILE)
            reuse = False
            if self.provider.state(p, timeout=5.0) == VmStatus.RUNNING:
                self.provider.pause(p, timeout=30.0)
                ctx.log("paused for snapshot")
            else:
                # Still paused since an interrupted attempt whose VMM had finished writing: its files match
                # the guest as it is now, so the hypervisor's snapshot is not taken a second time. The VMM
                # serves one request at a time, so the state() answer above came after any snapshot call
                # the dead attempt left in flight; its files are then judged by their content (a kill before
                # the done marker was written).
                reuse = os.path.exists(vmm_done) or self.provider.snapshot_complete(staging)
            if not reuse:
                if os.path.isdir(staging):
                    shutil.rmtree(staging)  # an interrupted attempt of this very action
                os.makedirs(staging, mode=0o700)
                self.provider.snapshot(p, staging, timeout=max(ctx.remaining(), 1.0))
                write_atomic(vmm_done, b"")
            else:
                ctx.log("the hypervisor's snapshot of an interrupted attempt is complete; not taken again")
                with contextlib.suppress(FileNotFoundError):  # the interrupted disk copy starts over
                    os.unlink(os.path.join(staging, ROOTFS_FILE + ".partial"))
            self._snapshot_restorable(ctx, rec, p, staging)
            with contextlib.suppress(FileNotFoundError):  # absent when reused by content
                os.unlink(vmm_done)
            os.rename(staging, dest)
            fsync_dir(parent)
        if was_running and self.provider.state(p, timeout=5.0) == VmStatus.PAUSED:
            self.provider.resume(p, timeout=30.0)
            ctx.log("resumed after snapshot")
        os.unlink(intent_path)
        files = _listing(dest)
        ctx.log("snapshot written", files=len(files))
        return {"vm_id": rec.vm_id, "snapshot_dir": dest, "files": files, "resumed": was_running}


    def _snapshot_restorable(self, ctx: ActionContext, rec: VmRecord, p: VmPaths, staging: str) -> None:
        """What MicroVMRestore needs besides the hypervisor's files: the root disk and the agent's record.

        Why the disk: the guest's memory refers to the disk as it is now (the VM is paused), and a
        restore after a delete has no other copy of it. Cloned (reflink or sparse), as a create does.
        """
        if p.rootfs and os.path.exists(p.rootfs):
            try:
                method = clone_image(p.rootfs, os.path.join(staging, ROOTFS_FILE))
            except OSError as exc:
                raise os_failure(exc, "copying the root disk into the snapshot failed") from None
            ctx.log("root disk copied into the snapshot", method=method)
        meta = SnapshotMeta(rec.vm_id, rec.name, self.provider.name, rec.spec, [n.mac for n in rec.nics])
        write_atomic(os.path.join(staging, META_FILE), encode_meta(meta))


#: Written into the staging directory once the VMM's snapshot call succeeded (before the root disk is copied).
VMM_DONE_FILE = ".vmm-done"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _listing(d: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "size_bytes": os.path.getsize(os.path.join(d, n))}
        for n in sorted(os.listdir(d))
        if not n.startswith(".")
    ]
