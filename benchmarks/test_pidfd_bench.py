"""Gates for pidfd process control: exit-notification latency and idle cost of the Supervisor.

Why these numbers: the agent supervises one VMM per VM (hundreds on a big
host); it must learn of a VMM's death within milliseconds (p99 < 5 ms with
200 processes) and cost nothing while all are healthy (< 10 ms CPU over 10
idle seconds). Native-vs-twin timings of spawn and start-time reads are
gated alongside: the fixture times the native side, the twin is timed between
its rounds with the fixture's clock (``time_sides``).
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.conftest import Benchmark, GateRunFailed, checked, record, time_sides, time_window
from nkudo import _native
from nkudo.log import configure
from nkudo.proc import ExitStatus, ProcessHandle, Supervisor, spawn
from nkudo.proc import pidfd_sys as psys

N = 200
IDLE_SECONDS = 10.0
ENV = {"PATH": "/usr/bin:/bin"}

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def sleepers(tmp_path: Path) -> Iterator[list[ProcessHandle]]:
    configure("warn")  # 200 "process spawned" lines would only add noise
    handles: list[ProcessHandle] = []
    try:
        for _ in range(N):
            handles.append(spawn(["sleep", "600"], env=ENV, log_path=tmp_path / "sleep.log"))
        yield handles
    finally:
        for h in handles:
            try:
                if h.poll() is None:
                    h.send_signal(signal.SIGKILL)
                    h.wait(5)
            except Exception:
                os.kill(h.pid, signal.SIGKILL)
            h.close()
        configure("info")


def test_supervisor_gates(sleepers: list[ProcessHandle], benchmark: Benchmark) -> None:
    """Gates: exit noticed within p99 < 5 ms of SIGKILL with 200 supervised; < 10 ms CPU over 10 idle s.

    Neither is a fixture timing: the latency is a distribution whose end is
    observed in the supervisor's thread (the exit callback's timestamp), and the
    idle cost is a soak (the supervisor thread's CPU over a window). The fixture
    times the idle window once; the figures are in ``extra_info``.
    """
    noticed: dict[int, float] = {}
    statuses: dict[int, ExitStatus] = {}
    event = threading.Event()

    def on_exit(h: ProcessHandle, st: ExitStatus) -> None:
        noticed[h.pid] = time.perf_counter()
        statuses[h.pid] = st
        event.set()

    with Supervisor(name="bench-supervisor") as sup:
        for h in sleepers:
            sup.watch(h, on_exit)
        assert len(sup) == N
        time.sleep(0.2)

        # Idle: 200 healthy processes, 10 s, CPU of the supervisor thread only.
        cpu0 = sup.cpu_time()

        def idle() -> float:
            time.sleep(IDLE_SECONDS)
            return sup.cpu_time() - cpu0

        idle_cpu, idle_wall = time_window(benchmark, idle)

        # Latency: kill one at a time while the rest stay supervised.
        latencies = []
        for h in sleepers:
            event.clear()
            t0 = time.perf_counter()
            h.send_signal(signal.SIGKILL)
            assert event.wait(5), f"exit of pid {h.pid} not noticed"
            latencies.append(noticed[h.pid] - t0)
        assert len(sup) == 0
        busy_cpu = sup.cpu_time() - cpu0 - idle_cpu

    assert all(st == ExitStatus("killed", signal=signal.SIGKILL) for st in statuses.values())
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    record(
        benchmark,
        "pidfd_supervisor",
        processes=N,
        p50_ms=round(statistics.median(latencies) * 1000, 3),
        p99_ms=round(p99 * 1000, 3),
        max_ms=round(latencies[-1] * 1000, 3),
        limit_p99_ms=5,
        idle_s=round(idle_wall, 2),
        cpu_ms=round(idle_cpu * 1000, 4),
        cpu_ms_during_200_exits=round(busy_cpu * 1000, 3),
        limit_cpu_ms=10,
    )
    assert p99 < 0.005, f"p99 kill->notification {p99 * 1000:.2f} ms"
    assert idle_cpu < 0.010, f"idle supervisor used {idle_cpu * 1000:.2f} ms CPU in {idle_wall:.1f} s"
    assert busy_cpu > 0  # the thread clock does count: an idle figure of ~0 is real, not a broken probe


def _require_native() -> None:
    if _native.load("pidfd") is None:
        pytest.fail(f"native module 'pidfd' not loaded: {_native.reason('pidfd')}")


def test_spawn_native_vs_twin(tmp_path: Path, benchmark: Benchmark) -> None:
    """Gate: the native spawn (clone with CLONE_PIDFD, for the atomic pidfd) costs at most 1.5x posix_spawn.

    Timed until execve of /usr/bin/true (the spawn call returns once the child
    has exec'd); each child is reaped untimed after its sample, so neither side
    runs beside the other's child. Both sides run pinned to one CPU: where the
    scheduler places a child is not what the gate compares.

    The gate compares the minimum of 150 rounds, as the chapi gate does: a spawn
    timed until exec only ever gains time from outside (whether the woken parent
    or the freshly exec'd child gets the CPU first, a host vCPU that has to be
    woken), so the lower edge is the cost of the call itself. The medians are
    bimodal on a shared machine and are recorded, not gated: CI measured the
    native median at 0.65 ms against a 0.06 ms minimum twice, once unpinned (twin
    0.20 ms) and once pinned (twin 0.40 ms, its minimum 0.15 ms), while a quiet
    run here gives 0.11 ms against 0.21 ms for both minimum and median.
    """
    _require_native()
    affinity = os.sched_getaffinity(0)
    cpu = min(affinity)
    os.sched_setaffinity(0, {cpu})
    configure("warn")
    log = tmp_path / "true.log"
    stdin = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    children: list[int | None] = []

    def spawner(native: bool) -> Callable[[], None]:
        def run() -> None:
            _pid, fd = psys.spawn("/usr/bin/true", ["true"], ENV, stdin, out, out, native=native)
            children.append(fd)

        return run

    def reap() -> None:
        while children:
            fd = children.pop()
            if fd is None:
                raise GateRunFailed("spawn returned no pidfd")
            st = psys.waitid_pidfd(fd, os.WEXITED, native=False)
            os.close(fd)
            # A spawn whose exec failed also returns fast: only a child that ran `true` counts.
            if st is None or (st.code, st.status) != (os.CLD_EXITED, 0):
                raise GateRunFailed(f"spawned child did not run true: {st!r}")

    try:
        res = time_sides(
            benchmark,
            {"native": spawner(True), "twin": spawner(False)},
            primary="native",
            rounds=150,
            warmup_rounds=0,
            between=reap,
        )
    finally:
        reap()
        os.close(stdin)
        os.close(out)
        configure("info")
        os.sched_setaffinity(0, affinity)
    record(
        benchmark,
        "pidfd_spawn_native_vs_twin",
        cpu=cpu,
        native_min_ms=round(res["native"].min * 1000, 3),
        twin_min_ms=round(res["twin"].min * 1000, 3),
        native_median_ms=res["native"].median_ms,
        twin_median_ms=res["twin"].median_ms,
        native_over_twin_min=round(res["native"].min / res["twin"].min, 3),
        limit_native_over_twin=1.5,
        note="until execve of /usr/bin/true; native clone(CLONE_VM|CLONE_VFORK|CLONE_PIDFD), twin posix_spawn",
    )
    assert res["native"].min <= res["twin"].min * 1.5, (
        f"native spawn {res['native'].min * 1e3:.3f} ms vs twin {res['twin'].min * 1e3:.3f} ms (minimum of rounds)"
    )


def test_start_time_native_vs_twin(benchmark: Benchmark) -> None:
    """Gate: the native /proc start-time read (it exists for cheapness) costs at most 1.2x its twin."""
    _require_native()
    pid = os.getpid()
    res = time_sides(
        benchmark,
        {
            "native": checked(lambda: psys.proc_start_time(pid, native=True), bool, "native start time"),
            "twin": checked(lambda: psys.proc_start_time(pid, native=False), bool, "twin start time"),
        },
        primary="native",
        rounds=2000,
    )
    record(
        benchmark,
        "pidfd_start_time_native_vs_twin",
        native_median_us=res["native"].median_us,
        twin_median_us=res["twin"].median_us,
        limit_native_over_twin=1.2,
    )
    assert res["native"].median <= res["twin"].median * 1.2
