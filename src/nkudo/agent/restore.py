"""MicroVMRestore: a snapshot taken by MicroVMSnapshot, restored into a fresh VMM on this host.

Two uses, one handler: the same VM brought back (after it was deleted, or its VMM crashed), or a
clone under a new VM id from another VM's snapshot. A clone gets its own TAPs (named after its id),
its own MACs (derived from its id) and its own runtime directory; the snapshot's files are only
ever read (the root disk is cloned out of it, the hypervisor is pointed at the original memory and
state files, a provider that needs an edited configuration writes it into the VM's runtime dir).

Why it converges like MicroVMCreate: the record is inserted with ``create_pending`` before anything
else exists, the VMM is recorded the moment it is spawned, and a re-drive (after a SIGKILL at any
point) finds what an earlier attempt made: a VMM that already holds the restored VM is kept (and
resumed if asked), any other is ended and the restore redone. A failed restore of a VM this action
created is rolled back by :func:`nkudo.agent.rollback.rollback_create`; a failed restore into an
existing (crashed or stopped) VM ends only the VMM it started and leaves the record for a delete.
"""

from __future__ import annotations

import os
from typing import Any

from nkudo.agent import paths as P
from nkudo.agent.disks import check_room, clone_image, os_failure
from nkudo.agent.executor import ActionContext
from nkudo.agent.provider import VmPaths
from nkudo.agent.rollback import rollback_create
from nkudo.agent.snapshots import ROOTFS_FILE, SnapshotMeta, read_meta
from nkudo.agent.state import VmRecord
from nkudo.agent.vms import VmService, stable_mac
from nkudo.errors import NkudoError
from nkudo.vmstate import VmStatus
from nkudo.wire import actions as A
from nkudo.wire.codec import convert, to_builtins
from nkudo.wire.vocab import ErrorCode, LogLevel

_RESTORED = (VmStatus.RUNNING, VmStatus.PAUSED)


