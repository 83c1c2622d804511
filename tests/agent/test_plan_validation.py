"""The bad-input battery: every malformed plan is refused with a code and the field's path, and nothing changes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.plan import parse_plan
from nkudo.errors import ValidationError

EDGE = str(Path(sys.executable).parent / "nkudo-edge")

GOOD_CREATE: dict[str, Any] = {
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


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(base or GOOD_CREATE)
    keys = path.split(".")
    cur: Any = doc
    for k in keys[:-1]:
        cur = cur[int(k)] if isinstance(cur, list) else cur[k]
    last = keys[-1]
    if value is _DELETE:
        del cur[last]
    else:
        cur[int(last) if isinstance(cur, list) else last] = value
    return doc


_DELETE = object()

BAD_ACTIONS = [
    ("params.vm_id", "../../etc", "actions[0].params.vm_id"),
    ("params.vm_id", "a/b", "actions[0].params.vm_id"),
    ("params.vm_id", "", "actions[0].params.vm_id"),
    ("params.vm_id", "x" * 65, "actions[0].params.vm_id"),
    ("params.vm_id", ".hidden", "actions[0].params.vm_id"),
    ("params.name", "a b", "actions[0].params.name"),
    ("params.vcpus", 0, "actions[0].params.vcpus"),
    ("params.vcpus", -1, "actions[0].params.vcpus"),
    ("params.vcpus", "2", "actions[0].params.vcpus"),
    ("params.memory_mib", 10 * 1024 * 1024 * 1024, "actions[0].params.memory_mib"),
    ("params.kernel_path", "relative/vmlinux", "actions[0].params.kernel_path"),
    ("params.kernel_path", "/images/../../etc/shadow", "actions[0].params.kernel_path"),
    ("params.nics.0.bridge", "this-bridge-name-is-too-long", "actions[0].params.nics[0].bridge"),
    ("params.nics.0.mac", "zz:zz", "actions[0].params.nics[0].mac"),
    ("params.unexpected", 1, "actions[0].params.unexpected"),
    ("params.vm_id", _DELETE, "actions[0].params.vm_id"),
    ("action_id", "../x", "actions[0].action_id"),
    ("action_id", _DELETE, "actions[0].action_id"),
    ("type", "MicroVMExplode", "actions[0].type"),
    ("timeout_seconds", -5, "actions[0].timeout_seconds"),
    ("timeout_seconds", 10**9, "actions[0].timeout_seconds"),
    ("extra", True, "actions[0].extra"),
]


@pytest.mark.parametrize(
    ("path", "value", "field"), BAD_ACTIONS, ids=[f"{p}={str(v)[:12]}" for p, v, _ in BAD_ACTIONS]
)
def test_bad_action_rejected_naming_field(path: str, value: Any, field: str) -> None:
    doc = {"actions": [_with(path, value)]}
    with pytest.raises(ValidationError) as ei:
        parse_plan(doc)
    assert ei.value.code == "INVALID_ARGUMENT"
    assert ei.value.field is not None and ei.value.field.startswith(field.rsplit(".", 1)[0]), ei.value.field
    assert field.split(".")[-1].split("[")[0] in str(ei.value)


@pytest.mark.parametrize(
    "params",
    [
        {"vm_id": "v", "snapshot_name": "../x"},
        {"vm_id": "v", "snapshot_name": "a/b"},
        {"vm_id": "..", "snapshot_name": "s"},
    ],
)
def test_snapshot_names_cannot_traverse(params: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        parse_plan({"actions": [{"action_id": "s", "type": "MicroVMSnapshot", "params": params}]})


def test_plan_shape_errors() -> None:
    for doc, field in (
        ({}, "actions"),
        ({"actions": []}, "actions"),
        ({"actions": "x"}, "actions"),
        ({"actions": [GOOD_CREATE], "oops": 1}, "oops"),
        ({"actions": [GOOD_CREATE, GOOD_CREATE]}, "actions[1].action_id"),
        ({"actions": [42]}, "actions[0]"),
    ):
        with pytest.raises(ValidationError) as ei:
            parse_plan(doc)
        assert ei.value.field == field, (doc, ei.value.field)


def test_good_plan_parses_and_hash_is_canonical() -> None:
    _, (a,) = parse_plan({"actions": [GOOD_CREATE]})
    explicit = _with("params.start", True)
    _, (b,) = parse_plan({"actions": [explicit]})
    assert a.params_hash == b.params_hash  # an explicit default does not change identity
    _, (c,) = parse_plan({"actions": [_with("params.vcpus", 2)]})
    assert c.params_hash != a.params_hash
    assert a.timeout == 300 and a.vm_id == "vm-1"


def test_cli_rejects_bad_plan_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {"actions": [{**GOOD_CREATE}, _with("params.vcpus", 0, {**GOOD_CREATE, "action_id": "a2"})]}
        )
    )
    r = subprocess.run(
        [EDGE, "--state-dir", str(state), "apply", "--plan", str(plan), "--runtime-dir", str(tmp_path / "vms"), "--snapshot-dir", str(tmp_path / "snaps")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "actions[1].params.vcpus" in r.stderr
    assert r.stdout == ""
    assert not state.exists() and not (tmp_path / "vms").exists()  # validated before anything was created
    for bad in ("{not json", ""):
        plan.write_text(bad)
        r = subprocess.run(
            [EDGE, "--state-dir", str(state), "apply", "--plan", str(plan)], capture_output=True, text=True
        )
        assert r.returncode == 1 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [EDGE, "apply", "--plan", str(tmp_path / "missing.json")], capture_output=True, text=True
    )
    assert r.returncode == 1 and "cannot read plan" in r.stderr
    assert os.path.exists(plan)
