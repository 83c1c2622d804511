"""The agent's plan parser and ``nkudo-edge apply`` refuse issue 10's malformed plans with a code and a field.

Items 2 (identifiers ending in a newline), 7 (cross-field rules now shared with the control plane through
``nkudo.wire``) and 10 (a deeply nested plan file was "internal error: RecursionError").
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.plan import parse_plan
from nkudo.errors import ValidationError

EDGE = str(Path(sys.executable).parent / "nkudo-edge")

CREATE: dict[str, Any] = {
    "action_id": "a1",
    "type": "MicroVMCreate",
    "params": {
        "vm_id": "vm-1",
        "name": "web",
        "vcpus": 1,
        "memory_mib": 128,
        "kernel_path": "/var/lib/nkudo-edge/images/vmlinux",
        "nics": [{"bridge": "br0"}],
    },
}
COMMAND: dict[str, Any] = {"action_id": "c1", "type": "CommandExecute", "params": {"command": "/bin/true"}}


def _create(**params: Any) -> dict[str, Any]:
    doc = copy.deepcopy(CREATE)
    doc["params"].update(params)
    return doc


def _command(**params: Any) -> dict[str, Any]:
    doc = copy.deepcopy(COMMAND)
    doc["params"].update(params)
    return doc


def _apply(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    return subprocess.run(
        [EDGE, "--state-dir", str(tmp_path / "state"), "apply", "--plan", str(plan),
         "--runtime-dir", str(tmp_path / "vms"), "--snapshot-dir", str(tmp_path / "snaps")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


BAD_PLANS = [
    ("vm_id-newline", [_create(vm_id="nl\n")], "actions[0].params.vm_id"),
    ("name-newline", [_create(name="web\n")], "actions[0].params.name"),
    ("action_id-newline", [{**CREATE, "action_id": "a1\n"}], "actions[0].action_id"),
    ("bridge-newline", [_create(nics=[{"bridge": "br0\n"}])], "actions[0].params.nics[0].bridge"),
    ("path-newline", [_create(kernel_path="/k/vmlinux\n")], "actions[0].params.kernel_path"),
    ("path-hides-dotdot", [_create(kernel_path="/a\n/../etc/shadow")], "actions[0].params.kernel_path"),
    ("mac-multicast", [_create(nics=[{"bridge": "br0", "mac": "01:00:5e:00:00:01"}])],
     "actions[0].params.nics[0].mac"),
    ("mac-broadcast", [_create(nics=[{"bridge": "br0", "mac": "ff:ff:ff:ff:ff:ff"}])],
     "actions[0].params.nics[0].mac"),
    ("mac-zero", [_create(nics=[{"bridge": "br0", "mac": "00:00:00:00:00:00"}])],
     "actions[0].params.nics[0].mac"),
    ("mac-twice", [_create(nics=[{"bridge": "br0", "mac": "52:54:00:00:00:01"},
                                 {"bridge": "br1", "mac": "52:54:00:00:00:01".upper()}])],
     "actions[0].params.nics[1].mac"),
    ("command-relative", [_command(command="true")], "actions[0].params.command"),
    ("arg-nul", [_command(args=["ok", "a\x00b"])], "actions[0].params.args[1]"),
    ("action_id-duplicate", [COMMAND, {**COMMAND}], "actions[1].action_id"),
]


@pytest.mark.parametrize(("actions", "field"), [(a, f) for _, a, f in BAD_PLANS], ids=[i for i, _, _ in BAD_PLANS])
def test_parser_refuses_naming_the_field(actions: list[dict[str, Any]], field: str) -> None:
    """Issue 10 items 2 and 7: newline-suffixed identifiers and lax cross-field values are validation errors."""
    with pytest.raises(ValidationError) as ei:
        parse_plan({"actions": actions})
    assert ei.value.code == "INVALID_ARGUMENT"
    assert ei.value.field == field, ei.value.field


def test_edge_apply_refuses_vm_id_with_trailing_newline(tmp_path: Path) -> None:
    """Issue 10 item 2: ``nkudo-edge apply`` refuses vm_id "nl\\n" (a VM that could never be deleted)."""
    r = _apply(tmp_path, json.dumps({"actions": [_create(vm_id="nl\n")]}))
    assert r.returncode == 1, r.stderr
    assert "INVALID_ARGUMENT" in r.stderr and "actions[0].params.vm_id" in r.stderr, r.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "vms").exists()


@pytest.mark.parametrize("opener", ["[", '{"actions":'])
def test_edge_apply_refuses_deeply_nested_plan(tmp_path: Path, opener: str) -> None:
    """Issue 10 item 10: a plan nested 100000 deep is a validation error, not "internal error: RecursionError"."""
    closer = "]" if opener == "[" else "}"
    r = _apply(tmp_path, opener * 100000 + closer * 100000)
    assert r.returncode == 1, r.stderr
    assert "INVALID_ARGUMENT" in r.stderr and "nested too deeply" in r.stderr, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr and "RecursionError" not in r.stderr
    r = _apply(tmp_path, json.dumps({"actions": [_create(cloud_init=json.loads("[" * 500 + "]" * 500))]}))
    assert r.returncode == 1 and "actions[0].params.cloud_init" in r.stderr, r.stderr