class RestoreService:
    """The MicroVMRestore handler, on the VM service's store, provider, network and paths."""

    def __init__(self, vms: VmService) -> None:
        self.vms = vms

    # ------------------------------------------------------------------ validation

    def _snapshot(self, params: A.MicroVMRestore) -> tuple[str, SnapshotMeta]:
        """The snapshot directory and its record; refuses anything this host's agent did not write."""
        src = params.source_vm_id or params.vm_id
        d = P.safe_join(self.vms.cfg.snapshot_dir, src, params.snapshot_name, field="params.snapshot_name")
        if not os.path.isdir(d):
            raise NkudoError(
                f"params.snapshot_name: snapshot {params.snapshot_name!r} of VM {src} does not exist on this host",
                code=ErrorCode.SNAPSHOT_NOT_FOUND,
                field="params.snapshot_name",
            )
        meta = read_meta(d)
        if meta is None or meta.vm_id != src:
            raise NkudoError(
                f"params.snapshot_name: snapshot {params.snapshot_name!r} of VM {src} has no valid record of this agent "
                "(taken before restore was supported, or not by this host); it cannot be restored",
                code=ErrorCode.SNAPSHOT_INVALID,
                field="params.snapshot_name",
            )
        if meta.provider != self.vms.provider.name:
            raise NkudoError(
                f"params.snapshot_name: snapshot {params.snapshot_name!r} was taken under {meta.provider}; "
                f"this agent runs {self.vms.provider.name}",
                code=ErrorCode.SNAPSHOT_INVALID,
                field="params.snapshot_name",
            )
        return d, meta

    def _target_spec(self, params: A.MicroVMRestore, meta: SnapshotMeta) -> tuple[dict[str, Any], list[str]]:
        """The restored VM's spec and MACs: the snapshot's, or for a clone its own name and MACs."""
        spec = convert(meta.spec, A.MicroVMCreate, prefix="snapshot.spec")  # typed, validated again
        if len(meta.macs) != len(spec.nics):
            raise NkudoError("snapshot record: one MAC per NIC expected", code=ErrorCode.SNAPSHOT_INVALID,
                             field="params.snapshot_name")  # fmt: skip
        macs = list(meta.macs)
        if params.vm_id != meta.vm_id:
            macs = [stable_mac(params.vm_id, i) for i in range(len(spec.nics))]
            spec.name = params.vm_id
            for nic, mac in zip(spec.nics, macs, strict=True):
                nic.mac = mac
        self.vms.check_host_paths(spec)  # the same path rules as a create: inside the image roots
        out = to_builtins(spec)
        out.pop("start", None)
        return out, macs

    # --------------------------------------------------------------------- handler

    def restore(self, ctx: ActionContext, params: A.MicroVMRestore) -> dict[str, Any]:
        snap, meta = self._snapshot(params)
        spec, macs = self._target_spec(params, meta)
        vm_id = params.vm_id
        store = self.vms.store
        p = self.vms.paths(vm_id)
        rec = store.get_vm(vm_id)
        if rec is None:
            store.insert_vm(vm_id, spec["name"], spec, p.runtime_dir, VmStatus.CREATING, create_pending=True)
            rec = self.vms.get(vm_id)
            ctx.log("VM record created for the restore", snapshot=snap)
        elif rec.spec != spec:
            raise NkudoError(
                f"VM {vm_id!r} already exists with a different specification than the snapshot's; delete it first",
                code=ErrorCode.VM_EXISTS,
                field="params.vm_id",
            )
        elif ctx.attempt == 1 and not rec.create_pending and self._live_state(rec, p) is not None:
            raise NkudoError(
                f"VM {vm_id!r} has a live VMM (status {rec.status}); stop or delete it before restoring",
                code=ErrorCode.VM_EXISTS,
                field="params.vm_id",
            )
        ours = rec.create_pending
        try:
            return self._steps(ctx, params, rec, p, snap, macs)
        except Exception as exc:
            if ours:
                rollback_create(ctx, store, self.vms.provider, self.vms.network, vm_id, p)
            else:  # an existing VM: end only the VMM this restore started, keep the record and its files
                cur = store.get_vm(vm_id)
                try:
                    self.vms.provider.stop(p, cur.process if cur else None, graceful_timeout=0, force=True)
                    store.update_vm(vm_id, status=VmStatus.STOPPED, process=None, last_error=f"restore failed: {exc}")
                except Exception as stop_exc:
                    ctx.log("restore failed and its VMM could not be ended", LogLevel.ERROR, error=str(stop_exc))
            raise

    def _live_state(self, rec: VmRecord, p: VmPaths) -> VmStatus | None:
        """The state a recorded, live VMM reports (None: no such VMM, or it holds no VM)."""
        if not rec.process or not self.vms.provider.is_alive(rec.process):
            return None
        return self.vms.provider.state(p, timeout=5.0)

    def _steps(
        self, ctx: ActionContext, params: A.MicroVMRestore, rec: VmRecord, p: VmPaths, snap: str, macs: list[str]
    ) -> dict[str, Any]:
        vm_id = rec.vm_id
        store, provider = self.vms.store, self.vms.provider
        try:
            os.makedirs(p.runtime_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise os_failure(exc, f"cannot create the runtime directory {p.runtime_dir}") from None
        bridges = [n["bridge"] for n in rec.spec.get("nics", [])]
        planned = self.vms.network.ensure_taps(vm_id, list(zip(bridges, macs, strict=True)))
        if rec.taps != [n.tap for n in planned] or rec.nics != planned:
            store.update_vm(vm_id, taps=[n.tap for n in planned], nics=planned)
            ctx.log("TAPs ready", taps=",".join(n.tap for n in planned))
        rec = self.vms.get(vm_id)

        state = self._live_state(rec, p)
        if state in _RESTORED:
            ctx.log("the VM was restored by an earlier attempt of this action", state=str(state))
        else:
            if rec.process:  # a VMM of an interrupted attempt that holds no restored VM: end it first
                provider.stop(p, rec.process, graceful_timeout=0, force=True)
                store.update_vm(vm_id, process=None)
            ctx.check_deadline("preparing the disks")
            self._disks(ctx, rec, p, snap)
            ctx.check_deadline("restoring")
            process = provider.restore(
                self.vms.launch_spec(rec, p),
                p,
                snap,
                timeout=max(ctx.remaining(), 0.1),
                on_spawned=lambda r: store.update_vm(vm_id, process=r, status=VmStatus.CREATING),
            )
            store.update_vm(vm_id, process=process, status=VmStatus.PAUSED, last_error=None)
            ctx.log("VM restored from the snapshot", pid=process.get("pid"), snapshot=snap)
            state = VmStatus.PAUSED
        if params.start and state == VmStatus.PAUSED:
            provider.resume(p, timeout=max(ctx.remaining(), 0.1))
            state = provider.state(p, timeout=min(5.0, max(ctx.remaining(), 0.1)))
            if state != VmStatus.RUNNING:
                raise NkudoError(f"restored VM {vm_id} did not run after resume (state {state})",
                                 code=ErrorCode.RESTORE_FAILED)  # fmt: skip
            ctx.log("restored VM resumed")
        store.update_vm(vm_id, status=state, create_pending=False)
        return self.vms.result(
            self.vms.get(vm_id), state, runtime_dir=p.runtime_dir, macs=macs, snapshot_dir=snap,
            source_vm_id=params.source_vm_id or vm_id,
        )  # fmt: skip

    def _disks(self, ctx: ActionContext, rec: VmRecord, p: VmPaths, snap: str) -> None:
        """The root disk as it was at the snapshot (cloned out of it) and the cloud-init seed."""
        spec = convert(rec.spec, A.MicroVMCreate)
        if spec.image_path and p.rootfs:
            src = os.path.join(snap, ROOTFS_FILE)
            if os.path.isfile(src):
                check_room(src, p.runtime_dir, None)
                try:
                    method = clone_image(src, p.rootfs)
                except OSError as exc:
                    raise os_failure(exc, f"cloning the snapshot's disk {src!r} failed",
                                     field="params.snapshot_name") from None  # fmt: skip
                ctx.log("root disk cloned from the snapshot", method=method)
            else:
                raise NkudoError(
                    f"snapshot {snap} holds no copy of the VM's root disk; it cannot be restored consistently",
                    code=ErrorCode.SNAPSHOT_INVALID,
                    field="params.snapshot_name",
                )
        self.vms.write_seed(ctx, spec, p)
