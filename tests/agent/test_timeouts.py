"""Issue 10 item 14: "this was a timeout" is a property of the error type, for every provider.

The executor used to compare error-code strings (``TIMED_OUT``, ``CH_TIMEOUT``),
so a QEMU provider whose QMP call timed out (``QMP_TIMEOUT``) was reported as
FAILED while the same situation on Cloud Hypervisor was TIMED_OUT.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
import time
from pathlib import Path
from typing import Any

import nkudo
from nkudo.agent.executor import ActionContext, Executor
from nkudo.agent.hostcmd import normalise_allowlist, run_command
from nkudo.agent.plan import parse_plan
from nkudo.agent.state import StateStore
from nkudo.errors import NkudoError
from tests.agent.conftest import Host
from tests.agent.test_lifecycle import _act, _create
from tests.conftest import live_pids

SRC = Path(nkudo.__file__).parent
#: Importing the Alembic environment outside Alembic fails by design; it defines no errors.
_NOT_IMPORTABLE = ("nkudo.cp.migrations",)


def _all_error_classes() -> set[type[NkudoError]]:
    for m in pkgutil.walk_packages(nkudo.__path__, "nkudo."):
        if not m.name.startswith(_NOT_IMPORTABLE):
            importlib.import_module(m.name)
    out: set[type[NkudoError]] = set()
    todo: list[type[NkudoError]] = [NkudoError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


def test_every_timeout_error_class_says_it_is_a_timeout() -> None:
    """Issue 10 item 14: a timeout error class without ``is_timeout`` falls through to FAILED."""
    classes = _all_error_classes()
    timeouts = {c for c in classes if "TIMEOUT" in c.code or "TIMED_OUT" in c.code}
    names = {c.__name__ for c in timeouts}
    # The walk really found the known ones (a walk that finds nothing must not pass).
    assert {"ActionTimeout", "ChTimeoutError", "QmpTimeoutError", "CommandTimedOut", "StopTimeout"} <= names
    missing = sorted(f"{c.__module__}.{c.__name__} ({c.code})" for c in timeouts if not c.is_timeout)
    assert missing == [], f"timeout error classes without is_timeout = True: {missing}"
    assert not NkudoError.is_timeout and not NkudoError.is_retryable


def test_no_timeout_code_is_given_per_instance() -> None:
    """Issue 10 item 14: a timeout code passed as ``code="..._TIMEOUT"`` bypasses the class flag;
    every timeout must be its own error class (the hostcmd time limit used ``code="TIMED_OUT"``)."""
    pat = re.compile(r"""code\s*=\s*["'][A-Z_]*TIME[A-Z_]*["']""")
    offenders = [
        f"{p.relative_to(SRC)}:{n}: {line.strip()}"
        for p in sorted(SRC.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pat.search(line) and not line.lstrip().startswith(("code =", "code: "))
    ]
    assert offenders == []


def test_command_time_limit_is_timed_out(tmp_path: Path) -> None:
    """Issue 10 item 14: a host command killed at its time limit is TIMED_OUT, with its output so far."""
    allow = normalise_allowlist(["/bin/sh"])

    def handler(ctx: ActionContext, params: Any) -> dict[str, Any]:
        return run_command(params.command, list(params.args), cwd="/", timeout=0.5, allow=allow)

    plan = {"actions": [{"action_id": "slow", "type": "CommandExecute",
                         "params": {"command": "/bin/sh", "args": ["-c", "echo started; sleep 30"]}}]}  # fmt: skip
    _, (a,) = parse_plan(plan)
    store = StateStore(str(tmp_path / "state"))
    try:
        out = Executor(store, {"CommandExecute": handler}).execute(a)
    finally:
        store.close()
    assert (out.status, out.error_code) == ("TIMED_OUT", "TIMED_OUT"), out.to_dict()
    assert out.result["stdout"] == "started\n"


def test_cloud_hypervisor_api_timeout_is_timed_out(host: Host) -> None:
    """Issue 10 item 14: vm.boot that never answers within the action's time (CH_TIMEOUT) is TIMED_OUT."""
    h = host
    h.set_sim_flags("--sim-boot-delay", "30")
    rc, doc, err = h.apply([{**_create(h), "timeout_seconds": 4}])
    (o,) = doc["outcomes"]
    assert rc == 1 and (o["status"], o["error_code"]) == ("TIMED_OUT", "CH_TIMEOUT"), (o, err)
    h.set_sim_flags()
    rc, doc, err = h.apply([_act("delete-1", "MicroVMDelete")])
    assert rc == 0, (doc, err)
    assert h.vmm_pids() == []


# A stand-in for qemu-system-x86_64 that speaks real QMP on the socket QEMU's argv names, but whose
# main loop hangs on "cont" (as a QEMU stuck in a blocking call does): the QMP socket accepts and
# answers everything else, and the "cont" answer never comes.
_STUCK_QEMU = r"""
import json, os, signal, socket, sys, threading
sock = next(a.split("path=", 1)[1].split(",", 1)[0] for a in sys.argv if a.startswith("socket,id=qmp,"))
state = {"status": "prelaunch"}
GREETING = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "stuck"},
                    "capabilities": ["oob"]}}

def serve(c):
    f = c.makefile("rwb", buffering=0)
    f.write(json.dumps(GREETING).encode() + b"\r\n")
    for line in f:
        req = json.loads(line)
        cmd, rid = req.get("execute"), req.get("id")
        with open(LOG, "a") as log:
            log.write(cmd + "\n")
        if cmd == "cont":
            continue  # never answered
        if cmd == "query-status":
            ret = {"status": state["status"], "singlestep": False, "running": state["status"] == "running"}
        else:
            ret = {}
        f.write(json.dumps({"return": ret, "id": rid}).encode() + b"\r\n")
        if cmd in ("quit", "system_powerdown"):
            os._exit(0)

signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
srv = socket.socket(socket.AF_UNIX)
srv.bind(sock)
srv.listen(16)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def _stuck_qemu(h: Host) -> Path:
    path = h.root / "qemu-stuck"
    path.write_text(f"#!{sys.executable}\nLOG = {str(h.root / 'qmp-commands')!r}\n{_STUCK_QEMU}")
    path.chmod(0o755)
    return path


def _stuck_pids(h: Host) -> list[int]:
    return live_pids(str(h.root / "qemu-stuck").encode())


def test_qemu_qmp_timeout_is_timed_out(host: Host) -> None:
    """Issue 10 item 14: a QMP call that never answers (QMP_TIMEOUT) was reported FAILED, not TIMED_OUT."""
    h = host
    qemu = ("--provider", "qemu", "--qemu-accel", "tcg", "--qemu-bin", str(_stuck_qemu(h)))
    t0 = time.monotonic()
    rc, doc, err = h.apply([{**_create(h), "timeout_seconds": 4}], *qemu)
    assert time.monotonic() - t0 < 60
    (o,) = doc["outcomes"]
    assert rc == 1 and (o["status"], o["error_code"]) == ("TIMED_OUT", "QMP_TIMEOUT"), (o, err)
    # The VMM was really launched and driven over QMP up to the "cont" that never got its answer.
    cmds = (h.root / "qmp-commands").read_text().split()
    assert "cont" in cmds and cmds.index("query-status") < cmds.index("cont"), cmds
    rc, doc, err = h.apply([_act("delete-1", "MicroVMDelete")], *qemu)
    assert rc == 0, (doc, err)
    deadline = time.monotonic() + 5
    while _stuck_pids(h) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _stuck_pids(h) == []
