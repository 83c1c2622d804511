"""Agent gates: executor overhead with durable state, and 50 VM boots against the simulator."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import entered_netns, skip_or_fail

from nkudo.agent.executor import Executor
from nkudo.agent.plan import parse_plan
from nkudo.agent.runtime import Agent, AgentConfig
from nkudo.agent.state import StateStore


def _fsync_floor(d: Path, n: int = 200) -> float:
    """Seconds per write+fsync of a small file on this disk: the durability floor."""
    fd = os.open(d / "fsync-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, b"x" * 64, i * 64)
            os.fsync(fd)
        return (time.perf_counter() - t0) / n
    finally:
        os.close(fd)


def test_executor_overhead(tmp_path: Path, gate: Callable[..., None], benchmark: Any) -> None:
    store = StateStore(str(tmp_path / "state"))
    noop: Any = lambda ctx, params: {}  # noqa: E731 - the no-op provider of the gate
    ex = Executor(store, {t: noop for t in ("MicroVMPause", "MicroVMResume", "MicroVMStart")})
    n = 600
    _, actions = parse_plan(
        {
            "actions": [
                {
                    "action_id": f"a{i}",
                    "type": ("MicroVMPause", "MicroVMResume", "MicroVMStart")[i % 3],
                    "params": {"vm_id": f"vm{i % 7}"},
                }
                for i in range(n)
            ]
        }
    )
    t0 = time.perf_counter()
    outs = ex.run_plan(actions)
    elapsed = time.perf_counter() - t0
    assert all(o.ok for o in outs)
    rate = n / elapsed
    t1 = time.perf_counter()
    replays = [ex.execute(a) for a in actions[:200]]
    replay_rate = 200 / (time.perf_counter() - t1)
    assert all(o.replayed for o in replays)
    floor = _fsync_floor(tmp_path)
    gate(
        "executor_overhead",
        actions_per_s=round(rate),
        replayed_per_s=round(replay_rate),
        fsync_floor_per_s=round(1 / floor),
        fsyncs_per_action=2,
        bound_by_fsync_per_s=round(1 / (2 * floor)),
    )
    benchmark.extra_info["actions_per_s"] = rate
    store.close()
    assert rate >= 500, f"executor ran {rate:.0f} actions/s with durable state (gate 500)"


@pytest.mark.slow
def test_boot_50_vms_against_simulator(tmp_path: Path, gate: Callable[..., None], benchmark: Any) -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root for a network namespace")
    ns = f"nkb-{uuid.uuid4().hex[:6]}"
    root = Path(f"/tmp/nkb-{uuid.uuid4().hex[:6]}")
    images = root / "images"
    images.mkdir(parents=True)
    (images / "vmlinux").write_bytes(b"kernel")
    sim = Path(sys.executable).parent / "nkudo-ch-sim"
    ch = root / "ch"
    ch.write_text(
        f"#!{sys.executable}\nimport sys\nfrom nkudo.chsim.main import main\nsys.exit(main(['--sim-boot-delay', '0', '--sim-latency', '0'] + sys.argv[1:]))\n"
    )
    ch.chmod(0o755)
    assert sim.exists()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    agent: Agent | None = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "br0", "up"], check=True)
        with entered_netns(ns):
            agent = Agent(AgentConfig(state_dir=str(root / "s"), runtime_dir=str(root / "v"), snapshot_dir=str(root / "n"),
                                      image_roots=(str(images),), cloud_hypervisor_bin=str(ch)))  # fmt: skip
            _, actions = parse_plan({"actions": [
                {"action_id": f"c{i}", "type": "MicroVMCreate", "params": {
                    "vm_id": f"vm{i}", "name": f"vm{i}", "vcpus": 1, "memory_mib": 64,
                    "kernel_path": str(images / "vmlinux"), "nics": [{"bridge": "br0"}]}}
                for i in range(50)
            ]})  # fmt: skip
            cpu0, t0 = time.process_time(), time.perf_counter()
            outs = agent.executor.run_plan(actions)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        assert all(o.ok for o in outs), [o.error_message for o in outs if not o.ok][:3]
        share = cpu / wall
        gate("boot_50_vms", per_vm_ms=round(wall / 50 * 1000, 1), agent_cpu_per_vm_ms=round(cpu / 50 * 1000, 1),
             agent_share=round(share, 3), total_s=round(wall, 2))  # fmt: skip
        benchmark.extra_info["agent_share"] = share
        assert share < 0.5, f"agent code took {share:.0%} of the boot wall time (gate < 50%)"
    finally:
        if agent is not None:
            with entered_netns(ns):
                for vm in agent.store.list_vms():
                    agent.provider.stop(agent.vms.paths(vm.vm_id), vm.process, graceful_timeout=0, force=True)
                agent.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)
