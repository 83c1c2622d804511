"""A launcher as ``--cloud-hypervisor-bin`` (a shell wrapper that execs the VMM): never an orphaned VMM.

Issue 10 item 8: the identity was read right after spawn, before the launcher's exec, so it named
``/bin/sh``; after a restart the adoption was refused, the VM marked CRASHED, its live VMM's socket
unlinked, and MicroVMStop/MicroVMDelete reported success while the VMM (the guest) kept running.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from nkudo.agent.daemon import vm_summaries
from nkudo.agent.metrics import AgentMetrics
from nkudo.agent.runtime import Agent, AgentConfig
from nkudo.agent.state import StateStore
from nkudo.vmstate import VmStatus
from tests.agent.conftest import EDGE, Host
from tests.conftest import entered_netns, live_pids


def write_launcher(h: Host, delay: float = 0.0) -> Path:
    """A distribution-style wrapper: the VMM is exec'd through ``env`` and ``nice`` (pid kept, exe changed).

    ``delay`` widens the window in which the recorded process is still the shell, not yet the VMM.
    """
    path = h.root / "launcher"
    pause = f"sleep {delay}\n" if delay else ""
    path.write_text(f'#!/bin/sh\n{pause}exec env nice -n 5 {h.ch} "$@"\n')
    path.chmod(0o755)
    return path


def _create(h: Host) -> dict[str, Any]:
    return {
        "action_id": "c-1",
        "type": "MicroVMCreate",
        "params": {
            "vm_id": "vm-1", "name": "vm-1", "vcpus": 1, "memory_mib": 128,
            "kernel_path": str(h.images / "vmlinux"), "nics": [{"bridge": "br0"}],
        },
    }  # fmt: skip


def _act(aid: str, type_: str, **kw: Any) -> dict[str, Any]:
    return {"action_id": aid, "type": type_, "params": {"vm_id": "vm-1", **kw}}


def _ppid(pid: int) -> int:
    """The parent of ``pid`` (0 if it is gone by now)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _launchers(pids: list[int]) -> list[int]:
    """The marked processes whose parent is not marked (a forked, not yet exec'd child shows its parent's argv)."""
    return [p for p in pids if _ppid(p) not in pids]


def _marker(h: Host) -> bytes:
    return str(h.vms / "vm-1" / "api.sock").encode()


def _created(h: Host, launcher: Path) -> int:
    rc, doc, err = h.apply([_create(h)], "--cloud-hypervisor-bin", str(launcher))
    assert rc == 0, (doc, err)
    assert doc["outcomes"][0]["result"]["status"] == "RUNNING"
    (pid,) = live_pids(_marker(h))
    return pid


def _outcomes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["action_id"]: o for o in doc["outcomes"]}


def test_launcher_vmm_is_recorded_after_exec_then_stopped_and_deleted(host: Host) -> None:
    """Issue 10 item 8: a VMM started through a launcher is adopted by the next run and really ended."""
    h = host
    launcher = write_launcher(h)
    pid = _created(h, launcher)
    store = StateStore(str(h.state))
    try:
        rec = store.get_vm("vm-1")
        assert rec is not None and rec.process is not None
        # The identity is the exec'd VMM's, not the launcher's.
        assert rec.process["pid"] == pid and rec.process["exe"] == os.readlink(f"/proc/{pid}/exe")
        assert not rec.process["exe"].endswith(("/dash", "/sh", "/env", "/nice"))
    finally:
        store.close()

    rc, doc, err = h.apply([_act("st", "MicroVMStop"), _act("d", "MicroVMDelete")], "--cloud-hypervisor-bin",
                           str(launcher))  # fmt: skip
    assert rc == 0, (doc, err)
    out = _outcomes(doc)
    assert out["st"]["status"] == "SUCCEEDED", out
    assert out["d"]["status"] == "SUCCEEDED", out
    assert live_pids(_marker(h)) == []
    assert h.taps() == {} and not (h.vms / "vm-1").exists()
    # A clean power-off through the VMM's API, not a kill of a process the agent had forgotten.
    assert out["st"]["result"]["stopped_by"] == "guest", out["st"]
    assert [r for r in h.requests("vm.power-button") if r["status"] in (200, 204)]


def _forge_prelaunch_record(h: Host) -> None:
    """The store as an agent killed right after spawn leaves it: the record still names the launcher."""
    store = StateStore(str(h.state))
    try:
        rec = store.get_vm("vm-1")
        assert rec is not None and rec.process is not None
        store.update_vm("vm-1", process={**rec.process, "exe": "/usr/bin/dash"}, status=VmStatus.CREATING)
    finally:
        store.close()


def _reconcile(h: Host, launcher: Path) -> tuple[dict[str, list[str]], Any, str, bytes]:
    cfg = AgentConfig(
        state_dir=str(h.state), runtime_dir=str(h.vms), snapshot_dir=str(h.snaps),
        image_roots=(str(h.images),), cloud_hypervisor_bin=str(launcher),
    )  # fmt: skip
    with entered_netns(h.ns):
        agent = Agent(cfg)
        try:
            report = agent.reconcile()
            rec = agent.store.get_vm("vm-1")
            summaries = vm_summaries(agent.store)
            metrics = AgentMetrics(agent.store, [], version="t").render()
        finally:
            agent.close()
    assert rec is not None
    return report, rec, summaries[0].state, metrics


