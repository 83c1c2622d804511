"""Undo a failed MicroVMCreate: nothing a failed create made may outlive it (issue 10 item 9).

Why a separate step rather than ``finally`` blocks in the handler: the create
is re-driven after a crash, so what exists when it fails is not only what this
attempt made. The rollback therefore works from what is *there* (the record's
VMM, TAPs carrying the VM's owner marker, the runtime directory holding the
clone, the seed and the logs) and undoes it in reverse order of creation.

Only a VM whose create never completed is rolled back (the record's
``create_pending`` is set from insert until the create succeeds); a failed
re-create of a VM that already exists never tears it down.

The record goes last, and only if everything else went: if a step fails, the
record stays (status ``ERROR``, ``last_error`` saying what is left) so a
MicroVMDelete can finish the job, and nothing is ever orphaned.
"""

from __future__ import annotations

import os
import shutil
from typing import Protocol

from nkudo.agent.disks import fsync_dir
from nkudo.agent.executor import ActionContext
from nkudo.agent.provider import Provider, VmPaths
from nkudo.agent.state import StateStore
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import LogLevel

_LOG_TAIL = 2048


class TapRemover(Protocol):
    """The one NetworkPort method the rollback needs (importing vms' NetworkPort would be a cycle)."""

    def remove_taps(self, vm_id: str) -> list[str]:
        """Delete every TAP owned by ``vm_id``; return their names."""


def rollback_create(
    ctx: ActionContext,
    store: StateStore,
    provider: Provider,
    network: TapRemover,
    vm_id: str,
    p: VmPaths,
) -> bool:
    """Remove the VMM, TAPs, runtime directory (clone, ``.partial``, seed, logs) and record.

    Returns whether everything went. Each step is attempted even if an earlier one failed.
    """
    left: list[str] = []
    rec = store.get_vm(vm_id)
    try:
        # Always through the provider (as delete does): it also ends a VMM found only by its marker.
        provider.stop(p, rec.process if rec else None, graceful_timeout=0, force=True)
        if rec is not None and rec.process:
            store.update_vm(vm_id, process=None)
    except Exception as exc:
        left.append(f"VMM ({type(exc).__name__}: {exc})")
    try:
        removed = network.remove_taps(vm_id)
        if removed:
            ctx.log("rollback: TAPs removed", taps=",".join(removed))
    except Exception as exc:
        left.append(f"TAPs ({type(exc).__name__}: {exc})")
    tail = _log_tail(p.vmm_log)
    if tail:
        # The error message points at vmm.log, which is about to go: keep its end in the action log.
        ctx.log("rollback: end of the VMM log", LogLevel.WARN, vmm_log=tail)
    try:
        if os.path.isdir(p.runtime_dir):
            shutil.rmtree(p.runtime_dir)
            fsync_dir(os.path.dirname(p.runtime_dir))
    except OSError as exc:
        left.append(f"runtime directory {p.runtime_dir} ({exc.strerror or exc})")
    if rec is not None:
        if left:
            what = "; ".join(left)
            msg = f"create failed and could not be fully rolled back; MicroVMDelete removes: {what}"
            store.update_vm(vm_id, status=VmStatus.ERROR, last_error=msg)
            ctx.log(msg, LogLevel.ERROR)
        else:
            store.delete_vm(vm_id)
    if not left:
        ctx.log("rollback: failed create undone", LogLevel.WARN)
    return not left


def _log_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - _LOG_TAIL, 0))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
