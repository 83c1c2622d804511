"""Agent gates: executor overhead with durable state, and 50 VM boots against the simulator.

Both are timed by the ``benchmark`` fixture; figures go in ``extra_info`` (see conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import entered_netns, skip_or_fail

from benchmarks.conftest import Benchmark, GateRunFailed, fixture_timing, record, time_alongside, time_window
from nkudo.agent.executor import Executor
from nkudo.agent.plan import parse_plan
from nkudo.agent.runtime import Agent, AgentConfig
from nkudo.agent.state import StateStore


def _fsync_floor(d: Path, n: int = 200) -> float:
    """Seconds per write+fsync of a small file on this disk: the durability floor.

    A reference probe of the disk reported beside the gate (what bounds the
    executor's rate), not a gate timing: a plain loop, outside the fixture.
    """
    fd = os.open(d / "fsync-probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, b"x" * 64, i * 64)
            os.fsync(fd)
        return (time.perf_counter() - t0) / n
    finally:
        os.close(fd)


def test_executor_overhead(tmp_path: Path, benchmark: Benchmark) -> None:
    """Gate: >= 500 actions/s through the executor with durable state (no-op provider).

    The fixture times ``run_plan`` of 600 actions, three rounds, each on a fresh
    state store (made in the untimed setup, so every round executes rather than
    replays). The replay rate and the disk's fsync floor are reported alongside.
    """
    noop: Any = lambda ctx, params: {}  # noqa: E731 - the no-op provider of the gate
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
    stores: list[StateStore] = []
    executors: list[Executor] = []

    def fresh_executor() -> tuple[tuple[Executor], dict[str, Any]]:
        store = StateStore(str(tmp_path / f"state{len(stores)}"))
        stores.append(store)
        executors.append(Executor(store, {t: noop for t in ("MicroVMPause", "MicroVMResume", "MicroVMStart")}))
        return (executors[-1],), {}

    def run_plan(ex: Executor) -> None:
        outs = ex.run_plan(actions)
        if not all(o.ok for o in outs):
            raise GateRunFailed(f"executor run failed: {[o.error_message for o in outs if not o.ok][:3]}")

    try:
        benchmark.pedantic(run_plan, setup=fresh_executor, rounds=3)
        elapsed = fixture_timing(benchmark).median
        rate = n / elapsed

        def replay() -> None:
            if not all(executors[-1].execute(a).replayed for a in actions[:200]):
                raise GateRunFailed("an executed action was not replayed")

        replay_s = time_alongside(benchmark, replay, rounds=1).median
    finally:
        for st in stores:
            st.close()
    floor = _fsync_floor(tmp_path)
    record(
        benchmark,
        "executor_overhead",
        actions=n,
        run_plan_s=round(elapsed, 4),
        actions_per_s=round(rate),
        replayed_per_s=round(200 / replay_s),
        fsync_floor_per_s=round(1 / floor),
        fsyncs_per_action=2,
        bound_by_fsync_per_s=round(1 / (2 * floor)),
        limit_actions_per_s=500,
    )
    assert rate >= 500, f"executor ran {rate:.0f} actions/s with durable state (gate 500)"


@pytest.mark.slow
def test_boot_50_vms_against_simulator(tmp_path: Path, benchmark: Benchmark) -> None:
    """Gate: the agent's own CPU is < 50% of the wall time of booting 50 VMs on the simulator.

    One round (each boot creates 50 new VMs): the fixture times the plan, the
    agent's process CPU is read around it inside the timed call.
    """
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
            cpu: list[float] = []

            def boot_all() -> list[Any]:
                assert agent is not None
                cpu0 = time.process_time()
                outs = agent.executor.run_plan(actions)
                cpu.append(time.process_time() - cpu0)
                return outs

            outs, wall = time_window(benchmark, boot_all)
        assert all(o.ok for o in outs), [o.error_message for o in outs if not o.ok][:3]
        share = cpu[0] / wall
        record(benchmark, "boot_50_vms", per_vm_ms=round(wall / 50 * 1000, 1), agent_cpu_per_vm_ms=round(cpu[0] / 50 * 1000, 1),
               agent_share=round(share, 3), total_s=round(wall, 2), agent_cpu_s=round(cpu[0], 3), limit_share=0.5)  # fmt: skip
        assert share < 0.5, f"agent code took {share:.0%} of the boot wall time (gate < 50%)"
    finally:
        if agent is not None:
            with entered_netns(ns):
                for vm in agent.store.list_vms():
                    agent.provider.stop(agent.vms.paths(vm.vm_id), vm.process, graceful_timeout=0, force=True)
                agent.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)