def test_unverified_vmm_is_unknown_not_forgotten_and_stop_ends_it(host: Host) -> None:
    """Issue 10 item 8: a refused adoption of a live marker process is UNKNOWN (socket kept), and stop kills it."""
    h = host
    launcher = write_launcher(h)
    pid = _created(h, launcher)
    _forge_prelaunch_record(h)

    report, rec, hb_state, metrics = _reconcile(h, launcher)
    assert report["unknown"] == ["vm-1"] and report["crashed"] == [] and report["sockets_removed"] == []
    assert rec.status is VmStatus.UNKNOWN and rec.process is not None
    assert str(pid) in (rec.last_error or "") and "dash" in (rec.last_error or "")
    assert (h.vms / "vm-1" / "api.sock").is_socket()  # left alone: the VMM still serves it
    assert live_pids(_marker(h)) == [pid]
    assert hb_state == "UNKNOWN"
    assert b'nkudo_vms_total{state="unknown"} 1.0' in metrics

    rc, doc, err = h.apply([_act("st", "MicroVMStop")], "--cloud-hypervisor-bin", str(launcher))
    assert rc == 0, (doc, err)
    out = _outcomes(doc)["st"]
    assert out["status"] == "SUCCEEDED" and out["result"]["stopped_by"] == "signal", out
    assert live_pids(_marker(h)) == []


def test_delete_of_unverified_vmm_ends_it_before_removing_taps(host: Host) -> None:
    """Issue 10 item 8: MicroVMDelete of a VM whose VMM fails the identity check ends that VMM first."""
    h = host
    launcher = write_launcher(h)
    _created(h, launcher)
    _forge_prelaunch_record(h)
    rc, doc, err = h.apply([_act("d", "MicroVMDelete")], "--cloud-hypervisor-bin", str(launcher))
    assert rc == 0, (doc, err)
    assert _outcomes(doc)["d"]["status"] == "SUCCEEDED"
    assert live_pids(_marker(h)) == []
    assert h.taps() == {} and not (h.vms / "vm-1").exists()


def test_create_redrive_replaces_an_unverified_vmm_without_a_second_one(host: Host) -> None:
    """Issue 10 item 8: re-driving create over an UNKNOWN VM ends the old VMM before starting one."""
    h = host
    launcher = write_launcher(h)
    old = _created(h, launcher)
    _forge_prelaunch_record(h)
    rc, doc, err = h.apply([_act("go", "MicroVMStart")], "--cloud-hypervisor-bin", str(launcher))
    assert rc == 0, (doc, err)
    pids = live_pids(_marker(h))
    assert len(pids) == 1 and pids != [old], pids


def test_agent_killed_before_the_launcher_execs_leaves_no_orphan(host: Host) -> None:
    """Issue 10 item 8: SIGKILL the agent while the recorded VMM is still the launcher shell; after the exec,
    the next run must not forget that VMM: stop and delete end it (before the fix both reported success
    and the VMM kept running)."""
    h = host
    launcher = write_launcher(h, delay=1.5)
    plan = h.root / "create.json"
    plan.write_text(json.dumps({"actions": [_create(h)]}))
    argv = [
        "ip", "netns", "exec", h.ns, EDGE, "--log-level", "error", "--state-dir", str(h.state), "apply",
        "--json", "--plan", str(plan), "--runtime-dir", str(h.vms), "--snapshot-dir", str(h.snaps),
        "--image-root", str(h.images), "--cloud-hypervisor-bin", str(launcher), "--bridge", "br0",
    ]  # fmt: skip
    agent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        # The shell forks to run ``sleep``: until that child execs it shows the shell's command line (the
        # marker) too, so take the process whose parent is not itself a marked process: the launcher.
        while len(roots := _launchers(live_pids(_marker(h)))) != 1:
            assert agent.poll() is None and time.monotonic() < deadline, "the VMM was never spawned"
            time.sleep(0.01)
        (pid,) = roots
        assert os.readlink(f"/proc/{pid}/exe").endswith("/dash")  # still the launcher
        time.sleep(0.3)  # the spawn is recorded at once; the agent now waits for the API socket
        agent.kill()
    finally:
        agent.wait()
    while os.readlink(f"/proc/{pid}/exe").endswith(("/dash", "/env", "/nice")):
        assert time.monotonic() < deadline
        time.sleep(0.01)  # the launcher has exec'd the VMM: the recorded identity no longer matches

    rc, doc, err = h.apply([_act("st", "MicroVMStop"), _act("d", "MicroVMDelete")], "--cloud-hypervisor-bin",
                           str(launcher))  # fmt: skip
    assert rc == 0, (doc, err)
    out = _outcomes(doc)
    assert out["st"]["status"] == "SUCCEEDED" and out["st"]["result"]["stopped_by"] == "signal", out["st"]
    assert out["d"]["status"] == "SUCCEEDED", out["d"]
    assert live_pids(_marker(h)) == []
    assert h.taps() == {} and not (h.vms / "vm-1").exists()
