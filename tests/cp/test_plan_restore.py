"""Issue 15 (MicroVMRestore): the control plane accepts the action in plans through the shared ``nkudo.wire``
schema, refuses a malformed one with a 400 naming the field, and knows the VM state a restore leaves."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from nkudo.cp.domain import create_starts_vm, vm_state_after
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ExecState

from .helpers import Tenant


def _restore(**params: Any) -> dict[str, Any]:
    return {"type": "MicroVMRestore", "params": params}


def test_plan_with_restore_is_accepted(tenant: Tenant) -> None:
    """Issue 15: a plan restoring a VM and cloning another from its snapshot is accepted as sent."""
    out = tenant.plan([_restore(vm_id="vm-1", snapshot_name="s1"),
                       _restore(vm_id="vm-2", snapshot_name="s1", source_vm_id="vm-1", start=False)])  # fmt: skip
    assert out["plan_status"], out


BAD = [
    ("no-snapshot", _restore(vm_id="v"), "actions[0].params.snapshot_name"),
    ("snapshot-newline", _restore(vm_id="v", snapshot_name="s\n"), "actions[0].params.snapshot_name"),
    ("source-dotdot", _restore(vm_id="v", snapshot_name="s", source_vm_id=".."), "actions[0].params.source_vm_id"),
    ("start-text", _restore(vm_id="v", snapshot_name="s", start="yes"), "actions[0].params.start"),
    ("unknown-field", _restore(vm_id="v", snapshot_name="s", memory_mib=64), "actions[0].params.memory_mib"),
]


@pytest.mark.parametrize(("action", "field"), [(a, f) for _, a, f in BAD], ids=[i for i, _, _ in BAD])
def test_malformed_restore_is_refused_naming_the_field(tenant: Tenant, action: dict[str, Any], field: str) -> None:
    """Issue 15: a malformed MicroVMRestore is a 400 INVALID_ARGUMENT naming the field, at submit."""
    body = json.dumps({"idempotency_key": uuid.uuid4().hex, "actions": [action]}).encode()
    status, _, data = tenant.client.raw("POST", f"/sites/{tenant.site_id}/plans", body)
    out = json.loads(data)
    assert status == 400, out
    assert out["error"]["code"] == "INVALID_ARGUMENT" and out["error"]["field"] == field, out


def test_vm_state_after_restore() -> None:
    """Issue 15: a restore leaves the VM running, or paused with ``start: false``; a failed one says nothing."""
    params: dict[str, object] = {"vm_id": "v", "snapshot_name": "s", "start": False}
    assert create_starts_vm("MicroVMRestore", params) is False
    assert vm_state_after("MicroVMRestore", ExecState.SUCCEEDED, start=True) == VmStatus.RUNNING
    assert vm_state_after("MicroVMRestore", ExecState.SUCCEEDED, start=False) == VmStatus.PAUSED
    assert vm_state_after("MicroVMRestore", ExecState.FAILED) is None
