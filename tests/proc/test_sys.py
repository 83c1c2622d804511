"""The native syscall layer and its pure-Python twin give the same results and the same exceptions."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from nkudo.proc import SpawnError
from nkudo.proc import pidfd_sys as psys
from tests.conftest import require_native
from tests.proc.conftest import ENV, native_flag

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def both() -> tuple[bool, bool]:
    require_native("pidfd")
    return (True, False)


def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    """Result or (exception type, errno) — what must match between native and twin."""
    try:
        return ("ok", fn())
    except OSError as exc:
        return (type(exc).__name__, exc.errno)


def raw_spawn(argv: list[str], log: Path, native: bool, env: dict[str, str] | None = None) -> tuple[int, int]:
    stdin = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        pid, pidfd = psys.spawn(argv[0], argv, env or ENV, stdin, out, out, native=native)
    finally:
        os.close(stdin)
        os.close(out)
    assert pidfd is not None
    return pid, pidfd


def kill_reap(pidfd: int) -> None:
    try:
        psys.pidfd_send_signal(pidfd, signal.SIGKILL, native=False)
    except ProcessLookupError:
        pass
    try:
        os.waitid(psys.P_PIDFD, pidfd, os.WEXITED)
    except ChildProcessError:
        pass
    os.close(pidfd)


def test_pidfd_open_same_results(both: tuple[bool, bool]) -> None:
    for native in both:
        fd = psys.pidfd_open(os.getpid(), native=native)
        try:
            assert fd >= 0
            assert os.get_inheritable(fd) is False  # close-on-exec like os.pidfd_open
        finally:
            os.close(fd)
    dead = _dead_pid()
    cases: list[tuple[int, int]] = [(dead, 0), (os.getpid(), 0xFFFF), (-5, 0)]
    for pid, flags in cases:
        nat = outcome(functools.partial(psys.pidfd_open, pid, flags, native=True))
        twin = outcome(functools.partial(psys.pidfd_open, pid, flags, native=False))
        assert nat == twin and nat[0] != "ok", (pid, flags, nat, twin)
    assert outcome(lambda: psys.pidfd_open(dead, native=True)) == ("ProcessLookupError", 3)


def _dead_pid() -> int:
    """A pid that was just ours and has been reaped (so is most likely free)."""
    pid = os.posix_spawn("/usr/bin/true", ["true"], ENV)
    os.waitpid(pid, 0)
    return pid


def test_send_signal_and_waitid_same_results(both: tuple[bool, bool], tmp_path: Path) -> None:
    for native in both:
        pid, pidfd = raw_spawn(["/usr/bin/sleep", "30"], tmp_path / "log", native)
        try:
            assert psys.waitid_pidfd(pidfd, os.WEXITED | os.WNOHANG, native=native) is None
            psys.pidfd_send_signal(pidfd, signal.SIGUSR1, native=native)  # default action: terminate
            res = psys.waitid_pidfd(pidfd, os.WEXITED, native=native)
            assert res == psys.WaitResult(pid, psys.CLD_KILLED, signal.SIGUSR1)
            # Reaped: signalling and waiting again fail identically in both.
            nat = outcome(functools.partial(psys.pidfd_send_signal, pidfd, 0, native=True))
            twin = outcome(functools.partial(psys.pidfd_send_signal, pidfd, 0, native=False))
            assert nat == twin == ("ProcessLookupError", 3)
            nat = outcome(functools.partial(psys.waitid_pidfd, pidfd, os.WEXITED | os.WNOHANG, native=True))
            twin = outcome(functools.partial(psys.waitid_pidfd, pidfd, os.WEXITED | os.WNOHANG, native=False))
            assert nat == twin == ("ChildProcessError", 10)
        finally:
            os.close(pidfd)
    # Exit codes, and a process that is not our child (ECHILD: status unknowable).
    for native in both:
        pid, pidfd = raw_spawn(["/usr/bin/python3", "-c", "raise SystemExit(7)"], tmp_path / "log", native)
        try:
            assert psys.waitid_pidfd(pidfd, os.WEXITED, native=native) == psys.WaitResult(
                pid, psys.CLD_EXITED, 7
            )
        finally:
            os.close(pidfd)
    own = psys.pidfd_open(os.getppid())
    try:
        nat = outcome(lambda: psys.waitid_pidfd(own, os.WEXITED | os.WNOHANG, native=True))
        twin = outcome(lambda: psys.waitid_pidfd(own, os.WEXITED | os.WNOHANG, native=False))
        assert nat == twin == ("ChildProcessError", 10)
    finally:
        os.close(own)
    bad = outcome(lambda: psys.pidfd_send_signal(987654, 0, native=True))
    assert bad == outcome(lambda: psys.pidfd_send_signal(987654, 0, native=False)) == ("OSError", 9)


def test_start_time_same_and_correct(both: tuple[bool, bool], tmp_path: Path) -> None:
    # A command name with spaces and parentheses: the parser must split after the LAST ')'.
    odd = tmp_path / "a) b (c"
    shutil.copy("/usr/bin/sleep", odd)
    pid, pidfd = raw_spawn([str(odd), "30"], tmp_path / "log", False)
    try:
        with open(f"/proc/{pid}/stat") as f:
            assert ") b (c)" in f.read()
        values = {psys.proc_start_time(p, native=n) for p in (pid,) for n in both}
        assert len(values) == 1
        start = values.pop()
        boot = psutil.boot_time()
        assert abs(boot + start / os.sysconf("SC_CLK_TCK") - psutil.Process(pid).create_time()) < 0.05
        assert start >= psys.proc_start_time(os.getpid(), native=True)
    finally:
        kill_reap(pidfd)
    dead = _dead_pid()
    nat = outcome(lambda: psys.proc_start_time(dead, native=True))
    twin = outcome(lambda: psys.proc_start_time(dead, native=False))
    assert nat == twin == ("FileNotFoundError", 2)
    assert psys.proc_start_time(1, native=True) == psys.proc_start_time(1, native=False)


def _child_view(pid: int) -> dict[str, object]:
    """What a spawned child looks like from outside, via /proc."""
    # The spawner returns once execve is past the point of no return; the new program then maps
    # its libraries (briefly holding descriptors). Look only once sleep(1) is asleep.
    deadline = time.monotonic() + 5
    while "nanosleep" not in Path(f"/proc/{pid}/wchan").read_text() and time.monotonic() < deadline:
        time.sleep(0.001)
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    stat_tail = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    fds = sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    glibc_internal = (1 << 31) | (1 << 32)  # signals 32/33: glibc's posix_spawn leaves them SIG_IGN
    return {
        "sid_is_pid": int(stat_tail[3]) == pid,
        "pgrp_is_pid": int(stat_tail[2]) == pid,
        "tty": int(stat_tail[4]),
        "fds": fds,
        "targets": [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds],
        "sig_blocked": int(status["SigBlk"], 16),
        "sig_ignored": int(status["SigIgn"], 16) & ~glibc_internal,
        "environ": Path(f"/proc/{pid}/environ").read_bytes(),
        "cmdline": Path(f"/proc/{pid}/cmdline").read_bytes(),
    }


def test_spawned_child_is_set_up_identically(both: tuple[bool, bool], tmp_path: Path) -> None:
    log = tmp_path / "log"
    leak = os.open("/dev/zero", os.O_RDONLY)  # an inheritable fd the child must not get
    os.set_inheritable(leak, True)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    views = []
    try:
        for native in both:
            pid, pidfd = raw_spawn(["/usr/bin/sleep", "30"], log, native, {"A": "1", "B": "x y"})
            try:
                views.append(_child_view(pid))
            finally:
                kill_reap(pidfd)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(leak)
    assert views[0] == views[1]
    v = views[0]
    assert v["sid_is_pid"] and v["pgrp_is_pid"] and v["tty"] == 0
    assert v["fds"] == [0, 1, 2]
    assert v["targets"] == ["/dev/null", str(log), str(log)]
    assert v["sig_blocked"] == 0
    assert v["sig_ignored"] == 0  # Python ignores SIGPIPE and SIGXFSZ; the child must not inherit that
    assert v["environ"] == b"A=1\0B=x y\0"
    assert v["cmdline"] == b"/usr/bin/sleep\x0030\0"


@pytest.mark.parametrize(
    ("kind", "err"),
    [("missing", 2), ("not_executable", 13), ("directory", 13), ("garbage", 8)],
)
def test_exec_failure_same_error(both: tuple[bool, bool], tmp_path: Path, kind: str, err: int) -> None:
    path = tmp_path / "vmm"
    if kind in ("not_executable", "garbage"):
        path.write_bytes(b"\x00\x01 not an executable")
        path.chmod(0o755 if kind == "garbage" else 0o644)
    elif kind == "directory":
        path.mkdir()
    got = []
    for native in both:
        with pytest.raises(SpawnError) as info:
            raw_spawn([str(path)], tmp_path / "log", native)
        got.append((info.value.errno, info.value.stage, info.value.code, str(info.value)))
    assert got[0] == got[1]
    assert got[0][:3] == (err, "exec", "SPAWN_FAILED")


def test_failed_exec_leaves_no_zombie(impl: str, tmp_path: Path) -> None:
    native = native_flag(impl)
    before = {c.pid for c in psutil.Process().children()}
    for _ in range(5):
        with pytest.raises(SpawnError):
            raw_spawn(["/nonexistent"], tmp_path / "log", native)
    time.sleep(0.05)
    assert {c.pid for c in psutil.Process().children()} - before == set()


def test_bad_arguments_rejected_alike(both: tuple[bool, bool]) -> None:
    for native in both:
        with pytest.raises(ValueError, match="null"):
            psys.spawn("/usr/bin/true", ["tr\0ue"], ENV, 5, 5, 5, native=native)
        with pytest.raises(ValueError, match="environment"):
            psys.spawn("/usr/bin/true", ["true"], {"A=B": "1"}, 5, 5, 5, native=native)
        with pytest.raises(ValueError, match=">= 3"):
            psys.spawn("/usr/bin/true", ["true"], ENV, 0, 5, 5, native=native)
