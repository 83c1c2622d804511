"""Issue 11 (one vocabulary, typed seams): shared enums, error attributes, typed VM records and executor wiring."""

from __future__ import annotations

import ast
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

from nkudo.agent.provider import NicPlan
from nkudo.agent.state import OutboxEntry, OutboxKind, StateStore
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType, ErrorCode, ExecState, ResultStatus
from tests.agent.conftest import Host
from tests.agent.test_lifecycle import _create

SRC = Path(__file__).resolve().parents[2] / "src" / "nkudo"

#: Schema 1 of the agent's state database, as released (``_nics_resolved``/``_create_pending`` in the spec).
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vms (vm_id TEXT PRIMARY KEY, name TEXT NOT NULL, spec TEXT NOT NULL, status TEXT NOT NULL,
    process TEXT, taps TEXT NOT NULL DEFAULT '[]', runtime_dir TEXT NOT NULL, last_error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE actions (action_id TEXT PRIMARY KEY, params_hash TEXT NOT NULL, type TEXT NOT NULL, vm_id TEXT,
    execution_id TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1, started_at REAL NOT NULL,
    ended_at REAL, error_code TEXT, error_message TEXT, result TEXT, logs TEXT NOT NULL DEFAULT '[]');
CREATE INDEX actions_vm ON actions(vm_id);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL,
    payload TEXT NOT NULL, created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    UNIQUE(kind, key));
PRAGMA user_version=1;
"""


def _sources(*parts: str) -> list[Path]:
    out: list[Path] = []
    for part in parts:
        p = SRC / part
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return out


def test_every_error_code_the_agent_side_spells_is_registered() -> None:
    """Issue 11: error codes are defined once (``ErrorCode``); a code spelt anywhere on the agent side, in the
    wire layer, the CLI or the hypervisor/network/process error modules must be in the registry."""
    spelt = re.compile(r"""\bcode\s*=\s*(?:"([A-Z][A-Z0-9_]+)"|ErrorCode\.([A-Z][A-Z0-9_]+))""")
    files = _sources("agent", "wire", "cli", "errors.py", "chapi/errors.py", "qmp/errors.py", "net", "proc/errors.py")
    missing = {
        f"{f.relative_to(SRC)}: {m.group(1) or m.group(2)}"
        for f in files
        for m in spelt.finditer(f.read_text())
        if (m.group(1) or m.group(2)) not in ErrorCode.__members__
    }
    assert not missing, sorted(missing)


def _vocabulary() -> set[str]:
    words: set[str] = set()
    for enum_ in (ResultStatus, ExecState, ActionType, VmStatus, ErrorCode):
        words |= {m.value for m in enum_}
    return words


def _literal_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants compared against, used as dict keys or set/tuple members of a comparison."""
    found: list[tuple[int, str]] = []

    def consts(node: ast.AST) -> list[tuple[int, str]]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [(node.lineno, node.value)]
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return [c for e in node.elts for c in consts(e)]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("frozenset", "set"):
            return [c for a in node.args for c in consts(a)]
        return []

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found += consts(side)
        elif isinstance(node, ast.Dict):
            found += [c for k in node.keys if k is not None for c in consts(k) if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call | ast.Set | ast.Tuple):
            found += consts(node.value)
        elif isinstance(node, ast.keyword) and node.arg in ("status", "state", "type", "code", "error_code"):
            found += consts(node.value)
    return found


def test_agent_and_cli_compare_no_vocabulary_string_literals() -> None:
    """Issue 11: no module compares against a string literal of another module's vocabulary. Statuses, states,
    action types and error codes in the agent and the CLI come from ``nkudo.wire.vocab`` / ``nkudo.vmstate``
    (``agent/state.py`` had ``TERMINAL = frozenset({"SUCCEEDED", ...})``, the daemon ``status == "NOT_RUN"``,
    metrics a dict keyed by status strings, the CLI ``a.type == "MicroVMCreate"``)."""
    words = _vocabulary()
    bad = [
        f"{f.relative_to(SRC)}:{line}: {value!r}"
        for f in _sources("agent", "cli")
        for line, value in _literal_uses(ast.parse(f.read_text()))
        if value in words
    ]
    assert not bad, bad


def test_schema_1_state_database_opens_with_typed_vm_fields(tmp_path: Path) -> None:
    """Issue 11: the stored VM spec had hidden ``_nics_resolved`` / ``_create_pending`` keys; they are now columns
    of the VM record. A state database written by the previous agent must still open: the keys are moved out of
    the spec (once, atomically) and its actions and queued reports are kept."""
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "agent.db")
    db.executescript(V1_SCHEMA)
    spec = {"vm_id": "vm-1", "name": "web", "vcpus": 2, "memory_mib": 256, "kernel_path": "/k",
            "nics": [{"bridge": "br0"}], "_nics_resolved": [["nkt-abc", "02:00:00:00:00:01", "br0"]],
            "_create_pending": True}  # fmt: skip
    plain = {"vm_id": "vm-2", "name": "db", "vcpus": 1, "memory_mib": 128, "kernel_path": "/k", "nics": []}
    db.executemany(
        "INSERT INTO vms(vm_id, name, spec, status, runtime_dir, created_at, updated_at) VALUES(?,?,?,?,?,1,1)",
        [("vm-1", "web", json.dumps(spec), "CREATING", "/r/vm-1"), ("vm-2", "db", json.dumps(plain), "STOPPED", "/r/vm-2")],
    )
    db.execute("INSERT INTO actions(action_id, params_hash, type, state, started_at, ended_at) "
               "VALUES('a1', 'h', 'MicroVMStart', 'SUCCEEDED', 1, 2)")  # fmt: skip
    db.execute("INSERT INTO outbox(kind, key, payload, created_at) VALUES('result', 'e1', '{}', 1)")
    db.commit()
    db.close()

    for _ in range(2):  # a second open finds nothing to migrate
        store = StateStore(str(state))
        try:
            vm1, vm2 = store.list_vms()
            assert vm1.spec == {k: v for k, v in spec.items() if not k.startswith("_")}
            assert vm1.nics == [NicPlan(tap="nkt-abc", mac="02:00:00:00:00:01", bridge="br0")]
            assert vm1.create_pending is True
            assert (vm2.spec, vm2.nics, vm2.create_pending) == (plain, [], False)
            rec = store.get_action("a1")
            assert rec is not None and rec.terminal and rec.result_status is ResultStatus.SUCCEEDED
            (queued,) = store.outbox_peek()
            assert (queued.kind, queued.key, queued.payload) == (OutboxKind.RESULT, "e1", "{}")
            (ver,) = store._db.execute("PRAGMA user_version").fetchone()
            assert ver == 2
        finally:
            store.close()


