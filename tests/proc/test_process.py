"""Spawn, exit detection (blocking and asyncio), signals, graceful stop and the no-pidfd fallback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from pathlib import Path

import pytest

from nkudo.log import configure
from nkudo.proc import ExitStatus, ProcessGone, SpawnError, pidfd_support, spawn
from tests.proc.conftest import ENV, Reaper, SpawnFn, python_argv

pytestmark = pytest.mark.timeout(60)

# A child that says it is ready only once its SIGTERM handler is in place, then ignores SIGTERM.
STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def wait_for_text(path: Path, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = path.read_text() if path.exists() else ""
        if text in data:
            return data
        time.sleep(0.01)
    raise AssertionError(f"{text!r} not in {path}: {data!r}")


def test_log_file_receives_stdout_and_stderr(spawned: SpawnFn, tmp_path: Path) -> None:
    (tmp_path / "vmm.log").write_text("previous run\n")
    h = spawned(
        python_argv("import sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr)"),
        log_name="vmm.log",
    )
    assert h.wait(10) == ExitStatus("exited", code=0)
    text = (tmp_path / "vmm.log").read_text()
    assert text.startswith("previous run\n")  # appended, not truncated
    assert "to stdout\n" in text and "to stderr\n" in text
    assert h.log_path == str(tmp_path / "vmm.log")


def test_environment_is_exactly_what_was_given(spawned: SpawnFn, tmp_path: Path) -> None:
    os.environ["NKUDO_TEST_SECRET"] = "must-not-leak"
    try:
        h = spawned(["env"], env={"ONLY": "this"})  # env(1), no PATH: found in the default path
    finally:
        del os.environ["NKUDO_TEST_SECRET"]
    assert h.wait(10) == ExitStatus("exited", code=0)
    assert (tmp_path / "child.log").read_text() == "ONLY=this\n"


def test_exit_code_and_signal_detected(spawned: SpawnFn) -> None:
    a = spawned(python_argv("raise SystemExit(3)"))
    b = spawned(["sleep", "60"])
    assert a.wait(10) == ExitStatus("exited", code=3)
    assert b.poll() is None and b.wait(0.05) is None
    b.send_signal(signal.SIGKILL)
    st = b.wait(5)
    assert st == ExitStatus("killed", signal=signal.SIGKILL)
    assert st is not None and st.known and str(st) == "killed by SIGKILL"
    assert b.poll() is st  # cached; reaped exactly once


def test_exit_noticed_quickly_without_polling(spawned: SpawnFn) -> None:
    h = spawned(["sleep", "60"])
    t0 = time.perf_counter()
    h.kill()
    assert h.wait(5) is not None
    assert time.perf_counter() - t0 < 0.1


def test_signal_delivery(spawned: SpawnFn, tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: (print('got USR1', flush=True), sys.exit(5)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    h = spawned(python_argv(code))
    wait_for_text(tmp_path / "child.log", "ready")
    h.send_signal(signal.SIGUSR1)
    assert h.wait(10) == ExitStatus("exited", code=5)
    assert "got USR1" in (tmp_path / "child.log").read_text()
    with pytest.raises(ProcessGone) as info:
        h.send_signal(signal.SIGTERM)
    assert info.value.code == "PROCESS_GONE"


def test_child_survives_in_own_session(spawned: SpawnFn) -> None:
    h = spawned(["sleep", "60"])
    stat = Path(f"/proc/{h.pid}/stat").read_text().rpartition(")")[2].split()
    assert int(stat[3]) == h.pid != os.getsid(0)  # session leader of a new session
    assert int(stat[4]) == 0  # no controlling terminal


def test_graceful_stop_with_sigterm(spawned: SpawnFn) -> None:
    h = spawned(["sleep", "60"])
    res = h.stop(term_timeout=5, kill_timeout=5)
    assert res.status == ExitStatus("killed", signal=signal.SIGTERM)
    assert not res.escalated and res.signals == (signal.SIGTERM,)
    assert res.elapsed < 1
    again = h.stop()  # already stopped: immediate, nothing sent
    assert again.status == res.status and again.signals == ()


def test_stop_escalates_to_sigkill(spawned: SpawnFn, tmp_path: Path) -> None:
    h = spawned(python_argv(STUBBORN))
    wait_for_text(tmp_path / "child.log", "ready")
    res = h.stop(term_timeout=0.5, kill_timeout=5)
    assert res.escalated
    assert res.signals == (signal.SIGTERM, signal.SIGKILL)
    assert res.status == ExitStatus("killed", signal=signal.SIGKILL)
    assert 0.5 <= res.elapsed < 3


def test_asyncio_exit_and_stop(spawned: SpawnFn, tmp_path: Path) -> None:
    quick = spawned(python_argv("raise SystemExit(9)"))
    sleeper = spawned(["sleep", "60"])
    stubborn = spawned(python_argv(STUBBORN), log_name="stubborn.log")
    wait_for_text(tmp_path / "stubborn.log", "ready")

    async def main() -> None:
        # Two concurrent waiters on one handle, and one that is cancelled, do not disturb each other.
        w1 = asyncio.ensure_future(sleeper.wait_async())
        w2 = asyncio.ensure_future(sleeper.wait_async())
        w3 = asyncio.ensure_future(sleeper.wait_async())
        assert await asyncio.wait_for(quick.wait_async(), 10) == ExitStatus("exited", code=9)
        await asyncio.sleep(0.05)
        assert not (w1.done() or w2.done())
        w3.cancel()
        t0 = time.perf_counter()
        sleeper.send_signal(signal.SIGKILL)
        s1, s2 = await asyncio.wait_for(asyncio.gather(w1, w2), 5)
        assert time.perf_counter() - t0 < 0.1
        assert s1 == s2 == ExitStatus("killed", signal=signal.SIGKILL)
        res = await stubborn.stop_async(term_timeout=0.3, kill_timeout=5)
        assert res.escalated and res.status.signal == signal.SIGKILL

    asyncio.run(main())
    fds_before = len(os.listdir("/proc/self/fd"))
    asyncio.run(asyncio.wait_for(sleeper.wait_async(), 1))  # exited: immediate, no fd leaked
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_spawn_errors(tmp_path: Path, reaper: Reaper) -> None:
    with pytest.raises(SpawnError) as info:
        spawn(["no-such-vmm"], env=ENV, log_path=tmp_path / "x.log")
    assert info.value.stage == "prepare" and info.value.errno == 2
    with pytest.raises(SpawnError) as info:
        spawn(["sleep", "1"], env=ENV, log_path=tmp_path / "missing-dir" / "x.log")
    assert info.value.stage == "prepare" and "log file" in info.value.message
    with pytest.raises(SpawnError):
        spawn(["sleep", "1"], env={"PATH": str(tmp_path)}, log_path=tmp_path / "x.log")  # the child's PATH
    with pytest.raises(ValueError, match="marker"):
        spawn(["sleep", "1"], env=ENV, log_path=tmp_path / "x.log", marker="/run/vm.sock")


def test_stdio_closed_in_agent_does_not_break_spawn(spawned: SpawnFn, tmp_path: Path) -> None:
    try:
        saved: int | None = os.dup(0)
    except OSError:
        saved = None  # already closed under this test runner
    if saved is not None:
        os.close(0)  # an agent started with stdin closed: /dev/null would otherwise be opened as fd 0
    try:
        h = spawned(python_argv("import sys; print(sys.stdin.read() == '')"))
    finally:
        if saved is not None:
            os.dup2(saved, 0)
            os.close(saved)
    assert h.pidfd is not None and h.pidfd >= 3
    assert h.wait(10) == ExitStatus("exited", code=0)
    assert (tmp_path / "child.log").read_text().strip() == "True"


@pytest.mark.usefixtures("fallback")
def test_fallback_without_pidfd(tmp_path: Path, reaper: Reaper) -> None:
    buf = io.StringIO()
    configure("info", "json", buf)
    try:
        support = pidfd_support()
    finally:
        configure("info")
    assert support.available is False and "NKUDO_PIDFD=0" in support.reason
    record = json.loads(buf.getvalue().splitlines()[0])
    assert (
        record["level"] == "warn" and "falling back" in record["msg"] and "pid-reuse" in record["consequence"]
    )
    h = reaper.add(spawn(["sleep", "60"], env=ENV, log_path=tmp_path / "x.log"))
    assert h.pidfd is None
    with pytest.raises(Exception, match="fallback"):
        h.fileno()
    assert h.poll() is None
    res = h.stop(term_timeout=5)
    assert res.status == ExitStatus("killed", signal=signal.SIGTERM) and not res.escalated
    stub = reaper.add(spawn(python_argv(STUBBORN), env=ENV, log_path=tmp_path / "s.log"))
    wait_for_text(tmp_path / "s.log", "ready")

    async def main() -> ExitStatus:
        return (await stub.stop_async(term_timeout=0.3, kill_timeout=5)).status

    assert asyncio.run(main()) == ExitStatus("killed", signal=signal.SIGKILL)


def test_child_reaped_by_other_code_is_reported_unknown(spawned: SpawnFn) -> None:
    h = spawned(python_argv("raise SystemExit(1)"))
    os.waitpid(h.pid, 0)  # e.g. a careless waitpid elsewhere in the agent took the status
    st = h.wait(5)
    assert st is not None and st.kind == "unknown" and "reaped by other code" in st.reason
