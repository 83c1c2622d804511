"""Executor: idempotency by action id + parameter hash, conflict detection, crash re-drive, results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.executor import ActionContext, Executor
from nkudo.agent.hostcmd import normalise_allowlist, run_command
from nkudo.agent.plan import parse_plan
from nkudo.agent.state import StateStore
from nkudo.errors import NkudoError


def _cmd_plan(*steps: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {
        "actions": [
            {"action_id": a, "type": "CommandExecute", "params": {"command": c, "args": args}}
            for a, c, args in steps
        ]
    }


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(str(tmp_path / "state"))
    yield s
    s.close()


def _counting_executor(store: StateStore, marker: Path) -> Executor:
    allow = normalise_allowlist(["/bin/sh"])

    def handler(ctx: ActionContext, params: Any) -> dict[str, Any]:
        return run_command(params.command, list(params.args), cwd="/", timeout=5, allow=allow)

    return Executor(store, {"CommandExecute": handler})


def test_redelivery_returns_recorded_result_without_running(store: StateStore, tmp_path: Path) -> None:
    count = tmp_path / "count"
    script = f"echo x >> {count}; echo ran"
    _, actions = parse_plan(_cmd_plan(("a1", "/bin/sh", ["-c", script])))
    ex = _counting_executor(store, count)
    first = ex.execute(actions[0])
    again = ex.execute(actions[0])
    assert first.ok and again.ok and again.replayed and not first.replayed
    assert count.read_text().count("x") == 1  # the command ran exactly once
    assert again.result["stdout"] == "ran\n" == first.result["stdout"]
    # A new agent process on the same state directory also replays it.
    store2 = StateStore(store.path.rsplit("/", 1)[0])
    assert _counting_executor(store2, count).execute(actions[0]).replayed
    assert count.read_text().count("x") == 1


def test_same_id_different_params_is_a_conflict(store: StateStore, tmp_path: Path) -> None:
    _, (a,) = parse_plan(_cmd_plan(("a1", "/bin/sh", ["-c", "true"])))
    _, (b,) = parse_plan(_cmd_plan(("a1", "/bin/sh", ["-c", "echo other"])))
    ex = _counting_executor(store, tmp_path / "c")
    assert ex.execute(a).ok
    out = ex.execute(b)
    assert out.status == "FAILED" and out.error_code == "ACTION_CONFLICT"
    assert "different parameters" in (out.error_message or "")
    assert store.get_action("a1").params_hash == a.params_hash  # type: ignore[union-attr]


def test_interrupted_command_is_not_run_twice(store: StateStore, tmp_path: Path) -> None:
    _, (a,) = parse_plan(_cmd_plan(("a1", "/bin/sh", ["-c", "true"])))
    store.begin_action(a.action_id, a.params_hash, a.type, None, None)  # as if the agent died mid-command
    out = _counting_executor(store, tmp_path / "c").execute(a)
    assert out.status == "FAILED" and out.error_code == "INTERRUPTED"
    assert store.get_action("a1").terminal  # type: ignore[union-attr]


def test_interrupted_vm_action_is_redriven(store: StateStore) -> None:
    calls: list[int] = []

    def handler(ctx: ActionContext, params: Any) -> dict[str, Any]:
        calls.append(ctx.attempt)
        return {"vm_id": params.vm_id}

    _, (a,) = parse_plan(
        {"actions": [{"action_id": "p1", "type": "MicroVMPause", "params": {"vm_id": "v1"}}]}
    )
    store.begin_action(a.action_id, a.params_hash, a.type, a.vm_id, None)
    out = Executor(store, {"MicroVMPause": handler}).execute(a)
    assert out.ok and calls == [2] and out.attempts == 2
    assert any("resuming after an agent restart" in line["message"] for line in out.logs)


def test_handler_errors_and_timeouts_become_results(store: StateStore) -> None:
    def fail(ctx: ActionContext, params: Any) -> dict[str, Any]:
        raise NkudoError("VM v1 does not exist on this host", code="VM_NOT_FOUND")

    def crash(ctx: ActionContext, params: Any) -> dict[str, Any]:
        raise ZeroDivisionError("boom")

    def slow(ctx: ActionContext, params: Any) -> dict[str, Any]:
        time.sleep(0.3)
        ctx.check_deadline("waiting")
        return {}

    ex = Executor(store, {"MicroVMStart": fail, "MicroVMStop": crash, "MicroVMPause": slow})
    _, acts = parse_plan({"actions": [
        {"action_id": "s", "type": "MicroVMStart", "params": {"vm_id": "v1"}},
        {"action_id": "t", "type": "MicroVMStop", "params": {"vm_id": "v1"}},
        {"action_id": "p", "type": "MicroVMPause", "params": {"vm_id": "v1"}, "timeout_seconds": 0.1},
        {"action_id": "r", "type": "MicroVMResume", "params": {"vm_id": "v1"}},
    ]})  # fmt: skip
    o = [ex.execute(a) for a in acts]
    assert (o[0].status, o[0].error_code) == ("FAILED", "VM_NOT_FOUND")
    assert (o[1].status, o[1].error_code) == ("FAILED", "INTERNAL") and "ZeroDivisionError" in (
        o[1].error_message or ""
    )
    assert (o[2].status, o[2].error_code) == ("TIMED_OUT", "TIMED_OUT")
    assert (o[3].status, o[3].error_code) == ("FAILED", "UNSUPPORTED_ACTION")
    for out in o:
        assert out.started_at and out.ended_at and out.ended_at >= out.started_at
        rec = store.get_action(out.action_id)
        assert rec is not None and rec.state == out.status and rec.error_code == out.error_code
        assert rec.logs and rec.logs[-1]["level"] == "ERROR"


def test_state_survives_sigkill_mid_write(tmp_path: Path) -> None:
    """A writer killed at random moments never leaves a corrupt or half-written database."""
    state = tmp_path / "s"
    code = (
        "import sys; sys.path[:0] = " + repr(sys.path) + "\n"
        "from nkudo.agent.state import StateStore\n"
        "s = StateStore(sys.argv[1]); i = 0\n"
        "while True:\n"
        "    s.begin_action(f'a{i}', 'h', 'CommandExecute', None, None)\n"
        "    s.finish_action(f'a{i}', 'SUCCEEDED', error_code=None, error_message=None, result={'i': i}, logs=[])\n"
        "    i += 1\n"
    )
    for delay in (0.05, 0.13, 0.21):
        p = subprocess.Popen([sys.executable, "-c", code, str(state)])
        time.sleep(delay + 0.3)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        s = StateStore(str(state))
        assert s._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        recs = s.list_actions()
        running = [r for r in recs if not r.terminal]
        assert len(running) <= 1  # at most the one in flight at the kill
        assert all(r.result == {"i": int(r.action_id[1:])} for r in recs if r.terminal)
        s.close()
    assert oct(os.stat(state / "agent.db").st_mode & 0o777) == "0o600"
