"""The selector-based Supervisor: many processes, one thread, exits noticed through pidfds."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from nkudo.proc import ExitStatus, ProcessHandle, Supervisor, adopt, spawn
from tests.proc.conftest import ENV, PY, Reaper, SpawnFn, native_flag, python_argv, spawn_orphan

pytestmark = pytest.mark.timeout(60)


def test_exits_of_many_children(spawned: SpawnFn) -> None:
    seen: list[tuple[int, ExitStatus, str]] = []
    lock = threading.Lock()

    def on_exit(h: ProcessHandle, st: ExitStatus) -> None:
        with lock:
            seen.append((h.pid, st, threading.current_thread().name))

    with Supervisor(name="sup-test") as sup:
        quick = [
            spawned(python_argv(f"raise SystemExit({code})"), log_name=f"{code}.log") for code in range(5)
        ]
        sleepers = [spawned(["sleep", "60"], log_name=f"s{i}.log") for i in range(5)]
        futs = {h.pid: sup.watch(h, on_exit) for h in quick + sleepers}
        for code, h in enumerate(quick):
            assert futs[h.pid].result(10) == ExitStatus("exited", code=code)
        assert len(sup) == 5  # the exited ones were dropped
        time.sleep(0.05)
        assert not any(futs[h.pid].done() for h in sleepers)
        for h in sleepers:
            t0 = time.perf_counter()
            h.send_signal(signal.SIGKILL)
            assert futs[h.pid].result(5) == ExitStatus("killed", signal=signal.SIGKILL)
            assert time.perf_counter() - t0 < 0.1
            assert h.status == futs[h.pid].result()  # the handle saw it too (reaped once)
        deadline = time.monotonic() + 5
        while len(seen) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sup) == 0
    assert sorted(p for p, _, _ in seen) == sorted(futs)
    assert {name for _, _, name in seen} == {"sup-test"}


def test_already_exited_and_closed_handle(spawned: SpawnFn) -> None:
    h = spawned(python_argv("raise SystemExit(4)"))
    assert h.wait(10) is not None
    g = spawned(["sleep", "60"])
    with Supervisor() as sup:
        assert sup.watch(h).result(5) == ExitStatus("exited", code=4)
        fut = sup.watch(g)
        assert sup.watch(g) is fut  # watching twice is one watch
        g.close()  # the supervisor holds its own dup of the pidfd
        import os

        os.kill(g.pid, signal.SIGTERM)
        assert fut.result(5) == ExitStatus("killed", signal=signal.SIGTERM)


def test_unwatch_and_close_cancel(spawned: SpawnFn) -> None:
    a = spawned(["sleep", "60"])
    b = spawned(["sleep", "60"])
    sup = Supervisor()
    fa = sup.watch(a)
    fb = sup.watch(b)
    assert sup.unwatch(a) and not sup.unwatch(a)
    assert fa.cancelled()
    a.kill()
    assert a.wait(5) is not None
    sup.close()
    assert fb.cancelled()
    with pytest.raises(CancelledError):
        fb.result(0)
    assert b.poll() is None  # closing the supervisor does not stop the processes
    with pytest.raises(RuntimeError):
        sup.watch(b)


def test_callback_exception_does_not_stop_supervision(spawned: SpawnFn) -> None:
    def boom(h: ProcessHandle, st: ExitStatus) -> None:
        raise RuntimeError("callback bug")

    with Supervisor() as sup:
        a = spawned(python_argv("pass"))
        assert sup.watch(a, boom).result(10).kind == "exited"
        b = spawned(python_argv("raise SystemExit(2)"), log_name="b.log")
        assert sup.watch(b).result(10) == ExitStatus("exited", code=2)


def test_adopted_process_under_supervisor(reaper: Reaper, tmp_path: Path, impl: str) -> None:
    native = native_flag(impl)
    argv = [PY, "-I", "-c", "import time; time.sleep(60)"]
    recorded = spawn_orphan(reaper, tmp_path / "vmm.log", argv, native=native)
    h = reaper.add(adopt(recorded, native=native))
    with Supervisor() as sup:
        fut = sup.watch(h)
        h.kill()
        st = fut.result(5)
    assert st.kind == "unknown" and not st.known


@pytest.mark.usefixtures("fallback")
def test_supervisor_fallback_polls(reaper: Reaper, tmp_path: Path) -> None:
    h = reaper.add(spawn(["sleep", "60"], env=ENV, log_path=tmp_path / "x.log"))
    assert h.pidfd is None
    with Supervisor(fallback_interval=0.02) as sup:
        fut = sup.watch(h)
        time.sleep(0.05)
        assert not fut.done()
        h.kill()
        assert fut.result(5) == ExitStatus("killed", signal=signal.SIGKILL)


def test_idle_supervisor_sleeps(spawned: SpawnFn) -> None:
    hs = [spawned(["sleep", "60"], log_name=f"{i}.log") for i in range(20)]
    with Supervisor() as sup:
        for h in hs:
            sup.watch(h)
        time.sleep(0.1)
        c0 = sup.cpu_time()
        time.sleep(1.0)
        used = sup.cpu_time() - c0
    assert used < 0.005, f"idle supervisor used {used * 1000:.2f} ms CPU in 1 s"
