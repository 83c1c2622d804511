"""``POST /sites/{id}/plans`` refuses what the agent would refuse, with a 400 naming the field (issue 10).

Items 2 (identifiers ending in a newline), 7 (lax MACs, commands, args and action ids) and 10 (a deeply
nested body was a 500). The control plane calls the same ``nkudo.wire`` functions as the agent's parser.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from .helpers import Tenant, create_action


def _submit(tenant: Tenant, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, data = tenant.client.raw("POST", f"/sites/{tenant.site_id}/plans", raw)
    return status, json.loads(data)


def _plan(*actions: dict[str, Any]) -> dict[str, Any]:
    return {"idempotency_key": uuid.uuid4().hex, "actions": list(actions)}


def _command(**params: Any) -> dict[str, Any]:
    return {"type": "CommandExecute", "params": {"command": "/bin/true", **params}}


BAD = [
    ("vm_id-newline", _plan(create_action("nl\n")), "actions[0].params.vm_id"),
    ("snapshot-newline", _plan({"type": "MicroVMSnapshot", "params": {"vm_id": "v", "snapshot_name": "s\n"}}),
     "actions[0].params.snapshot_name"),
    ("action_id-newline", _plan({**create_action("v"), "action_id": "a\n"}), "actions[0].action_id"),
    ("idempotency_key-newline", {**_plan(create_action("v")), "idempotency_key": "k\n"}, "idempotency_key"),
    ("mac-multicast", _plan(create_action("v", nics=[{"bridge": "br0", "mac": "01:00:5e:00:00:01"}])),
     "actions[0].params.nics[0].mac"),
    ("mac-broadcast", _plan(create_action("v", nics=[{"bridge": "br0", "mac": "ff:ff:ff:ff:ff:ff"}])),
     "actions[0].params.nics[0].mac"),
    ("mac-twice", _plan(create_action("v", nics=[{"bridge": "br0", "mac": "52:54:00:00:00:07"},
                                                 {"bridge": "br1", "mac": "52:54:00:00:00:07"}])),
     "actions[0].params.nics[1].mac"),
    ("command-relative", _plan(_command(command="true")), "actions[0].params.command"),
    ("arg-nul", _plan(_command(args=["-c", "a\x00b"])), "actions[0].params.args[1]"),
    ("action_id-duplicate", _plan({**_command(), "action_id": "x"}, {**_command(), "action_id": "x"}),
     "actions[1].action_id"),
]


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in BAD], ids=[i for i, _, _ in BAD])
def test_plan_submit_refuses_what_the_agent_refuses(tenant: Tenant, body: dict[str, Any], field: str) -> None:
    """Issue 10 items 2 and 7: vm_id "nl\\n", multicast/broadcast/repeated MACs, a relative command, NUL in
    args and duplicate action ids are a 400 naming the field at submit, not a failure on the agent later."""
    status, out = _submit(tenant, body)
    assert status == 400, out
    assert out["error"]["code"] == "INVALID_ARGUMENT"
    assert out["error"]["field"] == field, out


def test_names_with_trailing_newline_or_controls_are_refused(tenant: Tenant) -> None:
    """Issue 10 item 2: tenant slugs and free-text names ending in a newline (or holding controls) are a 400."""
    admin = tenant.server.client(admin=True)
    try:
        for body, field in (({"slug": "acme\n", "name": "Acme"}, "slug"),
                            ({"slug": "t-" + uuid.uuid4().hex[:8], "name": "Acme\n"}, "name"),
                            ({"slug": "t-" + uuid.uuid4().hex[:8], "name": "Ac\u202eme"}, "name")):
            status, _, data = admin.raw("POST", "/tenants", json.dumps(body).encode())
            assert status == 400, data
            assert json.loads(data)["error"]["field"] == field
    finally:
        admin.close()
    status, _, data = tenant.client.raw("POST", f"/tenants/{tenant.tenant_id}/sites",
                                        json.dumps({"name": "edge\n"}).encode())
    assert status == 400 and json.loads(data)["error"]["field"] == "name", data


@pytest.mark.parametrize("depth", [100000, 3000])
def test_deeply_nested_plan_is_a_validation_error(tenant: Tenant, depth: int) -> None:
    """Issue 10 item 10: a plan body nested ``depth`` deep is a 400 with a code, not a 500 RecursionError."""
    body = b'{"idempotency_key": "k", "actions": [{"type": "MicroVMStart", "params": {"vm_id": ' + (
        b"[" * depth + b"]" * depth) + b"}}]}"
    status, out = _submit(tenant, body)
    assert status == 400, out
    assert out["error"]["code"] == "INVALID_ARGUMENT" and out["error"]["message"]
    # The service still answers normally afterwards.
    assert tenant.plan([create_action("after-deep")])["plan_status"]