def test_store_round_trips_typed_fields(tmp_path: Path) -> None:
    """Issue 11: NICs, the create-pending mark and outbox entries are typed values, stored outside the spec."""
    store = StateStore(str(tmp_path / "s"))
    try:
        spec: dict[str, Any] = {"vm_id": "vm-1", "nics": [{"bridge": "br0"}]}
        store.insert_vm("vm-1", "web", spec, "/r", VmStatus.CREATING, create_pending=True)
        nics = [NicPlan(tap="nkt-1", mac="02:00:00:00:00:02", bridge="br0")]
        store.update_vm("vm-1", nics=nics, taps=["nkt-1"])
        rec = store.get_vm("vm-1")
        assert rec is not None and rec.spec == spec and rec.nics == nics and rec.create_pending
        store.update_vm("vm-1", create_pending=False)
        rec = store.get_vm("vm-1")
        assert rec is not None and not rec.create_pending and rec.nics == nics
        store.enqueue(OutboxEntry(OutboxKind.LOGS, "e1", "{}"))
        store.enqueue(OutboxEntry(OutboxKind.LOGS, "e1", "{}"))  # once per (kind, key)
        assert [(q.kind, q.key) for q in store.outbox_peek()] == [(OutboxKind.LOGS, "e1")]
    finally:
        store.close()


def test_created_vm_spec_has_no_hidden_keys_and_an_upgraded_database_restarts_it(host: Host) -> None:
    """Issue 11: a created VM's stored spec is exactly the plan's params (the resolved NICs are a column), and a
    VM recorded by the previous agent (schema 1, NICs hidden in the spec) is started with the same TAP and MAC."""
    h = host
    rc, doc, err = h.apply([_create(h)])
    assert rc == 0, (doc, err)
    tap, mac = doc["outcomes"][0]["result"]["taps"][0], doc["outcomes"][0]["result"]["macs"][0]
    db = sqlite3.connect(h.state / "agent.db")
    spec_text, nics_text, pending = db.execute("SELECT spec, nics, create_pending FROM vms").fetchone()
    assert not [k for k in json.loads(spec_text) if k.startswith("_")]
    assert json.loads(nics_text) == [[tap, mac, "br0"]] and pending == 0

    # Turn the database back into schema 1, as the previous agent wrote it, with the VMM gone.
    stop = {"action_id": "stop-1", "type": "MicroVMStop", "params": {"vm_id": "vm-1", "force": True}}
    rc, doc, err = h.apply([stop])
    assert rc == 0, (doc, err)
    spec = json.loads(spec_text) | {"_nics_resolved": json.loads(nics_text)}
    db.execute("UPDATE vms SET spec=?", (json.dumps(spec),))
    db.execute("ALTER TABLE vms DROP COLUMN nics")
    db.execute("ALTER TABLE vms DROP COLUMN create_pending")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()

    start = {"action_id": "start-1", "type": "MicroVMStart", "params": {"vm_id": "vm-1"}}
    rc, doc, err = h.apply([start])
    assert rc == 0, (doc, err)
    assert doc["outcomes"][0]["result"]["status"] == "RUNNING"
    assert h.requests("vm.create")[-1]["body"]["net"] == [{"tap": tap, "mac": mac, "id": "net0"}]


def test_daemon_executor_gets_its_callbacks_at_construction(tmp_path: Path) -> None:
    """Issue 11: the daemon's executor callbacks are passed when it is built, not patched onto the agent's
    executor afterwards (which silently changed what ``agent.executor`` did for every other caller)."""
    from nkudo.agent.daemon import Daemon, DaemonConfig, outbox_messages
    from nkudo.agent.identity import Identity, Pki
    from nkudo.agent.runtime import Agent, AgentConfig

    agent = Agent(AgentConfig(state_dir=str(tmp_path / "s"), runtime_dir=str(tmp_path / "v"),
                              snapshot_dir=str(tmp_path / "n")))  # fmt: skip
    try:
        ident = Identity("a", "t", "s", "h", "https://cp.invalid:1", "host", "now")
        d = Daemon(agent, ident, Pki(str(tmp_path / "pki")), None, DaemonConfig())  # type: ignore[arg-type]
        assert agent.executor.outbox_for is None and agent.executor.on_outcome is None
        assert d.executor.outbox_for is outbox_messages and d.executor.on_outcome is not None
        assert d.executor.handlers is agent.handlers
    finally:
        agent.close()
